"""``pair``: one training pair, the same prompt and seed through the student and the
teacher, written to the dataset with its manifest row (``shared.datasets``)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from refiner.pixels import to_pil
from shared.contract import JobRecord, JobResult, OutputFormat, PairSpec, parse_s3_uri
from shared.datasets import PAIR_IMAGES, ManifestRow, PresetRow, pair_uris
from shared.errors import InvalidInput
from shared.images import CONTENT_TYPES, TRAINED_ALGORITHMIC_MEDIA, Provenance, encode_image
from shared.presets import Preset
from worker.handlers.base import BatchKey, JobHandler, Published
from worker.handlers.generate import GenerateItem
from worker.models import generate
from worker.registry import ResidentPipeline
from worker.timing import StageTimer


@dataclass(frozen=True)
class PairKey(BatchKey):
    pass  # student and teacher each sample at their preset's own steps and guidance


@dataclass(frozen=True)
class PairOutput:
    images: dict[str, torch.Tensor]  # "student", "teacher": (3, H, W)
    timings_ms: dict[str, float]  # of the whole batch
    batch_size: int  # images in the model call that made these


class PairJob(JobHandler[PairSpec]):
    pipelines: ClassVar[tuple[ResidentPipeline, ...]] = ("pipeline", "teacher")
    Key: ClassVar[type[BatchKey]] = PairKey

    @property
    def presets(self) -> dict[str, Preset]:
        return {"student": self.models.preset, "teacher": self.models.teacher_preset}

    def prepare(self, record: JobRecord, spec: PairSpec, timer: StageTimer) -> tuple[PairKey, GenerateItem]:
        for role, preset in self.presets.items():
            if getattr(spec, role) != preset.name:
                raise InvalidInput(f"this worker serves {preset.name!r}, not {getattr(spec, role)!r}", field=role)
            preset.check_size(spec.width, spec.height)
        if parse_s3_uri(spec.dataset + "/x")[0] != self.settings.s3_bucket:
            raise InvalidInput(f"datasets are written to the bucket {self.settings.s3_bucket!r} only", field="dataset")
        return PairKey(spec.width, spec.height), GenerateItem(spec.prompt, spec.seed, refiner=None, drawn=False)

    def run_batch(self, key: PairKey, items: list[GenerateItem]) -> list[PairOutput]:
        prompts, seeds = [item.prompt for item in items], [item.seed for item in items]
        pipelines = {"student": self.models.pipeline, "teacher": self.models.teacher}
        images, timer = {}, StageTimer()
        for role, preset in self.presets.items():
            with timer(role):
                images[role] = generate(
                    pipelines[role],
                    prompts,
                    seeds,
                    width=key.width,
                    height=key.height,
                    steps=preset.steps,
                    guidance=preset.guidance,
                    max_sequence_length=preset.max_sequence_length,
                )  # (B, 3, H, W)
        return [
            PairOutput({role: images[role][i] for role in PAIR_IMAGES}, timer.ms, len(items)) for i in range(len(items))
        ]

    def publish(self, record: JobRecord, spec: PairSpec, output: PairOutput, timer: StageTimer) -> Published:
        with timer("encode"):
            encoded = {
                role: encode_image(
                    to_pil(output.images[role]),
                    OutputFormat.png,
                    Provenance(record.job_id, preset.name, "none", spec.seed, TRAINED_ALGORITHMIC_MEDIA),
                )
                for role, preset in self.presets.items()
            }
        row = ManifestRow(
            pair_id=spec.pair_id,
            prompt=spec.prompt,
            attributes=spec.attributes,
            seed=spec.seed,
            width=spec.width,
            height=spec.height,
            **{role: PresetRow(preset=p.name, steps=p.steps, guidance=p.guidance) for role, p in self.presets.items()},
            timings_ms={role: round(output.timings_ms[role] / output.batch_size, 3) for role in PAIR_IMAGES},
            batch_size=output.batch_size,
            job_id=record.job_id,
        )
        uris = pair_uris(spec.dataset, spec.pair_id)
        with timer("upload"):
            for role in PAIR_IMAGES:
                self.storage.put(uris[role], encoded[role], CONTENT_TYPES[OutputFormat.png], once=True)
            # Last: a manifest row means a complete pair (what resuming relies on).
            self.storage.put(uris["manifest"], row.model_dump_json().encode(), "application/json")
        result = JobResult(
            uri=uris["manifest"], width=spec.width, height=spec.height, format=OutputFormat.png, files=uris
        )
        return Published(result, refiner=None)
