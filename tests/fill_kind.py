"""A fourth job kind, added the way the README's "Adding a job kind" says: a spec, its
declaration and its handler, here in one module outside the product. ``fill`` makes a flat
grey image of the requested size. tests/test_job_kinds.py serves it with a real worker,
which imports this module before it starts (the producer side imports it too)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal

import torch
from pydantic import Field

from shared.contract import JobKind, JobRecord, JobSpec, declare
from shared.images import TRAINED_ALGORITHMIC_MEDIA, Provenance
from worker.handlers.base import BatchKey, JobHandler, ModelOutput, Published, publish_image
from worker.registry import ResidentPipeline
from worker.timing import StageTimer


class FillSpec(JobSpec):
    kind: Literal["fill"] = "fill"
    width: int = Field(ge=1, le=256)
    height: int = Field(ge=1, le=256)
    grey: int = Field(ge=0, le=255)


declare(JobKind(FillSpec, queue="fill", handler="fill_kind:FillHandler", stages=("fill", "encode", "upload")))


@dataclass(frozen=True)
class FillKey(BatchKey):
    pass


class FillHandler(JobHandler[FillSpec]):
    Key: ClassVar[type[BatchKey]] = FillKey
    pipelines: ClassVar[tuple[ResidentPipeline, ...]] = ()

    def prepare(self, record: JobRecord, spec: FillSpec, timer: StageTimer) -> tuple[FillKey, int]:
        return FillKey(spec.width, spec.height), spec.grey

    def run_batch(self, key: FillKey, items: list[int]) -> list[ModelOutput]:
        timer = StageTimer()
        with timer("fill"):
            images = [torch.full((3, key.height, key.width), grey / 255) for grey in items]
        return [ModelOutput(image, None, None, None, timer.ms) for image in images]

    def publish(self, record: JobRecord, spec: FillSpec, output: ModelOutput, timer: StageTimer) -> Published:
        provenance = Provenance(record.job_id, None, "none", None, TRAINED_ALGORITHMIC_MEDIA)
        return publish_image(self.storage, record, spec, output, provenance, keep_raw=False, timer=timer)
