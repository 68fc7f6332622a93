"""What the batcher's model thread runs: one model call (or pair of calls) per batch.

Keys say which jobs may share a call: ``GenerateKey`` (size, steps, guidance),
``RefineKey`` (size) and ``PairKey`` (size; student and teacher use their presets' steps).
Each job gets back its own images and the batch's stage timings.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from worker.models import generate
from worker.registry import ModelRegistry
from worker.timing import StageTimer


@dataclass(frozen=True)
class GenerateKey:
    width: int
    height: int
    steps: int
    guidance: float


@dataclass(frozen=True)
class RefineKey:
    width: int
    height: int


@dataclass(frozen=True)
class PairKey:
    width: int
    height: int


@dataclass(frozen=True)
class GenerateItem:
    prompt: str
    seed: int
    refine: bool


@dataclass(frozen=True)
class ModelOutput:
    raw: torch.Tensor  # (3, H, W) in [0, 1]: the generated or input image
    refined: torch.Tensor | None  # (3, H, W), None when the job did not ask for refinement
    timings_ms: dict[str, float]  # of the whole batch


@dataclass(frozen=True)
class PairOutput:
    student: torch.Tensor  # (3, H, W)
    teacher: torch.Tensor  # (3, H, W)
    timings_ms: dict[str, float]  # of the whole batch


class ModelWork:
    """``run_batch`` for the DynamicBatcher, over the registry's resident models."""

    def __init__(self, registry: ModelRegistry) -> None:
        self.registry = registry

    def __call__(self, key: GenerateKey | RefineKey | PairKey, items: list) -> list:
        if isinstance(key, GenerateKey):
            return self._generate(key, items)
        if isinstance(key, PairKey):
            return self._pairs(key, items)
        return self._refine(items)

    def _generate(self, key: GenerateKey, items: list[GenerateItem]) -> list[ModelOutput]:
        timer = StageTimer()
        with timer("generate"):
            images = generate(
                self.registry.pipeline,
                [item.prompt for item in items],
                [item.seed for item in items],
                width=key.width,
                height=key.height,
                steps=key.steps,
                guidance=key.guidance,
                max_sequence_length=self.registry.preset.max_sequence_length,
            )  # (B, 3, H, W)
        wanted = [i for i, item in enumerate(items) if item.refine]
        refined: dict[int, torch.Tensor] = {}
        if wanted:
            with timer("refine"):
                refined = dict(zip(wanted, self.registry.refine(images[wanted]), strict=True))
        return [ModelOutput(images[i], refined.get(i), timer.ms) for i in range(len(items))]

    def _pairs(self, key: PairKey, items: list[GenerateItem]) -> list[PairOutput]:
        """The same prompts and seeds through the student, then the teacher, each at its
        preset's own steps and guidance."""
        prompts, seeds = [item.prompt for item in items], [item.seed for item in items]
        images, timer = {}, StageTimer()
        for role, pipe, preset in (
            ("student", self.registry.pipeline, self.registry.preset),
            ("teacher", self.registry.teacher, self.registry.teacher_preset),
        ):
            with timer(role):
                images[role] = generate(
                    pipe,
                    prompts,
                    seeds,
                    width=key.width,
                    height=key.height,
                    steps=preset.steps,
                    guidance=preset.guidance,
                    max_sequence_length=preset.max_sequence_length,
                )
        return [PairOutput(images["student"][i], images["teacher"][i], timer.ms) for i in range(len(items))]

    def _refine(self, items: list[torch.Tensor]) -> list[ModelOutput]:
        timer = StageTimer()
        with timer("refine"):
            refined = self.registry.refine(torch.stack(items))
        return [ModelOutput(raw, out, timer.ms) for raw, out in zip(items, refined, strict=True)]
