"""Delivering a job's status callback and recording how it went.

Runs in the callbacks worker (a thread pool, no models), so a slow or dead receiver never
holds up a GPU.
"""

from __future__ import annotations

import logging

from shared.archive import RecordArchive
from shared.callbacks import CallbackFailed, deliver
from shared.contract import CallbackStatus, JobRecord, utcnow
from shared.errors import JobNotFound, StorageUnavailable
from shared.settings import Settings

logger = logging.getLogger(__name__)


def callback_payload(record: JobRecord, event: str) -> dict:
    """Standard Webhooks' payload shape: type, timestamp, data."""
    return {
        "type": f"job.{event}",
        "timestamp": utcnow().isoformat(),
        "data": record.model_dump(mode="json"),
    }


def deliver_job_callback(settings: Settings, records: RecordArchive, job_id: str, event: str) -> None:
    """One delivery attempt of the job's ``event`` (the state it entered); raises
    CallbackFailed when it should be retried. The data is the record as it is now."""
    try:
        record = records.get(job_id)
    except StorageUnavailable as exc:
        # The record has left Redis (record_linger_s) and the bucket is out of reach for now:
        # nothing was sent, so a retry cannot duplicate the callback; dropping it would lose it.
        raise CallbackFailed(f"the job's record could not be read: {exc}") from exc
    url = record.spec.callback_url
    assert url is not None, "callbacks are only enqueued for jobs that asked for one"
    secret = settings.callback_secret.get_secret_value() if settings.callback_secret else None
    # The same id on every retry of one event lets receivers drop duplicates.
    msg_id = f"msg_{job_id}_{event}"
    status: int | None = None
    error: str | None = None
    try:
        status = deliver(
            url,
            callback_payload(record, event),
            msg_id=msg_id,
            secret=secret,
            timeout_s=settings.callback_timeout_s,
            allowlist=settings.callback_allowlist,
        )
    except CallbackFailed as exc:
        status, error = exc.status, str(exc)
        raise
    except Exception as exc:
        error = f"{type(exc).__name__}: {exc}"
        raise
    finally:
        _record_attempt(settings, records, job_id, url, status, error)
    logger.info("job %s: callback delivered (%s)", job_id, status)


def _record_attempt(
    settings: Settings, records: RecordArchive, job_id: str, url: str, status: int | None, error: str | None
) -> None:
    def mutate(record: JobRecord) -> JobRecord:
        previous = record.callback or CallbackStatus(url=url)
        record.callback = CallbackStatus(
            url=url,
            attempts=previous.attempts + 1,
            delivered=error is None,
            last_status=status,
            last_error=error,
            last_attempt_at=utcnow(),
        )
        return record

    try:
        record = records.store.update(job_id, mutate)
    except JobNotFound:  # in the bucket only by now: the outcome is in the log alone
        logger.warning("job %s: callback attempt not recorded (the record left Redis)", job_id)
        return
    if record.state.terminal:
        # The archived copy is what status shows once Redis drops the record: keep it current.
        records.archive(record, settings.record_linger_s)
