"""What the refiner costs next to the models it refines.

    python benchmarks/refiner_cost.py

FLOPs are counted by torch's FlopCounterMode on the meta device (no weights, no memory),
on networks built from the published configs below, for one 1024x1024 image:
  - the refiner (our RefinerUNet, default config);
  - FLUX.1-schnell: transformer x 4 steps, 256 T5 tokens, no guidance embedding;
  - FLUX.1-dev: transformer x 28 steps, 512 T5 tokens, guidance embedding;
  - for both, once per image: the T5-XXL text encoder and the VAE decoder.
Also: the refiner's parameters and measured CPU milliseconds per 512x512 image.
Writes benchmarks/results/refiner_cost.json.
"""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path

import torch
from diffusers import AutoencoderKL, FluxTransformer2DModel
from rich.console import Console
from rich.table import Table
from torch.utils.flop_counter import FlopCounterMode
from transformers import T5Config, T5EncoderModel

from refiner import RefinerUNet

RESULTS = Path(__file__).parent / "results" / "refiner_cost.json"
SIZE = 1024

# black-forest-labs/FLUX.1-{schnell,dev}: transformer/config.json, vae/config.json,
# text_encoder_2/config.json (google/t5-v1_1-xxl).
FLUX_TRANSFORMER = dict(
    patch_size=1,
    in_channels=64,
    num_layers=19,
    num_single_layers=38,
    attention_head_dim=128,
    num_attention_heads=24,
    joint_attention_dim=4096,
    pooled_projection_dim=768,
    axes_dims_rope=(16, 56, 56),
)
FLUX_VAE = dict(
    in_channels=3,
    out_channels=3,
    latent_channels=16,
    block_out_channels=(128, 256, 512, 512),
    layers_per_block=2,
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
)
T5_XXL = dict(
    d_model=4096, d_ff=10240, d_kv=64, num_heads=64, num_layers=24, feed_forward_proj="gated-gelu", vocab_size=32128
)
# openai/clip-vit-large-patch14's text tower, as FLUX.1 ships it (text_encoder/config.json).
CLIP_L = dict(
    vocab_size=49408,
    hidden_size=768,
    intermediate_size=3072,
    num_hidden_layers=12,
    num_attention_heads=12,
    max_position_embeddings=77,
    projection_dim=768,
    hidden_act="quick_gelu",
)
SCHNELL = {"steps": 4, "text_tokens": 256, "guidance_embeds": False}
DEV = {"steps": 28, "text_tokens": 512, "guidance_embeds": True}


def count_flops(fn) -> int:
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def transformer_step_flops(text_tokens: int, guidance_embeds: bool) -> int:
    image_tokens = (SIZE // 16) ** 2  # VAE /8, then 2x2 patches
    with torch.device("meta"):
        model = FluxTransformer2DModel(**FLUX_TRANSFORMER, guidance_embeds=guidance_embeds)
        inputs = dict(
            hidden_states=torch.randn(1, image_tokens, 64),
            encoder_hidden_states=torch.randn(1, text_tokens, 4096),
            pooled_projections=torch.randn(1, 768),
            timestep=torch.ones(1),
            guidance=torch.ones(1) if guidance_embeds else None,
            img_ids=torch.zeros(image_tokens, 3),
            txt_ids=torch.zeros(text_tokens, 3),
            return_dict=False,
        )
    return count_flops(lambda: model(**inputs))


def once_per_image_flops(text_tokens: int) -> dict[str, int]:
    with torch.device("meta"):
        t5 = T5EncoderModel(T5Config(**T5_XXL))
        vae = AutoencoderKL(**FLUX_VAE)
        tokens = torch.zeros(1, text_tokens, dtype=torch.long)
        latents = torch.randn(1, 16, SIZE // 8, SIZE // 8)
    return {
        "t5_encoder": count_flops(lambda: t5(input_ids=tokens)),
        "vae_decoder": count_flops(lambda: vae.decode(latents)),
    }


def model_flops(spec: dict) -> dict:
    step = transformer_step_flops(spec["text_tokens"], spec["guidance_embeds"])
    parts = {"transformer": step * spec["steps"], **once_per_image_flops(spec["text_tokens"])}
    return {"steps": spec["steps"], "transformer_step": step, **parts, "total": sum(parts.values())}


def refiner_cpu_ms(network: RefinerUNet, size: int = 512, repeats: int = 5) -> float:
    image = torch.rand(1, 3, size, size)
    with torch.inference_mode():
        network(image)  # warm-up
        times = []
        for _ in range(repeats):
            started = time.perf_counter()
            network(image)
            times.append((time.perf_counter() - started) * 1000)
    return statistics.median(times)


def main() -> None:
    console = Console()
    network = RefinerUNet().eval()
    with torch.device("meta"):
        meta_refiner = RefinerUNet()
        image = torch.rand(1, 3, SIZE, SIZE)
    refiner_flops = count_flops(lambda: meta_refiner(image))
    schnell, dev = model_flops(SCHNELL), model_flops(DEV)

    result = {
        "image_size": SIZE,
        "refiner": {
            "parameters": sum(p.numel() for p in network.parameters()),
            "flops": refiner_flops,
            "cpu_ms_512": round(refiner_cpu_ms(network), 1),
            "torch_threads": torch.get_num_threads(),
        },
        "flux_schnell": schnell,
        "flux_dev": dev,
        "refiner_over_schnell_transformer": refiner_flops / schnell["transformer"],
        "refiner_over_schnell_total": refiner_flops / schnell["total"],
        # What the product sells: schnell + refiner instead of dev.
        "schnell_plus_refiner_over_dev": (schnell["total"] + refiner_flops) / dev["total"],
        "saving_vs_dev": 1 - (schnell["total"] + refiner_flops) / dev["total"],
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")

    table = Table(title=f"FLOPs per {SIZE}x{SIZE} image")
    table.add_column("model")
    table.add_column("TFLOPs", justify="right")
    table.add_column("of schnell (4 steps)", justify="right")
    for name, flops in (("refiner", refiner_flops), ("FLUX.1-schnell", schnell["total"]), ("FLUX.1-dev", dev["total"])):
        table.add_row(name, f"{flops / 1e12:.3f}", f"{flops / schnell['total']:.2%}")
    console.print(table)
    refiner = result["refiner"]
    console.print(
        f"refiner: {refiner['parameters']:,} parameters, {refiner['cpu_ms_512']} ms per 512x512 image on CPU "
        f"({refiner['torch_threads']} threads); "
        f"refiner / schnell transformer = {result['refiner_over_schnell_transformer']:.3%}; "
        f"schnell + refiner costs {result['schnell_plus_refiner_over_dev']:.1%} of dev "
        f"({result['saving_vs_dev']:.1%} less)"
    )
    console.print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
