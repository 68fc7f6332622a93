"""A job's lifecycle, the same for every kind: claim the record, let the kind's handler
prepare it, run it in a batch, publish it, finish the record; or requeue it, fail it,
dead-letter it, let it go when it was cancelled meanwhile, or hand it back unstarted
when the worker drains.

No Celery here: tasks call ``JobRunner.run(job_id)``; everything the runner touches
(handlers, Redis, S3) comes in through its constructor. No per-kind code either: that is
in ``worker/handlers/``.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from pydantic import ValidationError

from shared.archive import RecordArchive
from shared.broker import Push
from shared.contract import JobError, JobRecord, JobResult, JobState, Quality, utcnow
from shared.errors import JobNotFound, RefineryError
from shared.objects import ObjectStore
from shared.records import RecordStore
from shared.settings import Settings
from worker import metrics
from worker.batcher import BatcherClosed, DynamicBatcher
from worker.handlers import Handlers
from worker.handlers.base import BatchKey
from worker.leases import LeaseKeeper
from worker.registry import ModelRegistry
from worker.timing import StageTimer

logger = logging.getLogger(__name__)


# Failures of the system rather than of the caller's input: an operator should look.
DEAD_LETTER_CODES = {"worker_lost", "internal_error", "storage_unavailable"}


class HandBack(Exception):
    """The worker is draining and has not started this job: its message goes back to the
    broker for another worker, and the attempt does not count."""


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
    quality: Quality | None = None


class JobRunner:
    def __init__(
        self,
        settings: Settings,
        registry: ModelRegistry,
        handlers: Handlers,
        batcher: DynamicBatcher,
        leases: LeaseKeeper,
        store: RecordStore,
        storage: ObjectStore,
        callback: Callable[[str, str], Push],
        worker_name: str,
    ) -> None:
        self.settings = settings
        self.registry = registry
        self.handlers = handlers
        self.batcher = batcher
        self.leases = leases
        self.store = store
        self.storage = storage
        self.callback = callback  # a callback's message: (job_id, event state) -> Push
        self.worker_name = worker_name
        self.draining = threading.Event()
        self.jobs_done = 0  # jobs this process brought to a terminal state
        self._done_lock = threading.Lock()
        self.archive = RecordArchive(store, storage)
        self._active: set[str] = set()  # jobs a delivery in this process is on
        self._active_lock = threading.Lock()

    def drain(self, timeout_s: float) -> bool:
        """Start no new job, and hand back those not yet on the model (their ``run``
        raises ``HandBack``). Wait up to ``timeout_s`` for the batch on the model to finish
        and publish; past that, hand its jobs back too. Returns whether it finished."""
        self.draining.set()
        self.batcher.close()
        deadline = time.monotonic() + timeout_s
        while self.leases.held():
            if time.monotonic() > deadline:
                self.batcher.abandon()
                return False
            time.sleep(0.05)
        return True

    def run(self, job_id: str) -> float | None:
        """Run one delivery of a job. Returns None when done with it, or the seconds after
        which it should be delivered again (held by another live worker, or retrying).
        Raises ``HandBack`` when the worker drains before the job reached the model."""
        with self._active_lock:
            if job_id in self._active:
                # A second message for a job this process is on (a redelivery, a re-send): its
                # lease says so to other workers; here, it is known without asking.
                logger.info("job %s: not run now (running here, retry in %s s)", job_id, self.settings.lease_s)
                return self.settings.lease_s
            self._active.add(job_id)
        try:
            return self._run(job_id)
        finally:
            with self._active_lock:
                self._active.discard(job_id)

    def _run(self, job_id: str) -> float | None:
        if self.draining.is_set():
            raise HandBack(job_id)
        try:
            claim = self._claim(job_id)
        except JobNotFound:
            # A late second message (a redelivery, a lost message sent again) of a job whose
            # record has left Redis: finished and archived after record_linger_s, or expired.
            logger.warning("job %s: not run (no record in Redis: it ended long ago, or expired)", job_id)
            return None
        except ValidationError as exc:
            logger.warning("job %s: record breaks the job contract: %s", job_id, exc.errors()[0]["msg"])
            self.store.fail_unreadable(job_id, f"the job record breaks the contract: {exc.errors()[0]['msg']}")
            return None
        if not claim.claimed:
            return claim.retry_in
        record = claim.record
        assert record is not None and record.started_at is not None  # the claim started it
        timer = StageTimer()
        timer.ms["queue_wait"] = round((record.started_at - record.created_at).total_seconds() * 1000, 3)
        try:
            outcome = self._process(record, timer)
            self._finish(job_id, JobState.succeeded, timer, outcome=outcome)
        except BatcherClosed:
            self._hand_back(job_id)
            raise HandBack(job_id) from None
        except RefineryError as exc:
            logger.warning("job %s: failed with %s: %s", job_id, exc.code, exc)
            self._finish(
                job_id, JobState.failed, timer, error=JobError(code=exc.code, message=exc.message, field=exc.field)
            )
        except Exception as exc:  # the job boundary: one bad job must not stop the worker
            logger.exception("job %s: internal error in attempt %d", job_id, record.attempts)
            error = JobError(code="internal_error", message=f"{type(exc).__name__}: {exc}")
            if record.attempts < self.settings.max_attempts:
                return self._requeue(job_id, error)
            self._finish(job_id, JobState.failed, timer, error=error)
        finally:
            self.leases.release(job_id)
        return None

    def _callback(self, record: JobRecord) -> Push | None:
        """The callback of the state ``record`` enters, if its caller asked for one: pushed in
        the transaction that enters it, so a worker killed right after cannot lose it."""
        if not record.spec.callback_url:
            return None
        if record.state.terminal or (record.state is JobState.running and self.settings.callback_on_running):
            return self.callback(record.job_id, record.state.value)
        return None

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
            if (
                record.state is JobState.running
                and record.lease_owner == self.leases.owner
                and not self.leases.holds(job_id)
            ):
                # This very claim, committed, whose reply a failover lost (redis-py reports it
                # as a conflict, so the mutation runs again): this process runs no such job,
                # so the job is still to start here, in the same attempt.
                self.leases.stamp(record)
                claim.claimed = True
                return record
            if (left := self.leases.time_left(record)) is not None:
                claim.retry_in = left
                return None
            now = utcnow()
            if record.expires_at is not None and now > record.expires_at:
                error = JobError(
                    code="expired", message=f"still queued at its deadline {record.expires_at.isoformat()}"
                )
            elif record.attempts >= self.settings.max_attempts:
                error = JobError(code="worker_lost", message=f"its worker died in all {record.attempts} attempts")
            else:
                record.state, record.started_at, record.worker = JobState.running, now, self.worker_name
                record.attempts += 1
                self.leases.stamp(record)
                claim.claimed = True
                return record
            record.state, record.finished_at, record.error = JobState.failed, now, error
            claim.ended = True
            return record

        claim.record = self.store.update(job_id, start, notify=self._callback)
        if claim.claimed:
            self.leases.hold(job_id)
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

    def _hand_back(self, job_id: str) -> None:
        """Undo this worker's claim: queued again, as if this delivery never happened."""

        def unclaim(record: JobRecord) -> JobRecord | None:
            if record.state is not JobState.running or record.lease_owner != self.leases.owner:
                return None
            record.state, record.attempts, record.started_at, record.worker = (
                JobState.queued,
                record.attempts - 1,
                None,
                None,
            )
            record.lease_owner = record.lease_expires_at = None
            return record

        self.store.update(job_id, unclaim)
        logger.info("job %s: handed back unstarted (draining)", job_id)

    def _ended(self, record: JobRecord) -> None:
        """A job just reached its terminal state (its callback went with it): count it,
        dead-letter a system failure, let go of its inputs, archive its record."""
        logger.info("job %s: %s %s", record.job_id, record.state.value, record.error.code if record.error else "")
        with self._done_lock:
            self.jobs_done += 1
        metrics.observe_job(record)
        if record.error is not None and record.error.code in DEAD_LETTER_CODES:
            self.store.dead_letter(record.job_id)
        if handler := self.handlers.by_kind.get(record.kind):
            try:
                handler.ended(record, record.spec)
            except RefineryError as exc:  # what is left behind, the bucket's retention expires
                logger.warning("job %s: letting go of its inputs failed: %s", record.job_id, exc)
        try:
            self.archive.archive(record, self.settings.record_linger_s)
        except RefineryError as exc:  # it stays in Redis for its full job_ttl_s instead
            logger.warning("job %s: archiving its record failed: %s", record.job_id, exc)

    def _process(self, record: JobRecord, timer: StageTimer) -> Outcome:
        handler = self.handlers.serving(record.kind)
        # The record's spec is of its kind (JobRecord checks), so of the handler's spec type.
        key, item = handler.prepare(record, record.spec, timer)
        # Blocks this job's thread until its batch has run on the model thread.
        batched = self.batcher.submit(key, item, priority=record.spec.priority.rank)
        timer.ms["batch_wait"] = round(batched.waited_s * 1000, 3)
        timer.ms.update(batched.result.timings_ms)
        if self.store.get(record.job_id).state is JobState.cancelled:
            return Outcome(None, None, batched.batch_size)  # cancelled while running: publish nothing
        published = handler.publish(record, record.spec, batched.result, timer)
        return Outcome(published.result, published.refiner, batched.batch_size, published.quality)

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
            record.generator = handler.generator if (handler := self.handlers.by_kind.get(record.kind)) else None
            if outcome is not None:
                record.result, record.refiner, record.batch_size = outcome.result, outcome.refiner, outcome.batch_size
                record.quality = outcome.quality
            timer.ms["total"] = round((record.finished_at - record.created_at).total_seconds() * 1000, 3)
            record.timings_ms = timer.ms
            return record

        record = self.store.update(job_id, finish, notify=self._callback)
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


def build_runner(
    settings: Settings, worker_name: str, kinds: list[str], callback: Callable[[str, str], Push]
) -> JobRunner:
    """Load and warm the models these job kinds (their names) need, before the worker consumes."""
    registry = ModelRegistry(settings)
    storage = ObjectStore(settings)
    handlers = Handlers(kinds, registry, storage, settings)
    registry.warm_up(handlers.pipelines)

    def on_model(key: BatchKey, items: list[Any]) -> Sequence[Any]:
        metrics.ON_MODEL.set(len(items))
        try:
            return handlers.run_batch(key, items)
        finally:
            metrics.ON_MODEL.set(0)

    batcher = DynamicBatcher(
        on_model,
        max_batch=lambda key: settings.max_batch_for(key.width, key.height),
        max_wait_s=settings.max_wait_ms / 1000,
    )
    store = RecordStore.from_settings(settings)
    leases = LeaseKeeper(store, settings.lease_s, worker_name)
    return JobRunner(settings, registry, handlers, batcher, leases, store, storage, callback, worker_name)
