"""``generate_and_refine``: the generator makes the image, the refiner adds the detail back."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from shared.contract import GenerateSpec, JobRecord, Quality
from shared.errors import InvalidInput
from shared.images import TRAINED_ALGORITHMIC_MEDIA, Provenance
from worker.handlers.base import BatchKey, JobHandler, ModelOutput, Published, publish_image
from worker.models import generate
from worker.registry import ResidentPipeline
from worker.timing import StageTimer


@dataclass(frozen=True)
class GenerateKey(BatchKey):
    steps: int
    guidance: float


@dataclass(frozen=True)
class GenerateItem:
    prompt: str
    seed: int
    refiner: str | None  # the version that refines it, None: not refined
    drawn: bool  # the job drew its version (not pinned): its mark counts for the canary


class GenerateJob(JobHandler[GenerateSpec]):
    pipelines: ClassVar[tuple[ResidentPipeline, ...]] = ("pipeline",)
    Key: ClassVar[type[BatchKey]] = GenerateKey

    @property
    def generator(self) -> str:
        return self.models.preset.name

    def prepare(self, record: JobRecord, spec: GenerateSpec, timer: StageTimer) -> tuple[GenerateKey, GenerateItem]:
        preset = self.models.preset
        # The producer checked against its own idea of the preset; this worker knows.
        preset.check_size(spec.width, spec.height)
        if record.seed is None:  # producers draw it at submit, so a redelivery makes the same image
            raise InvalidInput("the job record carries no seed", field="seed")
        steps = spec.steps or preset.steps
        guidance = preset.guidance if spec.guidance is None else spec.guidance
        refiner = self.models.refiners.choose(record.job_id, spec.refiner_version) if spec.refine else None
        return GenerateKey(spec.width, spec.height, steps, guidance), GenerateItem(
            spec.prompt, record.seed, refiner, spec.refiner_version is None
        )

    def run_batch(self, key: GenerateKey, items: list[GenerateItem]) -> list[ModelOutput]:
        timer = StageTimer()
        with timer("generate"):
            images = generate(
                self.models.pipeline,
                [item.prompt for item in items],
                [item.seed for item in items],
                width=key.width,
                height=key.height,
                steps=key.steps,
                guidance=key.guidance,
                max_sequence_length=self.models.preset.max_sequence_length,
            )  # (B, 3, H, W)
        # The images share the generator's call; the refiner runs once per version they drew.
        by_version: dict[str, list[int]] = {}
        for i, item in enumerate(items):
            if item.refiner is not None:
                by_version.setdefault(item.refiner, []).append(i)
        refined: dict[int, torch.Tensor] = {}
        quality: dict[int, Quality] = {}
        for version, wanted in by_version.items():
            with timer("refine"):
                outputs, judged = self.models.refine(images[wanted], version, [items[i].drawn for i in wanted])
            refined.update(zip(wanted, outputs, strict=True))
            quality.update(zip(wanted, judged, strict=True))
        return [
            ModelOutput(images[i], refined.get(i), items[i].refiner, quality.get(i), timer.ms)
            for i in range(len(items))
        ]

    def publish(self, record: JobRecord, spec: GenerateSpec, output: ModelOutput, timer: StageTimer) -> Published:
        provenance = Provenance(
            job_id=record.job_id,
            generator=self.generator,
            refiner=output.refiner or "none",
            seed=record.seed,
            digital_source_type=TRAINED_ALGORITHMIC_MEDIA,
        )
        return publish_image(self.storage, record, spec, output, provenance, keep_raw=spec.keep_raw, timer=timer)
