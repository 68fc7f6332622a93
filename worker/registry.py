"""The models a worker keeps resident: its generator pipeline and the refiner.

Loaded once per worker process and warmed up before the worker takes jobs; jobs only
ever borrow them, through the batcher's single model thread.
"""

from __future__ import annotations

import logging
import time
from functools import cached_property
from pathlib import Path
from typing import Any

import torch
from diffusers import FluxPipeline
from huggingface_hub import try_to_load_from_cache

from refiner import Refiner, load_refiner
from shared.contract import Quality
from shared.presets import Preset, get_preset
from shared.settings import Settings
from worker.free_model import NoopPipeline
from worker.models import lent_components, load_pipeline, make_batch_invariant, resolve_device, resolve_dtype, warm_up
from worker.quality import QualityMonitor
from worker.tiny_flux import ensure_tiny_pipeline_saved

logger = logging.getLogger(__name__)


class ModelRegistry:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.preset: Preset = get_preset(settings.model_preset)
        self.device = resolve_device(settings.device)
        self.dtype = resolve_dtype(settings.dtype, self.device)
        mode = settings.batch_invariant
        self.batch_invariant = mode == "on" or (mode == "auto" and self.device.type == "cpu")
        self.load_seconds: dict[str, float] = {}
        self.quality = QualityMonitor(settings)

    @cached_property
    def pipeline(self) -> FluxPipeline | NoopPipeline:
        """The generator (and, for dataset pairs, the student)."""
        return self._load(self.preset, self.settings.model_path)

    @cached_property
    def teacher(self) -> FluxPipeline | NoopPipeline:
        """The dataset pairs' teacher; it shares the student's VAE and text encoders."""
        return self._load(self.teacher_preset, self.settings.teacher_path, lent_components(self.pipeline, self.preset))

    @cached_property
    def teacher_preset(self) -> Preset:
        return get_preset(self.settings.teacher_preset)

    def _load(
        self, preset: Preset, model_path: str | None, shared: dict[str, Any] | None = None
    ) -> FluxPipeline | NoopPipeline:
        started = time.perf_counter()
        pipe = load_pipeline(
            preset,
            model_path=model_path,
            cache_dir=self.settings.model_cache_dir,
            device=self.device,
            dtype=self.dtype,
            shared=shared,
            cpu_offload=self.settings.cpu_offload,
            vae_tiling=self.settings.vae_tiling,
        )
        if self.batch_invariant and not preset.free:  # the free model has nothing to make invariant
            make_batch_invariant(pipe)
        self.load_seconds[preset.name] = round(time.perf_counter() - started, 3)
        logger.info(
            "loaded %s on %s (%s) in %.1f s", preset.name, self.device, self.dtype, self.load_seconds[preset.name]
        )
        return pipe

    @cached_property
    def refiner(self) -> Refiner:
        started = time.perf_counter()
        refiner = load_refiner(self.settings.refiner_path, self.device, self.dtype)
        self.load_seconds["refiner"] = round(time.perf_counter() - started, 3)
        logger.info("loaded refiner %s", refiner.version)
        return refiner

    def refine(self, images: torch.Tensor) -> tuple[torch.Tensor, list[Quality]]:
        """(B, 3, H, W) in [0, 1] -> refined, and each image's judged detail ratio. One call
        (or one per image when batch-invariant, since convolution algorithms are chosen by
        batch size)."""
        if self.batch_invariant and len(images) > 1:  # one image is one call already: no copy
            parts = [self.refiner.refine_and_score(image) for image in images.split(1)]
            refined, ratios = torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])
        else:
            refined, ratios = self.refiner.refine_and_score(images)
        return refined, [self.quality.judge(self.refiner.version, ratio) for ratio in ratios.tolist()]

    def warm_up(self, pipelines: set[str]) -> None:
        """Load (and run once) the pipelines this worker's job kinds use ("pipeline",
        "teacher") and the refiner, before it consumes."""
        for name, preset in (("pipeline", self.preset), ("teacher", self.teacher_preset)):
            if name in pipelines:
                warm_up(getattr(self, name), preset)
        side = self.preset.min_size
        self.refiner.refine_and_score(torch.zeros(1, 3, side, side))  # not judged: not a job

    def describe(self) -> dict[str, object]:
        info: dict[str, object] = {
            "preset": self.preset.name,
            "device": str(self.device),
            "dtype": str(self.dtype).removeprefix("torch."),
            "refiner": self.refiner.version,
            "batch_invariant": self.batch_invariant,
            "load_seconds": self.load_seconds,
            # Preset -> the local directory its weights load from (None: not cached, so a
            # restart downloads them again), for `refinery doctor`.
            "weights": {
                preset.name: _weights_dir(preset, path, self.settings.model_cache_dir)
                for name, preset, path in (
                    ("pipeline", self.preset, self.settings.model_path),
                    ("teacher", self.teacher_preset, self.settings.teacher_path),
                )
                # Those this worker loaded (cached_property); the free model has no weights.
                if name in self.__dict__ and not preset.free
            },
        }
        if self.device.type == "cuda":
            info["gpu_memory_allocated_bytes"] = torch.cuda.memory_allocated(self.device)
            info["gpu_memory_reserved_bytes"] = torch.cuda.memory_reserved(self.device)
        return info


def _weights_dir(preset: Preset, model_path: str | None, cache_dir: Path) -> str | None:
    """Where ``load_pipeline`` finds ``preset``'s weights on this host, if they are there."""
    if preset.tiny:
        return str(ensure_tiny_pipeline_saved(preset.name, cache_dir))
    source = model_path or preset.model_id
    assert source is not None, "real presets name their hub id"
    if Path(source).is_dir():
        return str(Path(source).resolve())
    # The hub cache (HF_HOME) holds a snapshot per revision; model_index.json is its root.
    cached = try_to_load_from_cache(source, "model_index.json")
    return str(Path(cached).parent) if isinstance(cached, str) else None
