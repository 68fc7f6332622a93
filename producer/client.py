"""The producer's Python API: submit jobs, follow them, cancel them.

    client = Client()
    job = client.submit_generate("portrait of an elderly fisherman, golden hour", seed=7)
    record = job.wait(timeout=120)
    print(record.result.url)

Everything is validated here, before anything reaches Redis, so bad input fails at submit
time with the offending field named (``shared.errors.InvalidInput``).
"""

from __future__ import annotations

import hashlib
import secrets
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import cached_property
from typing import Any

import redis
from kombu.exceptions import OperationalError
from redis.sentinel import MasterNotFoundError

from shared.archive import RecordArchive
from shared.broker import Push, callback_push, job_push, make_celery
from shared.callbacks import check_callback_url
from shared.contract import GenerateSpec, JobRecord, JobSpec, JobState, PairSpec, RefineSpec, build_spec, parse_s3_uri
from shared.errors import BrokerUnavailable, InvalidImage, InvalidInput, JobNotFound, QueueFull
from shared.images import decode_image
from shared.objects import ObjectStore
from shared.presets import get_preset
from shared.records import RecordStore
from shared.refiner_registry import RefinerRegistry, parse_ref
from shared.settings import Settings, get_settings


@dataclass(frozen=True)
class JobHandle:
    job_id: str
    client: Client

    def status(self) -> JobRecord:
        return self.client.status(self.job_id)

    def wait(self, timeout: float | None = None) -> JobRecord:
        return self.client.wait(self.job_id, timeout)

    def cancel(self) -> JobRecord:
        return self.client.cancel(self.job_id)


class Client:
    def __init__(self, settings: Settings | None = None) -> None:
        self.settings = settings or get_settings()
        self.store = RecordStore.from_settings(self.settings)

    @cached_property
    def celery(self):
        return make_celery(self.settings)

    @cached_property
    def storage(self) -> ObjectStore:
        return ObjectStore(self.settings)

    @cached_property
    def records(self) -> RecordArchive:
        """Job records wherever they are: Redis, or the bucket once finished a while."""
        return RecordArchive(self.store, self.storage)

    @cached_property
    def refiners(self) -> RefinerRegistry:
        return RefinerRegistry(self.storage)

    def submit_generate(self, prompt: str, *, tenant: str | None = None, **fields: Any) -> JobHandle:
        """Queue a generate-and-refine job; see ``shared.contract.GenerateSpec`` for the fields."""
        spec = build_spec(GenerateSpec, prompt=prompt, **fields)
        return self.submit(spec, seed=self.generate_seed(spec), tenant=tenant)

    def generate_seed(self, spec: GenerateSpec) -> int:
        """The seed to record for a generate job, once its size is one the preset makes.
        Drawn here, not in the worker, so a redelivered job makes the same image."""
        get_preset(self.settings.model_preset).check_size(spec.width, spec.height)
        return spec.seed if spec.seed is not None else secrets.randbelow(2**32)

    def submit_pair(self, prompt: str, *, dataset: str, pair_id: str, **fields: Any) -> JobHandle:
        """Queue one dataset pair (see ``shared.contract.PairSpec``); resubmitting the same pair
        of the same dataset returns the job already made for it."""
        dataset_tag = hashlib.sha1(dataset.rstrip("/").encode()).hexdigest()[:16]
        spec = build_spec(
            PairSpec,
            prompt=prompt,
            dataset=dataset,
            pair_id=pair_id,
            idempotency_key=f"pair:{dataset_tag}:{pair_id}",
            **fields,
        )
        get_preset(spec.student).check_size(spec.width, spec.height)
        return self.submit(spec, seed=spec.seed)

    def submit_refine(
        self, *, input_uri: str | None = None, image: bytes | None = None, tenant: str | None = None, **fields: Any
    ) -> JobHandle:
        """Queue a refine-only job for an S3 object or for image bytes sent inline."""
        if (input_uri is None) == (image is None):
            raise InvalidImage("give exactly one of input_uri or image", field="input")
        job_id = uuid.uuid4().hex
        if image is not None:
            # Checked and stored under the job's own prefix now, so the broker message stays
            # small and a bad upload fails here rather than in the worker.
            decode_image(image, max_bytes=self.settings.max_input_bytes, max_pixels=self.settings.max_input_pixels)
            input_uri = self.storage.job_uri(job_id, "input")
        spec: RefineSpec = build_spec(RefineSpec, input_uri=input_uri, **fields)
        self.check_readable(spec.input_uri)
        with _broker():
            first = self.store.find_idempotent(spec.idempotency_key) if spec.idempotency_key else None
        if first:
            return JobHandle(first, self)
        self._check_outside(spec)
        if image is None:
            return self._submit(spec, job_id=job_id, tenant=tenant)
        self.storage.put(spec.input_uri, image, "application/octet-stream")
        try:
            return self._submit(spec, job_id=job_id, tenant=tenant)
        except QueueFull:  # refused: the upload goes too, so a refused job leaves nothing behind
            self.storage.delete(spec.input_uri)
            raise

    def check_readable(self, input_uri: str) -> None:
        bucket, _ = parse_s3_uri(input_uri)
        if bucket not in self.settings.readable_buckets:
            raise InvalidInput(f"bucket {bucket!r} is not readable by this service", field="input_uri")

    def submit(self, spec: JobSpec, *, seed: int | None = None, tenant: str | None = None) -> JobHandle:
        """Queue a job of any declared kind from its validated spec (``submit_generate`` and
        the others build theirs and check what only they know first)."""
        self._check_outside(spec)
        return self._submit(spec, seed=seed, tenant=tenant)

    def checked_record(
        self, spec: JobSpec, *, seed: int | None = None, job_id: str | None = None, tenant: str | None = None
    ) -> JobRecord:
        """The record ``submit`` would write, after its checks but the queue's depth: for a
        writer that checks the depth and writes the record and message in one step itself
        (the gateway's admission, producer/gateway/admission.py)."""
        self._check_outside(spec)
        return JobRecord(job_id=job_id or uuid.uuid4().hex, kind=spec.kind, spec=spec, seed=seed, tenant=tenant)

    def _check_outside(self, spec: JobSpec) -> None:
        """The checks that need the outside world (DNS, the bucket): before anything is written."""
        if spec.callback_url:
            check_callback_url(spec.callback_url, self.settings.callback_allowlist)
        # A pin must name a published version (the kinds that refine have the field).
        if pin := getattr(spec, "refiner_version", None):
            self.refiners.get(*parse_ref(pin, field="refiner_version"))

    def _submit(
        self, spec: JobSpec, *, seed: int | None = None, job_id: str | None = None, tenant: str | None = None
    ) -> JobHandle:
        # tenant: who submitted it through the gateway (producer/gateway), recorded on the job.
        record = JobRecord(job_id=job_id or uuid.uuid4().hex, kind=spec.kind, spec=spec, seed=seed, tenant=tenant)
        with _broker():
            # Refuses a job whose queue is full rather than let latency grow without bound.
            job_id, created = self.store.create(
                record,
                spec.idempotency_key,
                job_push(self.celery, record, self.settings),
                max_depth=self.settings.max_queue_depth,
            )
            if not created:
                record = self.records.get(job_id)
            if created or record.state is JobState.queued:
                # Returns once the replicas hold the record and its message, so a failover
                # cannot lose the job; a resubmit after BrokerUnavailable checks it again.
                self.store.replicate(record.job_id, record.state.value, required=True)
        return JobHandle(record.job_id, self)

    def handle(self, job_id: str) -> JobHandle:
        return JobHandle(job_id, self)

    def status(self, job_id: str) -> JobRecord:
        return self.records.get(job_id)

    def wait(self, job_id: str, timeout: float | None = None) -> JobRecord:
        # One GET for a job that has ended (in Redis or the bucket); a subscription otherwise.
        record = self.records.get(job_id)
        return record if record.state.terminal else self.store.wait(job_id, timeout)

    def cancel(self, job_id: str) -> JobRecord:
        """A queued job is never run; a running one ends ``cancelled`` and publishes nothing."""

        def callback(record: JobRecord) -> Push | None:
            return (
                callback_push(self.celery, job_id, record.state.value, self.settings)
                if record.spec.callback_url
                else None
            )

        try:
            record, _ = self.store.cancel(job_id, notify=callback)
        except JobNotFound:  # finished long enough ago to be in the bucket only: nothing to cancel
            return self.records.get(job_id)
        return record


@contextmanager
def _broker() -> Iterator[None]:
    """Redis still unreachable once the client's own retries (``redis_retry_s``) are spent:
    a typed, retryable error instead of redis-py's or kombu's."""
    try:
        yield
    except redis.AuthenticationError:
        raise  # not unavailable: misconfigured
    except (redis.ConnectionError, redis.TimeoutError, OperationalError) as exc:
        # redis-py's own message lists every Sentinel client it tried, at length.
        detail = "no Sentinel names a reachable primary" if isinstance(exc, MasterNotFoundError) else str(exc)
        raise BrokerUnavailable(
            f"Redis unreachable ({detail}); retry, with the same idempotency_key to get the same job", field="redis"
        ) from exc
