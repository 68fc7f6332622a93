"""The models at the run's scale: FLUX.1-schnell and -dev at their published sizes with random
weights, built straight on the GPU in bf16 (or tiny configs on the CPU for --small), and
the default refiner."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from diffusers import AutoencoderKL, FluxPipeline, FluxTransformer2DModel
from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

from benchmarks.refiner_cost import CLIP_L, FLUX_TRANSFORMER, FLUX_VAE, T5_XXL
from refiner import Refiner, RefinerUNet
from refiner.export import IDENTITY
from worker.models import SHARED_COMPONENTS
from worker.tiny_flux import build_tiny_pipeline

# FLUX.1's VAE beyond its shape: no quant convs, and its latent scaling and shift.
FLUX_VAE_FULL = {
    **FLUX_VAE,
    "scaling_factor": 0.3611,
    "shift_factor": 0.1159,
    "use_quant_conv": False,
    "use_post_quant_conv": False,
}


@dataclass(frozen=True)
class Scale:
    """What one run builds and measures: FLUX.1 at full size on the GPU, or tiny configs on
    the CPU (--small) that take the same code paths in seconds."""

    device: str
    dtype: torch.dtype
    # The models' configs; None: the offline double's (worker/tiny_flux.py), for --small.
    transformer: dict | None
    t5: dict | None
    clip: dict | None
    vae: dict | None
    sizes: tuple[int, ...]  # px, the latency sweep
    batches: tuple[int, ...]
    repeats: int  # timed calls per measurement (their median)
    big_size: int  # px: refiner, batching, saving
    refiner_batches: tuple[int, ...]
    refiner_repeats: int
    # inductor on the GPU; on the CPU "eager" still traces through dynamo, without minutes
    # of C++ compilation on a 2-core CI machine.
    compile_backend: str
    compile_needs_s: float  # what compiling a refiner variant needs of the budget
    batching_batch: int
    dev_batches: tuple[int, ...]
    system_size: int  # the flux-schnell preset's smallest size is 256
    system_jobs: int
    system_max_batch: int
    # Save ~34 GB, a worker process that imports and loads them, a direct run and a burst:
    # an estimate of 150-250 s on the GPU (issue 23); tiny models need a worker's start.
    system_needs_s: float


FULL = Scale(
    device="cuda",
    dtype=torch.bfloat16,
    transformer=FLUX_TRANSFORMER,
    t5=T5_XXL,
    clip=CLIP_L,
    vae=FLUX_VAE_FULL,
    sizes=(512, 768, 1024),
    batches=(1, 2, 4, 8),
    repeats=2,
    big_size=1024,
    refiner_batches=(1, 2, 4, 8, 16),
    refiner_repeats=10,
    compile_backend="inductor",
    compile_needs_s=90,
    batching_batch=4,
    dev_batches=(1, 4),
    system_size=1024,
    system_jobs=8,
    system_max_batch=4,
    system_needs_s=200,
)
SMALL = Scale(
    device="cpu",
    dtype=torch.float32,
    transformer=None,
    t5=None,
    clip=None,
    vae=None,
    sizes=(64, 96),
    batches=(1, 2),
    repeats=1,
    big_size=64,
    refiner_batches=(1, 2),
    refiner_repeats=2,
    compile_backend="eager",
    compile_needs_s=0,
    batching_batch=2,
    dev_batches=(1, 2),
    system_size=256,
    system_jobs=4,
    system_max_batch=2,
    system_needs_s=20,
)


@contextmanager
def built_on(device: str, dtype: torch.dtype) -> Iterator[None]:
    """Modules constructed inside are allocated and initialised on ``device`` in ``dtype``:
    12B parameters never take a detour through CPU memory or fp32."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            yield
    finally:
        torch.set_default_dtype(previous)


def ready(pipe: FluxPipeline) -> FluxPipeline:
    # Built from configs, modules start in training mode (T5's dropout would vary the images).
    for name in ("vae", "text_encoder", "text_encoder_2", "transformer"):
        getattr(pipe, name).eval()
    pipe.set_progress_bar_config(disable=True)
    return pipe


def build_schnell(scale: Scale) -> FluxPipeline:
    """FLUX.1-schnell's architecture with random weights. Tokenizers and the scheduler come
    from the offline double (a word-level vocabulary; FLUX.1-schnell's scheduler config)."""
    double = build_tiny_pipeline("tiny-schnell")
    tokens = double.tokenizer
    ids = dict(pad_token_id=tokens.pad_token_id, bos_token_id=tokens.bos_token_id, eos_token_id=tokens.eos_token_id)
    clip = CLIPTextConfig(**scale.clip, **ids) if scale.clip else double.text_encoder.config
    t5 = T5Config(**scale.t5, **ids) if scale.t5 else double.text_encoder_2.config
    with built_on(scale.device, scale.dtype):
        pipe = FluxPipeline(
            scheduler=double.scheduler,
            vae=AutoencoderKL.from_config(scale.vae or double.vae.config),
            text_encoder=CLIPTextModel(clip),
            tokenizer=double.tokenizer,
            text_encoder_2=as_loaded(T5EncoderModel(t5)),
            tokenizer_2=double.tokenizer_2,
            transformer=transformer(scale, double, guidance_embeds=False),
        )
    return ready(pipe)


def transformer(scale: Scale, double: FluxPipeline, guidance_embeds: bool) -> FluxTransformer2DModel:
    return FluxTransformer2DModel.from_config(
        scale.transformer or double.transformer.config, guidance_embeds=guidance_embeds
    )


def as_loaded(model: T5EncoderModel) -> T5EncoderModel:
    """The modules transformers' ``from_pretrained`` keeps in float32 whatever the dtype (T5's
    feed-forward output projections ``wo``), kept there too: the worker runs them so."""
    for name, module in model.named_modules():
        if name.rsplit(".", 1)[-1] in (model._keep_in_fp32_modules or ()):
            module.float()
    return model


def build_dev(schnell: FluxPipeline, scale: Scale) -> FluxPipeline:
    """FLUX.1-dev: its own transformer (with guidance embeddings) and scheduler; the VAE, text
    encoders and tokenizers shared with schnell, as a worker holding both shares them."""
    double = build_tiny_pipeline("tiny-dev")
    with built_on(scale.device, scale.dtype):
        dev = transformer(scale, double, guidance_embeds=True)
    shared = {name: getattr(schnell, name) for name in SHARED_COMPONENTS}
    return ready(FluxPipeline(scheduler=double.scheduler, transformer=dev, **shared))


def build_refiner(scale: Scale) -> Refiner:
    """The default refiner (RefinerUNet's defaults are `refinery train`'s unet-cbam). Its last
    convolution is re-drawn: untrained it is zero, the identity, which batches trivially."""
    network = RefinerUNet()
    network.conv_out.reset_parameters()
    return Refiner(network.to(device=scale.device, dtype=scale.dtype).eval(), IDENTITY)


def parameters(pipe: FluxPipeline) -> dict[str, float]:
    """Billions of parameters per model: the check that the models are FLUX.1's size."""
    models = ("transformer", "text_encoder_2", "text_encoder", "vae")
    return {name: round(sum(p.numel() for p in getattr(pipe, name).parameters()) / 1e9, 4) for name in models}
