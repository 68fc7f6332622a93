"""The job contract (v1): what a producer submits, the job kinds, and what the record says.

Specs are validated when a producer builds them, so bad input fails at submit time with
the offending field named. Each job kind is declared once (``JobKind``, ``declare``): its
spec, queue, handler and stages; the routing table, the default queues and the metrics'
stages are read from those declarations. The record is what Redis stores and what
``status`` returns.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, SerializeAsAny, ValidationError, field_validator, model_validator

from shared import keys
from shared.errors import InvalidInput
from shared.presets import SMALLEST_SIZE

MAX_SIZE = 2048
SIZE_MULTIPLE = 16
MAX_SEED = 2**63 - 1
MAX_METADATA_CHARS = 8192
# Nesting levels of metadata: the record's JSON serializer gives up near 255, after the
# job was accepted; refused here instead, with the field named.
MAX_METADATA_DEPTH = 32
# A published refiner version, NAME@VERSION: the version is the first 12 hex digits of its
# weights' SHA-256 (shared/refiner_registry.py).
REFINER_NAME = r"[a-z0-9][a-z0-9._-]{0,63}"
REFINER_VERSION = r"[0-9a-f]{12}"


class JobState(StrEnum):
    queued = "queued"
    running = "running"
    succeeded = "succeeded"
    failed = "failed"
    cancelled = "cancelled"

    @property
    def terminal(self) -> bool:
        return self in (JobState.succeeded, JobState.failed, JobState.cancelled)


class Priority(StrEnum):
    high = "high"
    normal = "normal"
    low = "low"

    @property
    def rank(self) -> int:
        """Broker priority: Celery's Redis transport serves lower numbers first."""
        return {"high": 0, "normal": 3, "low": 6}[self.value]


class OutputFormat(StrEnum):
    png = "png"
    webp = "webp"
    jpeg = "jpeg"


_S3_URI = re.compile(r"^s3://(?P<bucket>[a-z0-9][a-z0-9.\-]{1,61}[a-z0-9])/(?P<key>.+)$")


def parse_s3_uri(uri: str) -> tuple[str, str]:
    """Split ``s3://bucket/key``; refuse keys that climb out of their prefix."""
    match = _S3_URI.match(uri)
    if not match:
        raise ValueError(f"expected s3://bucket/key, got {uri!r}")
    key = match["key"]
    if any(part in ("", ".", "..") for part in key.split("/")):
        raise ValueError(f"S3 key must not contain empty, '.' or '..' segments: {key!r}")
    return match["bucket"], key


def _depth(value: Any) -> int:
    """Nesting levels of a JSON value (a scalar: 0), counted without recursion."""
    deepest, pending = 0, [(value, 0)]
    while pending:
        item, level = pending.pop()
        deepest = max(deepest, level)
        children = item.values() if isinstance(item, dict) else item if isinstance(item, list) else ()
        pending.extend((child, level + 1) for child in children)
    return deepest


class JobSpec(BaseModel):
    """What every kind's spec has. Each kind's spec pins ``kind`` to its own name, the
    JSON ``kind`` value of the wire contract."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: str
    output_format: OutputFormat = OutputFormat.png
    callback_url: str | None = Field(None, max_length=2048)
    idempotency_key: str | None = Field(None, min_length=1, max_length=200, pattern=r"^[\w.:\-]+$")
    metadata: dict[str, Any] = Field(default_factory=dict)
    priority: Priority = Priority.normal
    # Seconds after submit; a job still queued by then fails with "expired" instead of running.
    deadline_s: float | None = Field(None, gt=0, le=7 * 24 * 3600)

    @field_validator("callback_url")
    @classmethod
    def _http_url(cls, url: str | None) -> str | None:
        if url is not None and not re.match(r"^https?://[^/\s]+", url):
            raise ValueError("must be an http:// or https:// URL")
        return url

    @field_validator("metadata")
    @classmethod
    def _small_metadata(cls, metadata: dict[str, Any]) -> dict[str, Any]:
        try:
            size = len(json.dumps(metadata))
        except (TypeError, ValueError, RecursionError) as exc:
            raise ValueError(f"must be JSON-serialisable: {exc}") from None
        if size > MAX_METADATA_CHARS:
            raise ValueError(f"must serialise to at most {MAX_METADATA_CHARS} characters of JSON")
        if _depth(metadata) > MAX_METADATA_DEPTH:
            raise ValueError(f"must nest at most {MAX_METADATA_DEPTH} levels deep")
        return metadata


class GenerateSpec(JobSpec):
    kind: Literal["generate_and_refine"] = "generate_and_refine"
    prompt: str = Field(min_length=1, max_length=2000)
    seed: int | None = Field(None, ge=0, le=MAX_SEED, strict=True)
    width: int = Field(1024, ge=SMALLEST_SIZE, le=MAX_SIZE, multiple_of=SIZE_MULTIPLE, strict=True)
    height: int = Field(1024, ge=SMALLEST_SIZE, le=MAX_SIZE, multiple_of=SIZE_MULTIPLE, strict=True)
    # None: the preset's own default (4 steps / guidance 0 for schnell, 28 / 3.5 for dev).
    steps: int | None = Field(None, ge=1, le=100, strict=True)
    guidance: float | None = Field(None, ge=0, le=20)
    refine: bool = True
    keep_raw: bool = False
    # Run this published refiner version instead of the one the channels draw (NAME@VERSION).
    refiner_version: str | None = Field(None, pattern=rf"^{REFINER_NAME}@{REFINER_VERSION}$")

    @field_validator("prompt")
    @classmethod
    def _not_blank(cls, prompt: str) -> str:
        if not prompt.strip():
            raise ValueError("must contain non-whitespace characters")
        return prompt

    @model_validator(mode="after")
    def _pin_needs_refine(self) -> GenerateSpec:
        if self.refiner_version is not None and not self.refine:
            raise ValueError("refiner_version names a refiner for a job with refine=false")
        return self


class RefineSpec(JobSpec):
    kind: Literal["refine_only"] = "refine_only"
    # Inline images are uploaded by the producer to the job's own prefix at submit time,
    # so the spec the worker sees always names an S3 object.
    input_uri: str
    refiner_version: str | None = Field(None, pattern=rf"^{REFINER_NAME}@{REFINER_VERSION}$")
    # An inline upload is deleted once the job ends, unless kept (then the bucket's retention
    # expires it with the results); an s3:// input the caller names is never deleted.
    keep_input: bool = False

    @field_validator("input_uri")
    @classmethod
    def _s3_uri(cls, uri: str) -> str:
        parse_s3_uri(uri)
        return uri


class PairSpec(JobSpec):
    """One training pair: the same prompt and seed through the student and the teacher.

    Written to ``<dataset>/pairs/<pair_id>/{student,teacher}.png`` and
    ``<dataset>/manifest/<pair_id>.json`` (``shared.datasets``).
    """

    kind: Literal["pair"] = "pair"
    prompt: str = Field(min_length=1, max_length=2000)
    seed: int = Field(ge=0, le=MAX_SEED, strict=True)
    width: int = Field(1024, ge=SMALLEST_SIZE, le=MAX_SIZE, multiple_of=SIZE_MULTIPLE, strict=True)
    height: int = Field(1024, ge=SMALLEST_SIZE, le=MAX_SIZE, multiple_of=SIZE_MULTIPLE, strict=True)
    dataset: str  # s3://bucket/prefix
    pair_id: str = Field(pattern=r"^[\w\-]{1,64}$")
    attributes: dict[str, str] = Field(default_factory=dict)
    # The presets the producer expects; a pairs worker serving others refuses the job.
    student: str
    teacher: str

    @field_validator("dataset")
    @classmethod
    def _s3_prefix(cls, uri: str) -> str:
        parse_s3_uri(uri.rstrip("/") + "/x")
        return uri.rstrip("/")


@dataclass(frozen=True)
class JobKind:
    """Everything that belongs to one job kind.

    A kind has two names. Its wire name is its spec's ``kind`` value (``generate_and_refine``):
    the JSON ``kind``, its Celery task (``refinery.generate_and_refine``), its metrics label
    and its key in REFINERY_QUEUES; foreign producers rely on it, so it never changes. Its
    short name (``generate``) names its pieces: the spec (``GenerateSpec``), the handler's
    module (``worker/handlers/generate.py``), the default queue and ``refinery submit
    generate``.
    """

    spec: type[JobSpec]
    queue: str  # its queue's default name; REFINERY_QUEUES may name another
    # "module:Class" of its handler in the worker: shared/ never imports worker code (torch).
    handler: str
    # The timings_ms stages its handler times, exported as refinery_stage_seconds.
    stages: tuple[str, ...]
    # Whether a worker started without --queues serves it (and `refinery doctor` wants one).
    served_by_default: bool = True

    @property
    def name(self) -> str:
        return self.spec.model_fields["kind"].default

    @property
    def task(self) -> str:
        return keys.task_name(self.name)


# Every declared kind by name. The three below are the product's; another module may
# declare more (tests/fill_kind.py does) before its producer or worker starts.
KINDS: dict[str, JobKind] = {}


def declare(kind: JobKind) -> JobKind:
    if kind.name in KINDS:
        raise ValueError(f"job kind {kind.name!r} is declared twice")
    KINDS[kind.name] = kind
    return kind


def job_kind(name: str) -> JobKind:
    try:
        return KINDS[name]
    except KeyError:
        raise InvalidInput(f"unknown job kind {name!r}; known kinds: {', '.join(KINDS)}", field="kind") from None


declare(
    JobKind(
        GenerateSpec,
        queue="generate",
        handler="worker.handlers.generate:GenerateJob",
        stages=("generate", "refine", "encode", "upload"),
    )
)
declare(
    JobKind(
        RefineSpec,
        queue="refine",
        handler="worker.handlers.refine:RefineJob",
        stages=("load_input", "refine", "encode", "upload"),
    )
)
declare(
    JobKind(
        PairSpec,
        queue="pairs",
        handler="worker.handlers.pair:PairJob",
        stages=("student", "teacher", "encode", "upload"),
        served_by_default=False,  # dataset generation: a pool of its own, started on purpose
    )
)


def build_spec(model: type[JobSpec], **fields: Any) -> Any:
    """Validate fields into a spec, turning pydantic's report into one ``InvalidInput``."""
    try:
        return model(**fields)
    except ValidationError as exc:
        first = exc.errors()[0]
        field = ".".join(str(part) for part in first["loc"]) or None
        raise InvalidInput(first["msg"], field=field) from None


class JobError(BaseModel):
    code: str
    message: str
    field: str | None = None


class JobResult(BaseModel):
    uri: str
    url: str | None = None  # presigned GET, valid for presign_expiry_s
    raw_uri: str | None = None
    raw_url: str | None = None
    width: int
    height: int
    format: OutputFormat
    files: dict[str, str] = Field(default_factory=dict)  # pair jobs: student, teacher, manifest


class Quality(BaseModel):
    """The refined image's no-reference detail score, and whether it looks wrong."""

    detail_ratio: float  # high-frequency energy of the refined image over its input's
    flagged: bool = False
    reason: str | None = None


class CallbackStatus(BaseModel):
    url: str
    attempts: int = 0
    delivered: bool = False
    last_status: int | None = None
    last_error: str | None = None
    last_attempt_at: datetime | None = None


def utcnow() -> datetime:
    return datetime.now(UTC)


class JobRecord(BaseModel):
    job_id: str
    kind: str  # a declared JobKind's name
    state: JobState = JobState.queued
    # Serialised as the kind's own spec, not as the base class it is declared as.
    spec: SerializeAsAny[JobSpec]
    seed: int | None = None
    created_at: datetime = Field(default_factory=utcnow)
    expires_at: datetime | None = None
    started_at: datetime | None = None
    finished_at: datetime | None = None
    attempts: int = 0
    worker: str | None = None  # the worker (Celery hostname) that ran it last
    lease_owner: str | None = None  # that worker process, while it holds the job ...
    lease_expires_at: datetime | None = None  # ... and renews this (worker/leases.py)
    generator: str | None = None  # the preset that generated the image
    refiner: str | None = None  # which refiner ran ("identity" when none is configured)
    result: JobResult | None = None
    quality: Quality | None = None  # refined jobs only
    batch_size: int | None = None  # how many jobs shared its model call
    # Milliseconds per stage: queue_wait, load_input, batch_wait, generate, refine, encode,
    # upload, total. generate and refine are those of the whole batch the job ran in.
    timings_ms: dict[str, float] = Field(default_factory=dict)
    error: JobError | None = None
    callback: CallbackStatus | None = None
    # The gateway tenant that submitted it (producer/gateway); None from trusted producers.
    tenant: str | None = None

    @field_validator("spec", mode="before")
    @classmethod
    def _spec_of_its_kind(cls, spec: Any) -> Any:
        """The spec's own ``kind`` picks its model (the kinds are open, so no fixed union)."""
        if isinstance(spec, dict):
            name = spec.get("kind")
            if name not in KINDS:
                raise ValueError(f"unknown job kind {name!r}")
            return KINDS[name].spec.model_validate(spec)
        return spec

    @model_validator(mode="after")
    def _kind_matches_spec(self) -> JobRecord:
        assert self.kind == self.spec.kind, "record kind and spec kind disagree"
        if self.spec.deadline_s is not None and self.expires_at is None:
            self.expires_at = self.created_at + timedelta(seconds=self.spec.deadline_s)
        return self
