"""The models a worker keeps resident: its generator pipeline(s) and the refiner.

Loaded once per worker process and warmed up before the worker takes jobs; jobs only
ever borrow them.
"""

from __future__ import annotations

import logging
import time
from functools import cached_property

import torch
from diffusers import FluxPipeline

from refiner import Refiner, load_refiner
from shared.settings import Settings
from worker.models import load_pipeline, resolve_device, resolve_dtype, warm_up
from worker.presets import Preset, get_preset

logger = logging.getLogger(__name__)


class ModelRegistry:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.preset: Preset = get_preset(settings.model_preset)
        self.device = resolve_device(settings.device)
        self.dtype = resolve_dtype(settings.dtype, self.device)
        self.load_seconds: dict[str, float] = {}

    @cached_property
    def pipeline(self) -> FluxPipeline:
        started = time.perf_counter()
        pipe = load_pipeline(
            self.preset,
            model_path=self.settings.model_path,
            cache_dir=self.settings.model_cache_dir,
            device=self.device,
            dtype=self.dtype,
        )
        self.load_seconds[self.preset.name] = time.perf_counter() - started
        logger.info("loaded %s on %s (%s) in %.1f s", self.preset.name, self.device, self.dtype, self.load_seconds[self.preset.name])
        return pipe

    @cached_property
    def refiner(self) -> Refiner:
        refiner = load_refiner(self.settings.refiner_path, self.device, self.dtype)
        logger.info("loaded refiner %s", refiner.version)
        return refiner

    def warm_up(self, *, generator: bool) -> None:
        """Load (and run once) what this worker's queues need, before it consumes."""
        if generator:
            warm_up(self.pipeline, self.preset)
        side = 32 if self.preset.tiny else 256
        self.refiner(torch.zeros(1, 3, side, side))

    def describe(self) -> dict[str, object]:
        info: dict[str, object] = {
            "preset": self.preset.name,
            "device": str(self.device),
            "dtype": str(self.dtype).removeprefix("torch."),
            "refiner": self.refiner.version,
            "load_seconds": self.load_seconds,
        }
        if self.device.type == "cuda":
            info["gpu_memory_allocated_mb"] = torch.cuda.memory_allocated(self.device) / 2**20
            info["gpu_memory_reserved_mb"] = torch.cuda.memory_reserved(self.device) / 2**20
        return info
