"""Running one job: claim the record, run the models, encode, upload, finish the record.

No Celery here: tasks call ``JobRunner.run(job_id)``; everything the runner touches
(models, Redis, S3) comes in through its constructor.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from PIL import Image

from shared.errors import RefineryError
from shared.images import (
    ALGORITHMICALLY_ENHANCED,
    CONTENT_TYPES,
    EXTENSIONS,
    TRAINED_ALGORITHMIC_MEDIA,
    Provenance,
    decode_image,
    encode_image,
)
from shared.jobs import GenerateSpec, JobError, JobRecord, JobResult, JobState, RefineSpec, utcnow
from shared.settings import Settings
from shared.storage import Storage
from shared.store import JobStore
from worker.models import generate
from worker.registry import ModelRegistry

logger = logging.getLogger(__name__)


def to_pil(image: torch.Tensor) -> Image.Image:
    """(3, H, W) float in [0, 1] -> RGB image."""
    pixels = (image.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).contiguous()
    return Image.fromarray(pixels.numpy(), "RGB")


def to_tensor(image: Image.Image) -> torch.Tensor:
    """RGB image -> (1, 3, H, W) float in [0, 1]."""
    pixels = torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8)
    return pixels.view(image.height, image.width, 3).permute(2, 0, 1).unsqueeze(0).float() / 255


class StageTimer:
    """Milliseconds per named stage, for the job record's ``timings_ms``."""

    def __init__(self) -> None:
        self.ms: dict[str, float] = {}

    @contextmanager
    def __call__(self, stage: str) -> Iterator[None]:
        started = time.perf_counter()
        try:
            yield
        finally:
            self.ms[stage] = round((time.perf_counter() - started) * 1000, 3)


class JobRunner:
    def __init__(
        self,
        settings: Settings,
        registry: ModelRegistry,
        store: JobStore,
        storage: Storage,
        notify: Callable[[str, str], None],
        worker_name: str,
    ) -> None:
        self.settings = settings
        self.registry = registry
        self.store = store
        self.storage = storage
        self.notify = notify  # enqueues a callback: (job_id, event state)
        self.worker_name = worker_name

    def run(self, job_id: str) -> None:
        record, claimed = self._claim(job_id)
        if not claimed:
            logger.info("job %s: not run, it is %s", job_id, record.state.value)
            if record.error and record.error.code == "worker_lost":
                self._notify(record)
            return
        if self.settings.callback_on_running:
            self._notify(record)
        timer = StageTimer()
        timer.ms["queue_wait"] = round((record.started_at - record.created_at).total_seconds() * 1000, 3)
        try:
            result, refiner = self._process(record, timer)
            record = self._finish(job_id, JobState.succeeded, timer, result=result, refiner=refiner)
        except RefineryError as exc:
            logger.warning("job %s: failed with %s: %s", job_id, exc.code, exc)
            error = JobError(code=exc.code, message=exc.message, field=exc.field)
            record = self._finish(job_id, JobState.failed, timer, error=error)
        except Exception as exc:  # the job boundary: one bad job must not stop the worker
            logger.exception("job %s: internal error", job_id)
            error = JobError(code="internal_error", message=f"{type(exc).__name__}: {exc}")
            record = self._finish(job_id, JobState.failed, timer, error=error)
        if record.state.terminal:
            self._notify(record)

    def _notify(self, record: JobRecord) -> None:
        if record.spec.callback_url:
            self.notify(record.job_id, record.state.value)

    def _claim(self, job_id: str) -> tuple[JobRecord, bool]:
        """Mark the job running under this worker; returns the record and whether we hold it."""
        claimed = False

        def start(record: JobRecord) -> JobRecord | None:
            nonlocal claimed
            if record.state.terminal:
                return None
            if record.attempts >= self.settings.max_attempts:
                # Every earlier delivery started and never finished: its worker died each
                # time (out of memory, say). Requeueing it again would loop forever.
                record.state = JobState.failed
                record.finished_at = utcnow()
                record.error = JobError(code="worker_lost", message=f"its worker died in all {record.attempts} attempts")
                return record
            record.state = JobState.running
            record.attempts += 1
            record.started_at = utcnow()
            record.worker = self.worker_name
            claimed = True
            return record

        return self.store.update(job_id, start), claimed

    def _process(self, record: JobRecord, timer: StageTimer) -> tuple[JobResult | None, str | None]:
        """Returns the result (None when cancelled meanwhile) and the refiner version that ran."""
        spec = record.spec
        if isinstance(spec, GenerateSpec):
            preset = self.registry.preset
            with timer("generate"):
                images = generate(
                    self.registry.pipeline,
                    [spec.prompt],
                    [record.seed],
                    width=spec.width,
                    height=spec.height,
                    steps=spec.steps or preset.steps,
                    guidance=preset.guidance if spec.guidance is None else spec.guidance,
                    max_sequence_length=preset.max_sequence_length,
                )
            refine, keep_raw, source_type = spec.refine, spec.keep_raw, TRAINED_ALGORITHMIC_MEDIA
        else:
            images = self._load_input(spec, timer)
            refine, keep_raw, source_type = True, False, ALGORITHMICALLY_ENHANCED
        raw = images
        if refine:
            with timer("refine"):
                images = self.registry.refiner(images)

        refiner = self.registry.refiner.version if refine else None
        provenance = Provenance(
            job_id=record.job_id,
            generator=self.registry.preset.name if isinstance(spec, GenerateSpec) else None,
            refiner=refiner or "none",
            seed=record.seed,
            digital_source_type=source_type,
        )
        fmt = spec.output_format
        with timer("encode"):
            encoded = {"refined" if refine else "image": encode_image(to_pil(images[0]), fmt, provenance)}
            if keep_raw and refine:
                encoded["raw"] = encode_image(to_pil(raw[0]), fmt, provenance)

        if self.store.get(record.job_id).state is JobState.cancelled:
            return None, refiner  # cancelled while running: publish nothing
        with timer("upload"):
            uris = {
                name: self.storage.put(self.storage.job_uri(record.job_id, f"{name}.{EXTENSIONS[fmt]}"), data, CONTENT_TYPES[fmt])
                for name, data in encoded.items()
            }
        main_uri = uris.get("refined") or uris["image"]
        height, width = images.shape[-2:]
        return JobResult(
            uri=main_uri,
            url=self.storage.presign(main_uri),
            raw_uri=uris.get("raw"),
            raw_url=self.storage.presign(uris["raw"]) if "raw" in uris else None,
            width=width,
            height=height,
            format=fmt,
        ), refiner

    def _load_input(self, spec: RefineSpec, timer: StageTimer) -> torch.Tensor:
        with timer("load_input"):
            data = self.storage.get(spec.input_uri, max_bytes=self.settings.max_input_bytes)
            image = decode_image(data, max_bytes=self.settings.max_input_bytes, max_pixels=self.settings.max_input_pixels)
        return to_tensor(image)

    def _finish(
        self,
        job_id: str,
        state: JobState,
        timer: StageTimer,
        *,
        result: JobResult | None = None,
        refiner: str | None = None,
        error: JobError | None = None,
    ) -> JobRecord:
        def finish(record: JobRecord) -> JobRecord | None:
            # Only the worker that holds the job finishes it; a cancel that came first wins.
            if record.state is not JobState.running or record.worker != self.worker_name:
                return None
            record.state = state
            record.finished_at = utcnow()
            record.result = result
            record.error = error
            record.generator = self.registry.preset.name if record.kind == "generate_and_refine" else None
            record.refiner = refiner
            timer.ms["total"] = round((record.finished_at - record.created_at).total_seconds() * 1000, 3)
            record.timings_ms = timer.ms
            return record

        record = self.store.update(job_id, finish)
        logger.info("job %s: %s %s", job_id, record.state.value, record.timings_ms)
        return record
