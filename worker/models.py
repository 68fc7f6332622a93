"""FLUX pipelines: load them by preset (the real hub path and the offline doubles) and
generate seeded batches.

Every FLUX preset, tiny test doubles included, goes through ``FluxPipeline.from_pretrained``,
so tests exercise the loading path production uses. The free ``noop`` preset loads no
model at all (``worker/free_model.py``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from diffusers import FluxPipeline

from shared.presets import Preset
from worker.free_model import NoopPipeline
from worker.tiny_flux import ensure_tiny_pipeline_saved

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

# What FLUX.1-schnell and FLUX.1-dev have in common: a worker holding both keeps one copy.
SHARED_COMPONENTS = ("vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2")


def lent_components(pipe: FluxPipeline | NoopPipeline, preset: Preset) -> dict[str, Any]:
    """The components a loaded student lends its teacher (``load_pipeline(shared=...)``);
    the free model has none."""
    if preset.free:
        return {}
    return {name: getattr(pipe, name) for name in SHARED_COMPONENTS if name != "vae" or preset.lends_vae}


def resolve_device(setting: str) -> torch.device:
    if setting == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(setting)


def resolve_dtype(setting: str, device: torch.device) -> torch.dtype:
    if setting == "auto":
        # bf16 is what FLUX ships in; CPUs run it slowly, so fp32 there.
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    try:
        return _DTYPES[setting]
    except KeyError:
        raise ValueError(f"unknown dtype {setting!r}; expected auto or one of {', '.join(_DTYPES)}") from None


def load_pipeline(
    preset: Preset,
    *,
    model_path: str | None,
    cache_dir: Path,
    device: torch.device,
    dtype: torch.dtype,
    shared: dict[str, Any] | None = None,
    cpu_offload: bool = False,
    vae_tiling: bool = False,
) -> FluxPipeline | NoopPipeline:
    """Load ``preset`` onto ``device``, reusing the ``shared`` components (``lent_components``).

    ``model_path`` overrides a real preset's hub id; the tiny presets ignore it, being
    built locally into ``cache_dir`` and loaded from there without touching the hub.
    """
    if preset.free:
        return NoopPipeline()
    source: str | Path | None
    if preset.tiny:
        source, hub = ensure_tiny_pipeline_saved(preset.name, cache_dir), {"local_files_only": True}
    else:
        source, hub = model_path or preset.model_id, {}
    # Components passed by name are used as given instead of being loaded again.
    pipe = FluxPipeline.from_pretrained(source, dtype=dtype, **(shared or {}), **hub)
    if cpu_offload:
        # Each component moves to the GPU only while it runs: slower, but fits small GPUs.
        pipe.enable_model_cpu_offload(device=device)
    else:
        pipe.to(device)
    if vae_tiling:
        pipe.vae.enable_tiling()
    pipe.set_progress_bar_config(disable=True)
    return pipe


def make_batch_invariant(pipe: FluxPipeline) -> None:
    """Make each image independent of the batch it runs in, bit for bit (CPU fp32).

    Without this, a batch and single calls differ in the last bits (README, "Batching and scheduling") for
    two reasons. The BLAS kernel for a matrix multiply with 1-2 rows differs from the one
    for more rows, which hits the transformer's (B, C) conditioning layers (timestep,
    guidance and pooled-text embeddings, AdaLN modulation); and the VAE's convolutions pick
    their algorithm by batch size. Running those linears one row at a time and decoding
    one image at a time (diffusers' VAE slicing) removes both; the linears are tiny, so
    it costs little (README). Sequence-shaped (B, T, C) inputs are unaffected.
    """
    for module in pipe.transformer.modules():
        if isinstance(module, torch.nn.Linear):
            module.forward = _row_by_row(module)  # type: ignore[method-assign]  # this instance only
    pipe.vae.enable_slicing()


def _row_by_row(linear: torch.nn.Linear):
    def forward(x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 2 and x.shape[0] > 1:
            return torch.cat([F.linear(row, linear.weight, linear.bias) for row in x.split(1)])
        return F.linear(x, linear.weight, linear.bias)

    return forward


def generate(
    pipe: FluxPipeline | NoopPipeline,
    prompts: list[str],
    seeds: list[int],
    *,
    width: int,
    height: int,
    steps: int,
    guidance: float,
    max_sequence_length: int,
) -> torch.Tensor:
    """One pipeline call for the batch; returns float32 CPU images (B, 3, H, W) in [0, 1]."""
    if len(prompts) != len(seeds):
        raise ValueError(f"{len(prompts)} prompts but {len(seeds)} seeds")
    # One CPU generator per image: a seed draws the same initial noise on every device
    # and whatever else is in the batch.
    generators = [torch.Generator().manual_seed(seed) for seed in seeds]
    images = pipe(
        prompt=prompts,
        generator=generators,
        width=width,
        height=height,
        num_inference_steps=steps,
        guidance_scale=guidance,
        max_sequence_length=max_sequence_length,
        output_type="pt",
    ).images
    return images.float().cpu()


def warm_up(pipe: FluxPipeline | NoopPipeline, preset: Preset) -> None:
    """One smallest-size, one-step call, so the first job does not pay for lazy initialisation."""
    generate(
        pipe,
        ["warm-up"],
        [0],
        width=preset.min_size,
        height=preset.min_size,
        steps=1,
        guidance=preset.guidance,
        max_sequence_length=preset.max_sequence_length,
    )
