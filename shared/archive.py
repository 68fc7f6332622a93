"""Finished job records, kept beside their results in the bucket rather than in Redis.

A record lives in Redis while its job is queued or running (``job_ttl_s`` at most) and for
``record_linger_s`` after it ends; by then the worker that ended it has written it to
``jobs/<id>/job.json``, where the bucket's retention (``retention_days``) keeps it with the
results. Reads go to Redis first and to the bucket after that, so ``status``, ``wait``,
``cancel``, the gateway and callbacks see one record for as long as either keeps it.
Idempotency keys stay in Redis for ``job_ttl_s``: a resubmit still finds its job.
"""

from __future__ import annotations

from pydantic import ValidationError

from shared.contract import JobRecord
from shared.errors import InputNotFound, JobNotFound
from shared.objects import ObjectStore
from shared.records import RecordStore

RECORD_NAME = "job.json"


class RecordArchive:
    def __init__(self, store: RecordStore, objects: ObjectStore) -> None:
        self.store = store
        self.objects = objects

    def archive(self, record: JobRecord, linger_s: float) -> None:
        """Write a terminal record to the bucket, then let Redis drop it after ``linger_s``.
        Raises ``StorageUnavailable`` (the record then keeps its full time in Redis).

        Two processes archive a job with a callback: the worker that ended it, and the
        callbacks worker once the delivery is on the record. Their writes can land in either
        order, so each writes again until Redis still holds what it wrote: the last write to
        land is then of the latest record (a stale one lost the callback's outcome)."""
        uri = self.objects.job_uri(record.job_id, RECORD_NAME)
        while True:
            self.objects.put(uri, record.model_dump_json().encode(), "application/json")
            try:
                latest = self.store.get(record.job_id)
            except JobNotFound:  # gone from Redis: the bucket's copy is all there is
                return
            if latest == record:
                break
            record = latest
        self.store.linger(record.job_id, linger_s)

    def get(self, job_id: str) -> JobRecord:
        try:
            return self.store.get(job_id)
        except JobNotFound:
            pass
        try:
            raw = self.objects.get(self.objects.job_uri(job_id, RECORD_NAME))
        except InputNotFound:
            raise JobNotFound(f"no job {job_id!r} (unknown or expired)", field="job_id") from None
        try:
            return JobRecord.model_validate_json(raw)
        except ValidationError:  # not a record this service wrote: as good as none
            raise JobNotFound(f"no job {job_id!r} (its archived record is unreadable)", field="job_id") from None
