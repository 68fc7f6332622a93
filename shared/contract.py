"""The job contract (v1): what a producer submits and what the job record says.

Specs are validated when a producer builds them, so bad input fails at submit time with
the offending field named. The record is what Redis stores and what ``status`` returns.
"""

from __future__ import annotations

import json
import re
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from shared.errors import InvalidInput
from shared.presets import SMALLEST_SIZE

MAX_SIZE = 2048
SIZE_MULTIPLE = 16
MAX_SEED = 2**63 - 1
MAX_METADATA_CHARS = 8192


class JobKind(StrEnum):
    generate_and_refine = "generate_and_refine"
    refine_only = "refine_only"
    pair = "pair"


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


class _JobSpec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

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
        return metadata


class GenerateSpec(_JobSpec):
    kind: Literal[JobKind.generate_and_refine] = JobKind.generate_and_refine
    prompt: str = Field(min_length=1, max_length=2000)
    seed: int | None = Field(None, ge=0, le=MAX_SEED, strict=True)
    width: int = Field(1024, ge=SMALLEST_SIZE, le=MAX_SIZE, multiple_of=SIZE_MULTIPLE, strict=True)
    height: int = Field(1024, ge=SMALLEST_SIZE, le=MAX_SIZE, multiple_of=SIZE_MULTIPLE, strict=True)
    # None: the preset's own default (4 steps / guidance 0 for schnell, 28 / 3.5 for dev).
    steps: int | None = Field(None, ge=1, le=100, strict=True)
    guidance: float | None = Field(None, ge=0, le=20)
    refine: bool = True
    keep_raw: bool = False

    @field_validator("prompt")
    @classmethod
    def _not_blank(cls, prompt: str) -> str:
        if not prompt.strip():
            raise ValueError("must contain non-whitespace characters")
        return prompt


class RefineSpec(_JobSpec):
    kind: Literal[JobKind.refine_only] = JobKind.refine_only
    # Inline images are uploaded by the producer to the job's own prefix at submit time,
    # so the spec the worker sees always names an S3 object.
    input_uri: str

    @field_validator("input_uri")
    @classmethod
    def _s3_uri(cls, uri: str) -> str:
        parse_s3_uri(uri)
        return uri


class PairSpec(_JobSpec):
    """One training pair: the same prompt and seed through the student and the teacher.

    Written to ``<dataset>/pairs/<pair_id>/{student,teacher}.png`` and
    ``<dataset>/manifest/<pair_id>.json`` (``shared.datasets``).
    """

    kind: Literal[JobKind.pair] = JobKind.pair
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


JobSpec = Annotated[GenerateSpec | RefineSpec | PairSpec, Field(discriminator="kind")]


def build_spec(model: type[_JobSpec], **fields: Any) -> Any:
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
    kind: JobKind
    state: JobState = JobState.queued
    spec: JobSpec
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

    @model_validator(mode="after")
    def _kind_matches_spec(self) -> JobRecord:
        assert self.kind == self.spec.kind, "record kind and spec kind disagree"
        if self.spec.deadline_s is not None and self.expires_at is None:
            self.expires_at = self.created_at + timedelta(seconds=self.spec.deadline_s)
        return self
