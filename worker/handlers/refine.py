"""``refine_only``: the refiner alone, over an image the caller already has."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from refiner.pixels import to_pixels
from shared.contract import JobRecord, RefineSpec
from shared.images import ALGORITHMICALLY_ENHANCED, Provenance, decode_image
from worker.handlers.base import BatchKey, JobHandler, ModelOutput, Published, publish_image
from worker.registry import ResidentPipeline
from worker.timing import StageTimer


@dataclass(frozen=True)
class RefineKey(BatchKey):
    refiner: str  # the version the jobs run: a batch never mixes two


@dataclass(frozen=True)
class RefineItem:
    image: torch.Tensor  # (3, H, W) uint8
    drawn: bool  # the job drew its version (not pinned): its mark counts for the canary


class RefineJob(JobHandler[RefineSpec]):
    pipelines: ClassVar[tuple[ResidentPipeline, ...]] = ()
    Key: ClassVar[type[BatchKey]] = RefineKey

    def prepare(self, record: JobRecord, spec: RefineSpec, timer: StageTimer) -> tuple[RefineKey, RefineItem]:
        version = self.models.refiners.choose(record.job_id, spec.refiner_version)
        limits = {"max_bytes": self.settings.max_input_bytes}
        with timer("load_input"):
            data = self.storage.get(spec.input_uri, **limits)
            # 8-bit levels as decoded: the refiner converts them on its device (a quarter of the
            # bytes to move there), and the free model hands them straight to the encoder.
            image = to_pixels(decode_image(data, max_pixels=self.settings.max_input_pixels, **limits))
        return RefineKey(image.shape[-1], image.shape[-2], version), RefineItem(image, spec.refiner_version is None)

    def run_batch(self, key: RefineKey, items: list[RefineItem]) -> list[ModelOutput]:
        timer = StageTimer()
        with timer("refine"):
            images = torch.stack([item.image for item in items])
            refined, judged = self.models.refine(images, key.refiner, [item.drawn for item in items])
        return [
            ModelOutput(item.image, out, key.refiner, quality, timer.ms)
            for item, out, quality in zip(items, refined, judged, strict=True)
        ]

    def ended(self, record: JobRecord, spec: RefineSpec) -> None:
        # Only an upload to the job's own prefix (Client.submit_refine(image=...)) is ours to delete.
        if not spec.keep_input and spec.input_uri == self.storage.job_uri(record.job_id, "input"):
            self.storage.delete(spec.input_uri)

    def publish(self, record: JobRecord, spec: RefineSpec, output: ModelOutput, timer: StageTimer) -> Published:
        provenance = Provenance(
            job_id=record.job_id,
            generator=None,
            refiner=output.refiner or "none",
            seed=record.seed,
            digital_source_type=ALGORITHMICALLY_ENHANCED,
        )
        return publish_image(self.storage, record, spec, output, provenance, keep_raw=False, timer=timer)
