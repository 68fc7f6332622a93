"""What every job kind's handler provides, and the image publishing two of them share.

A kind's declaration (``shared.contract.JobKind``) names its handler. The lifecycle
(``worker/lifecycle.py``) claims a job, then asks its kind's handler to ``prepare`` it
(checks, inputs, and the batch key that says which jobs may share a model call), hands the
item to the batcher, which calls ``run_batch`` on the model thread, and finally, unless the
job was cancelled meanwhile, asks the handler to ``publish`` it; once the record is
terminal, ``ended`` lets go of what only the job needed.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, ClassVar, Generic, TypeVar

import torch

from refiner.pixels import to_pil
from shared.contract import JobRecord, JobResult, JobSpec, Quality
from shared.images import CONTENT_TYPES, EXTENSIONS, Provenance, encode_image
from shared.objects import ObjectStore
from shared.settings import Settings
from worker.registry import ModelRegistry, ResidentPipeline
from worker.timing import StageTimer


@dataclass(frozen=True)
class BatchKey:
    """Jobs with equal keys share one model call. Each handler subclasses it, so keys of
    different kinds never compare equal and the key's class names its handler."""

    width: int
    height: int


@dataclass(frozen=True)
class Published:
    result: JobResult
    refiner: str | None  # the refiner version that ran, if any
    quality: Quality | None = None


SpecT = TypeVar("SpecT", bound=JobSpec)


class JobHandler(ABC, Generic[SpecT]):
    """The handler of the kind whose spec is ``SpecT``: the lifecycle hands it only that
    kind's jobs, with their spec typed as such."""

    Key: ClassVar[type[BatchKey]]
    # The registry's pipelines it needs resident (ModelRegistry.warm_up).
    pipelines: ClassVar[tuple[ResidentPipeline, ...]]

    def __init__(self, models: ModelRegistry, storage: ObjectStore, settings: Settings) -> None:
        self.models = models
        self.storage = storage
        self.settings = settings

    @property
    def generator(self) -> str | None:
        """The preset that generates this kind's images, for the record."""
        return None

    @abstractmethod
    def prepare(self, record: JobRecord, spec: SpecT, timer: StageTimer) -> tuple[BatchKey, Any]:
        """Check the job against what this worker serves and load its input. Runs in the
        job's own thread; raises ``RefineryError`` for a job that cannot run here."""

    @abstractmethod
    def run_batch(self, key: Any, items: list[Any]) -> list[Any]:
        """One model call for the batch; one output per item, each with the batch's
        ``timings_ms``. Runs on the batcher's model thread."""

    @abstractmethod
    def publish(self, record: JobRecord, spec: SpecT, output: Any, timer: StageTimer) -> Published:
        """Encode and upload the job's files (its S3 keys derive from the job, so a
        redelivery overwrites rather than duplicates)."""

    def ended(self, record: JobRecord, spec: SpecT) -> None:
        """The job's record is terminal (succeeded, failed or cancelled), so no delivery runs
        it again: let go of what only it needed."""


@dataclass(frozen=True)
class ModelOutput:
    raw: torch.Tensor  # (3, H, W) in [0, 1], or uint8 levels (to_pil takes both): the generated or input image
    refined: torch.Tensor | None  # (3, H, W), as ``raw``; None when the job did not ask for refinement
    refiner: str | None  # the refiner version that made ``refined``
    quality: Quality | None  # ``refined``'s judged detail ratio
    timings_ms: dict[str, float]  # of the whole batch


def publish_image(
    storage: ObjectStore,
    record: JobRecord,
    spec: JobSpec,
    output: ModelOutput,
    provenance: Provenance,
    *,
    keep_raw: bool,
    timer: StageTimer,
) -> Published:
    """Upload the refined image (or the raw one, when not refined), and the raw one too if asked."""
    fmt = spec.output_format
    final = output.refined if output.refined is not None else output.raw
    with timer("encode"):
        encoded = {"refined" if output.refiner else "image": encode_image(to_pil(final), fmt, provenance)}
        if keep_raw and output.refiner:
            encoded["raw"] = encode_image(to_pil(output.raw), fmt, provenance)
    with timer("upload"):
        uris = {
            name: storage.put(
                storage.job_uri(record.job_id, f"{name}.{EXTENSIONS[fmt]}"), data, CONTENT_TYPES[fmt], once=True
            )
            for name, data in encoded.items()
        }
    main_uri = uris.get("refined") or uris["image"]
    result = JobResult(
        uri=main_uri,
        url=storage.presign(main_uri),
        raw_uri=uris.get("raw"),
        raw_url=storage.presign(uris["raw"]) if "raw" in uris else None,
        width=final.shape[-1],
        height=final.shape[-2],
        format=fmt,
    )
    return Published(result, output.refiner, output.quality)
