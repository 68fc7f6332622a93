"""The models a worker keeps resident: its generator pipeline and its refiners.

Loaded once per worker process and warmed up before the worker takes jobs; jobs only
ever borrow them, through the batcher's single model thread.
"""

from __future__ import annotations

import logging
import time
from functools import cached_property
from typing import Any, Literal

import torch
from diffusers import FluxPipeline

from shared.contract import Quality
from shared.presets import Preset, get_preset
from shared.settings import Settings
from worker.free_model import NoopPipeline
from worker.models import lent_components, load_pipeline, resolve_device, resolve_dtype, source_of, warm_up
from worker.quality import QualityMonitor
from worker.refiners import RefinerSource, refiner_source

logger = logging.getLogger(__name__)

# The pipelines a registry keeps (its cached properties of these names), which handlers
# name as the ones they need resident.
ResidentPipeline = Literal["pipeline", "teacher"]


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
        if self.batch_invariant:
            source_of(preset).make_batch_invariant(pipe)
        self.load_seconds[preset.name] = round(time.perf_counter() - started, 3)
        logger.info(
            "loaded %s on %s (%s) in %.1f s", preset.name, self.device, self.dtype, self.load_seconds[preset.name]
        )
        return pipe

    @cached_property
    def refiners(self) -> RefinerSource:
        """The refiner versions this worker serves (``REFINERY_REFINER``), loaded and warm."""
        started = time.perf_counter()
        refiners = refiner_source(self.settings, self.device, self.dtype, warm_side=self.preset.min_size)
        self.load_seconds["refiner"] = round(time.perf_counter() - started, 3)
        return refiners

    def refine(self, images: torch.Tensor, version: str, drawn: list[bool]) -> tuple[torch.Tensor, list[Quality]]:
        """(B, 3, H, W) in [0, 1], or uint8 levels, through refiner ``version``
        (``refiners.choose`` gave it) -> refined, in the images' dtype, and each image's judged
        detail ratio, which ``drawn`` images (those whose job did not pin the version) add to
        the version's tally. One call (or one per image when batch-invariant, since
        convolution algorithms are chosen by batch size).
        Handlers reach the refiners only through here."""
        refiner = self.refiners.get(version)
        if self.batch_invariant and len(images) > 1:  # one image is one call already: no copy
            parts = [refiner.refine_and_score(image) for image in images.split(1)]
            refined, ratios = torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])
        else:
            refined, ratios = refiner.refine_and_score(images)
        judged = [self.quality.judge(version, ratio) for ratio in ratios.tolist()]
        self.refiners.record(version, [mark for mark, counts in zip(judged, drawn, strict=True) if counts])
        return refined, judged

    def warm_up(self, pipelines: set[ResidentPipeline]) -> None:
        """Load (and run once) the pipelines this worker's job kinds use ("pipeline",
        "teacher") and the refiners, before it consumes."""
        for name, preset in (("pipeline", self.preset), ("teacher", self.teacher_preset)):
            if name in pipelines:
                warm_up(getattr(self, name), preset)
        self.refiners  # noqa: B018 - loads and warms them (a cached property)

    def describe(self) -> dict[str, object]:
        info: dict[str, object] = {
            "preset": self.preset.name,
            "device": str(self.device),
            "dtype": str(self.dtype).removeprefix("torch."),
            **self.refiners.describe(),
            "batch_invariant": self.batch_invariant,
            "load_seconds": self.load_seconds,
            # Preset -> the local directory its weights load from (None: not cached, so a
            # restart downloads them again), for `refinery doctor`.
            "weights": {
                name: where
                for attribute, preset, path in (
                    ("pipeline", self.preset, self.settings.model_path),
                    ("teacher", self.teacher_preset, self.settings.teacher_path),
                )
                if attribute in self.__dict__  # those this worker loaded (cached_property)
                for name, where in source_of(preset).weights(preset, path, self.settings.model_cache_dir).items()
            },
        }
        if self.device.type == "cuda":
            info["gpu_memory_allocated_bytes"] = torch.cuda.memory_allocated(self.device)
            info["gpu_memory_reserved_bytes"] = torch.cuda.memory_reserved(self.device)
        return info
