"""FLUX pipelines: where a preset's models come from (one source object per
``Preset.source``: the hub or a local path, the offline doubles, the free model), and
seeded batches generated with them.

Every FLUX preset, tiny test doubles included, goes through ``FluxPipeline.from_pretrained``,
so tests exercise the loading path production uses. The free ``noop`` preset loads no
model at all (``worker/free_model.py``); its source answers the same questions, so no
caller asks which source a preset has.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from diffusers import FluxPipeline
from huggingface_hub import try_to_load_from_cache

from refiner.building import BUILDING
from shared.errors import ModelUnavailable
from shared.presets import Preset
from worker.free_model import NoopPipeline
from worker.tiny_flux import ensure_tiny_pipeline_saved

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

# What FLUX.1-schnell and FLUX.1-dev have in common: a worker holding both keeps one copy.
SHARED_COMPONENTS = ("vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2")


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


@dataclass(frozen=True)
class LoadOptions:
    """Where and how a worker loads its pipelines (``load_pipeline``'s keywords)."""

    cache_dir: Path
    device: torch.device
    dtype: torch.dtype
    cpu_offload: bool
    vae_tiling: bool


class ModelSource(ABC):
    """Where one kind of preset's pipeline comes from, and what the worker asks of it."""

    @abstractmethod
    def load(
        self, preset: Preset, model_path: str | None, options: LoadOptions, shared: dict[str, Any]
    ) -> FluxPipeline | NoopPipeline:
        """Load ``preset``, reusing the ``shared`` components (``lent_components``)."""

    @abstractmethod
    def lent_components(self, pipe: Any, preset: Preset) -> dict[str, Any]:
        """The components a loaded student lends its teacher."""

    @abstractmethod
    def make_batch_invariant(self, pipe: Any) -> None:
        """Make each image independent of the batch it runs in (``make_batch_invariant``)."""

    @abstractmethod
    def weights(self, preset: Preset, model_path: str | None, cache_dir: Path) -> dict[str, str | None]:
        """Preset -> the local directory ``load`` reads its weights from on this host (None:
        not there, so a restart downloads them again), for `refinery doctor`; empty for a
        model without weights."""


class _FluxSource(ModelSource):
    """The FLUX presets: ``FluxPipeline.from_pretrained`` from wherever ``_location`` says."""

    @abstractmethod
    def _location(self, preset: Preset, model_path: str | None, cache_dir: Path) -> tuple[str | Path, dict[str, Any]]:
        """What ``from_pretrained`` loads, and its hub options."""

    def load(
        self, preset: Preset, model_path: str | None, options: LoadOptions, shared: dict[str, Any]
    ) -> FluxPipeline:
        location, hub = self._location(preset, model_path, options.cache_dir)
        # Components passed by name are used as given instead of being loaded again.
        with BUILDING:
            pipe = FluxPipeline.from_pretrained(location, dtype=options.dtype, **shared, **hub)
        if options.cpu_offload:
            # Each component moves to the GPU only while it runs: slower, but fits small GPUs.
            pipe.enable_model_cpu_offload(device=options.device)
        else:
            pipe.to(options.device)
        if options.vae_tiling:
            pipe.vae.enable_tiling()
        pipe.set_progress_bar_config(disable=True)
        return pipe

    def lent_components(self, pipe: FluxPipeline, preset: Preset) -> dict[str, Any]:
        return {name: getattr(pipe, name) for name in SHARED_COMPONENTS if name != "vae" or preset.lends_vae}

    def make_batch_invariant(self, pipe: FluxPipeline) -> None:
        make_batch_invariant(pipe)


class HubSource(_FluxSource):
    """The real presets: their hub id, or the local directory or hub id ``model_path`` names."""

    def _location(self, preset: Preset, model_path: str | None, cache_dir: Path) -> tuple[str | Path, dict[str, Any]]:
        location = model_path or preset.model_id
        assert location is not None, "hub presets name their hub id"
        return location, {}

    def load(
        self, preset: Preset, model_path: str | None, options: LoadOptions, shared: dict[str, Any]
    ) -> FluxPipeline:
        try:
            return super().load(preset, model_path, options, shared)
        except OSError as exc:  # what diffusers and huggingface_hub raise for weights out of reach
            location, _ = self._location(preset, model_path, options.cache_dir)
            first_line = next(iter(str(exc).splitlines()), "")
            raise ModelUnavailable(
                f"cannot load {preset.name} from {location} ({type(exc).__name__}: {first_line}); download the "
                "weights and set REFINERY_MODEL_PATH (REFINERY_TEACHER_PATH for a teacher) to them, or give "
                "this worker the hub "
                "(and HF_TOKEN: FLUX.1-dev is gated)",
                field="model",
            ) from None

    def weights(self, preset: Preset, model_path: str | None, cache_dir: Path) -> dict[str, str | None]:
        location, _ = self._location(preset, model_path, cache_dir)
        if Path(location).is_dir():
            return {preset.name: str(Path(location).resolve())}
        # The hub cache (HF_HOME) holds a snapshot per revision; model_index.json is its root.
        cached = try_to_load_from_cache(str(location), "model_index.json")
        return {preset.name: str(Path(cached).parent) if isinstance(cached, str) else None}


class OfflineDoubleSource(_FluxSource):
    """The tiny test doubles: built locally into ``cache_dir`` once (``model_path`` does not
    apply) and loaded from there without touching the hub."""

    def _location(self, preset: Preset, model_path: str | None, cache_dir: Path) -> tuple[str | Path, dict[str, Any]]:
        return ensure_tiny_pipeline_saved(preset.name, cache_dir), {"local_files_only": True}

    def weights(self, preset: Preset, model_path: str | None, cache_dir: Path) -> dict[str, str | None]:
        return {preset.name: str(ensure_tiny_pipeline_saved(preset.name, cache_dir))}


class FreeSource(ModelSource):
    """The free model: nothing to load, lend, make invariant or keep on disk."""

    def load(
        self, preset: Preset, model_path: str | None, options: LoadOptions, shared: dict[str, Any]
    ) -> NoopPipeline:
        return NoopPipeline()

    def lent_components(self, pipe: NoopPipeline, preset: Preset) -> dict[str, Any]:
        return {}

    def make_batch_invariant(self, pipe: NoopPipeline) -> None:
        pass  # each image is a window of a fixed texture: independent of its batch already

    def weights(self, preset: Preset, model_path: str | None, cache_dir: Path) -> dict[str, str | None]:
        return {}


SOURCES: dict[str, ModelSource] = {"hub": HubSource(), "offline-double": OfflineDoubleSource(), "free": FreeSource()}


def source_of(preset: Preset) -> ModelSource:
    return SOURCES[preset.source]


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
    """Load ``preset`` from its source onto ``device``, reusing the ``shared`` components
    (``lent_components``). ``model_path`` overrides a hub preset's hub id."""
    options = LoadOptions(cache_dir, device, dtype, cpu_offload, vae_tiling)
    return source_of(preset).load(preset, model_path, options, shared or {})


def lent_components(pipe: FluxPipeline | NoopPipeline, preset: Preset) -> dict[str, Any]:
    """The components a loaded student lends its teacher (``load_pipeline(shared=...)``)."""
    return source_of(preset).lent_components(pipe, preset)


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
