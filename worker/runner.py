"""Running one job: claim the record, run the models, encode, upload, finish the record.

No Celery here: tasks call ``JobRunner.run(job_id)``; everything the runner touches
(models, Redis, S3) comes in through its constructor.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import dataclass

import torch
from PIL import Image
from pydantic import ValidationError

from shared.datasets import pair_uris
from shared.errors import InvalidInput, RefineryError
from shared.images import (
    ALGORITHMICALLY_ENHANCED,
    CONTENT_TYPES,
    EXTENSIONS,
    TRAINED_ALGORITHMIC_MEDIA,
    Provenance,
    decode_image,
    encode_image,
)
from shared.jobs import (
    GenerateSpec,
    JobError,
    JobRecord,
    JobResult,
    JobState,
    OutputFormat,
    PairSpec,
    RefineSpec,
    parse_s3_uri,
    utcnow,
)
from shared.settings import Settings
from shared.storage import Storage
from shared.store import JobStore
from worker import metrics
from worker.batcher import DynamicBatcher
from worker.batches import GenerateItem, GenerateKey, ModelOutput, PairKey, PairOutput, RefineKey
from worker.leases import LeaseKeeper
from worker.registry import ModelRegistry
from worker.timing import StageTimer

logger = logging.getLogger(__name__)


def to_pil(image: torch.Tensor) -> Image.Image:
    """(3, H, W) float in [0, 1] -> RGB image."""
    pixels = (image.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).contiguous()
    return Image.fromarray(pixels.numpy(), "RGB")


def to_tensor(image: Image.Image) -> torch.Tensor:
    """RGB image -> (1, 3, H, W) float in [0, 1]."""
    pixels = torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8)
    return pixels.view(image.height, image.width, 3).permute(2, 0, 1).unsqueeze(0).float() / 255


# Failures of the system rather than of the caller's input: an operator should look.
DEAD_LETTER_CODES = {"worker_lost", "internal_error", "storage_unavailable"}


@dataclass
class Claim:
    record: JobRecord | None = None
    claimed: bool = False  # this worker now holds the job
    ended: bool = False  # the claim itself failed the job (expired, worker_lost)
    retry_in: float | None = None  # held by another live worker: ask again after this


@dataclass
class Outcome:
    result: JobResult | None  # None when the job was cancelled while it ran
    refiner: str | None  # the refiner version that ran, if any
    batch_size: int


class JobRunner:
    def __init__(
        self,
        settings: Settings,
        registry: ModelRegistry,
        batcher: DynamicBatcher,
        leases: LeaseKeeper,
        store: JobStore,
        storage: Storage,
        notify: Callable[[str, str], None],
        worker_name: str,
    ) -> None:
        self.settings = settings
        self.registry = registry
        self.batcher = batcher
        self.leases = leases
        self.store = store
        self.storage = storage
        self.notify = notify  # enqueues a callback: (job_id, event state)
        self.worker_name = worker_name

    def run(self, job_id: str) -> float | None:
        """Run one delivery of a job. Returns None when done with it, or the seconds after
        which it should be delivered again (held by another live worker, or retrying)."""
        try:
            claim = self._claim(job_id)
        except ValidationError as exc:
            logger.warning("job %s: record breaks the job contract: %s", job_id, exc.errors()[0]["msg"])
            self.store.fail_unreadable(job_id, f"the job record breaks the contract: {exc.errors()[0]['msg']}")
            return None
        if not claim.claimed:
            return claim.retry_in
        record = claim.record
        if self.settings.callback_on_running:
            self._notify(record)
        timer = StageTimer()
        timer.ms["queue_wait"] = round((record.started_at - record.created_at).total_seconds() * 1000, 3)
        try:
            outcome = self._process(record, timer)
            self._finish(job_id, JobState.succeeded, timer, outcome=outcome)
        except RefineryError as exc:
            logger.warning("job %s: failed with %s: %s", job_id, exc.code, exc)
            self._finish(job_id, JobState.failed, timer, error=JobError(code=exc.code, message=exc.message, field=exc.field))
        except Exception as exc:  # the job boundary: one bad job must not stop the worker
            logger.exception("job %s: internal error in attempt %d", job_id, record.attempts)
            error = JobError(code="internal_error", message=f"{type(exc).__name__}: {exc}")
            if record.attempts < self.settings.max_attempts:
                return self._requeue(job_id, error)
            self._finish(job_id, JobState.failed, timer, error=error)
        finally:
            self.leases.release(job_id)
        return None

    def _notify(self, record: JobRecord) -> None:
        if record.spec.callback_url:
            self.notify(record.job_id, record.state.value)

    def _claim(self, job_id: str) -> Claim:
        """Mark the job running under this worker, unless it must not run now.

        Not run: a finished or cancelled job (a redelivery: nothing to do), one that a live
        worker holds (retry when its lease would run out), one past its deadline
        (failed: expired), one whose worker died in every attempt so far (failed:
        worker_lost; requeueing a job that kills its worker would loop forever).
        """
        claim = Claim()

        def start(record: JobRecord) -> JobRecord | None:
            # The mutation may run again after a concurrent write: start from scratch.
            claim.claimed, claim.ended, claim.retry_in = False, False, None
            if record.state.terminal:
                return None
            if (left := self.leases.time_left(record)) is not None:
                claim.retry_in = left
                return None
            now = utcnow()
            if record.expires_at is not None and now > record.expires_at:
                error = JobError(code="expired", message=f"still queued at its deadline {record.expires_at.isoformat()}")
            elif record.attempts >= self.settings.max_attempts:
                error = JobError(code="worker_lost", message=f"its worker died in all {record.attempts} attempts")
            else:
                record.state, record.started_at, record.worker = JobState.running, now, self.worker_name
                record.attempts += 1
                self.leases.take(record)
                claim.claimed = True
                return record
            record.state, record.finished_at, record.error = JobState.failed, now, error
            claim.ended = True
            return record

        claim.record = self.store.update(job_id, start)
        if claim.ended:
            self._ended(claim.record)
        elif not claim.claimed:
            logger.info("job %s: not run now (%s, retry in %s s)", job_id, claim.record.state.value, claim.retry_in)
        return claim

    def _requeue(self, job_id: str, error: JobError) -> float:
        """Back to queued after an unexpected error; the next attempt comes after a backoff."""

        def requeue(record: JobRecord) -> JobRecord | None:
            if record.state is not JobState.running or record.lease_owner != self.leases.owner:
                return None
            record.state, record.error, record.lease_owner, record.lease_expires_at = JobState.queued, error, None, None
            return record

        record = self.store.update(job_id, requeue)
        return float(2**record.attempts)

    def _ended(self, record: JobRecord) -> None:
        """A job just reached its terminal state: count it, dead-letter a system failure, tell the caller."""
        logger.info("job %s: %s %s", record.job_id, record.state.value, record.error.code if record.error else "")
        metrics.observe_job(record)
        if record.error is not None and record.error.code in DEAD_LETTER_CODES:
            self.store.dead_letter(record.job_id)
        self._notify(record)

    def _process(self, record: JobRecord, timer: StageTimer) -> Outcome:
        spec = record.spec
        if isinstance(spec, PairSpec):
            return self._process_pair(record, spec, timer)
        if isinstance(spec, GenerateSpec):
            preset = self.registry.preset
            steps = spec.steps or preset.steps
            guidance = preset.guidance if spec.guidance is None else spec.guidance
            key = GenerateKey(spec.width, spec.height, steps, guidance)
            item = GenerateItem(spec.prompt, record.seed, spec.refine)
            keep_raw, source_type = spec.keep_raw, TRAINED_ALGORITHMIC_MEDIA
        else:
            image = self._load_input(spec, timer)  # (3, H, W)
            key, item = RefineKey(image.shape[-1], image.shape[-2]), image
            keep_raw, source_type = False, ALGORITHMICALLY_ENHANCED
        # Blocks this job's thread until its batch has run on the model thread.
        batched = self.batcher.submit(key, item, priority=spec.priority.rank)
        output: ModelOutput = batched.result
        timer.ms["batch_wait"] = round(batched.waited_s * 1000, 3)
        timer.ms.update(output.timings_ms)

        refiner = self.registry.refiner.version if output.refined is not None else None
        provenance = Provenance(
            job_id=record.job_id,
            generator=self.registry.preset.name if isinstance(spec, GenerateSpec) else None,
            refiner=refiner or "none",
            seed=record.seed,
            digital_source_type=source_type,
        )
        fmt = spec.output_format
        final = output.refined if output.refined is not None else output.raw
        with timer("encode"):
            encoded = {"refined" if refiner else "image": encode_image(to_pil(final), fmt, provenance)}
            if keep_raw and refiner:
                encoded["raw"] = encode_image(to_pil(output.raw), fmt, provenance)
        outcome = Outcome(None, refiner, batched.batch_size)
        if self.store.get(record.job_id).state is JobState.cancelled:
            return outcome  # cancelled while running: publish nothing

        with timer("upload"):
            uris = {
                name: self.storage.put(self.storage.job_uri(record.job_id, f"{name}.{EXTENSIONS[fmt]}"), data, CONTENT_TYPES[fmt])
                for name, data in encoded.items()
            }
        main_uri = uris.get("refined") or uris["image"]
        outcome.result = JobResult(
            uri=main_uri,
            url=self.storage.presign(main_uri),
            raw_uri=uris.get("raw"),
            raw_url=self.storage.presign(uris["raw"]) if "raw" in uris else None,
            width=final.shape[-1],
            height=final.shape[-2],
            format=fmt,
        )
        return outcome

    def _process_pair(self, record: JobRecord, spec: PairSpec, timer: StageTimer) -> Outcome:
        """Student and teacher images for one prompt and seed, then the manifest row."""
        served = {"student": self.registry.preset.name, "teacher": self.registry.teacher_preset.name}
        for role, preset in served.items():
            if getattr(spec, role) != preset:
                raise InvalidInput(f"this worker serves {preset!r}, not {getattr(spec, role)!r}", field=role)
        if parse_s3_uri(spec.dataset + "/x")[0] != self.settings.s3_bucket:
            raise InvalidInput(f"datasets are written to the bucket {self.settings.s3_bucket!r} only", field="dataset")

        batched = self.batcher.submit(PairKey(spec.width, spec.height), GenerateItem(spec.prompt, spec.seed, False), spec.priority.rank)
        output: PairOutput = batched.result
        timer.ms["batch_wait"] = round(batched.waited_s * 1000, 3)
        timer.ms.update(output.timings_ms)
        with timer("encode"):
            encoded = {
                role: encode_image(
                    to_pil(getattr(output, role)),
                    OutputFormat.png,
                    Provenance(record.job_id, preset, "none", spec.seed, TRAINED_ALGORITHMIC_MEDIA),
                )
                for role, preset in served.items()
            }
        outcome = Outcome(None, None, batched.batch_size)
        if self.store.get(record.job_id).state is JobState.cancelled:
            return outcome

        uris = pair_uris(spec.dataset, spec.pair_id)
        row = {
            "pair_id": spec.pair_id,
            "prompt": spec.prompt,
            "attributes": spec.attributes,
            "seed": spec.seed,
            "width": spec.width,
            "height": spec.height,
            **{role: self._preset_row(role) for role in served},
            # Per image: the batch's time shared by its images (what a pair costs).
            "timings_ms": {role: round(output.timings_ms[role] / batched.batch_size, 3) for role in served},
            "batch_size": batched.batch_size,
            "job_id": record.job_id,
        }
        with timer("upload"):
            for role in served:
                self.storage.put(uris[role], encoded[role], CONTENT_TYPES[OutputFormat.png])
            # Last: a manifest row means a complete pair (what resuming relies on).
            self.storage.put(uris["manifest"], json.dumps(row).encode(), "application/json")
        outcome.result = JobResult(uri=uris["manifest"], width=spec.width, height=spec.height, format=OutputFormat.png, files=uris)
        return outcome

    def _preset_row(self, role: str) -> dict:
        preset = self.registry.preset if role == "student" else self.registry.teacher_preset
        return {"preset": preset.name, "steps": preset.steps, "guidance": preset.guidance}

    def _load_input(self, spec: RefineSpec, timer: StageTimer) -> torch.Tensor:
        with timer("load_input"):
            data = self.storage.get(spec.input_uri, max_bytes=self.settings.max_input_bytes)
            image = decode_image(data, max_bytes=self.settings.max_input_bytes, max_pixels=self.settings.max_input_pixels)
        return to_tensor(image)[0]

    def _finish(
        self,
        job_id: str,
        state: JobState,
        timer: StageTimer,
        *,
        outcome: Outcome | None = None,
        error: JobError | None = None,
    ) -> JobRecord:
        finished = False

        def finish(record: JobRecord) -> JobRecord | None:
            nonlocal finished
            # Only the worker that holds the job finishes it; a cancel that came first wins.
            finished = record.state is JobState.running and record.lease_owner == self.leases.owner
            if not finished:
                return None
            record.state = state
            record.finished_at = utcnow()
            record.lease_owner = record.lease_expires_at = None
            record.error = error
            record.generator = self.registry.preset.name if record.kind == "generate_and_refine" else None
            if outcome is not None:
                record.result, record.refiner, record.batch_size = outcome.result, outcome.refiner, outcome.batch_size
            timer.ms["total"] = round((record.finished_at - record.created_at).total_seconds() * 1000, 3)
            record.timings_ms = timer.ms
            return record

        record = self.store.update(job_id, finish)
        if finished:
            self._ended(record)
        elif record.state is JobState.cancelled and record.lease_owner == self.leases.owner:
            self._let_go_cancelled(job_id, uploaded=outcome is not None and outcome.result is not None)
        return record

    def _let_go_cancelled(self, job_id: str, *, uploaded: bool) -> None:
        """Cancelled while it ran: take back anything published, then clear the lease, so
        a cancelled record without a lease owner means the worker is done with it."""
        if uploaded:
            self.storage.delete_job_objects(job_id)

        def let_go(record: JobRecord) -> JobRecord | None:
            if record.lease_owner != self.leases.owner:
                return None
            record.lease_owner = record.lease_expires_at = None
            return record

        self.store.update(job_id, let_go)
        logger.info("job %s: cancelled while running; nothing published", job_id)
