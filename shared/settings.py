"""Every setting a user tunes, in one place.

Read from the environment (prefix ``REFINERY_``) and from a ``.env`` file. This is the
only module that reads the environment; everything else receives a ``Settings``.
Each field is documented in ``.env.example``.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from shared.contract import KINDS, job_kind


def _csv_parts(value: str) -> list[str]:
    return [part.strip() for part in value.split(",") if part.strip()]


def _split_csv(value: object) -> object:
    if isinstance(value, str):
        return _csv_parts(value)
    return value


class Settings(BaseSettings):
    # Empty values mean "unset" (so a copied .env.example works as it is).
    model_config = SettingsConfigDict(env_prefix="REFINERY_", env_file=".env", extra="ignore", env_ignore_empty=True)

    # Redis: broker for Celery and home of the job records.
    redis_url: str = "redis://127.0.0.1:6379/0"
    job_ttl_s: int = Field(7 * 24 * 3600, gt=0)
    # A finished job's record stays in Redis this long, then only beside its results in the
    # bucket (jobs/<id>/job.json, shared/archive.py), which status, wait and the gateway read.
    record_linger_s: float = Field(3600.0, gt=0)
    # Behind Redis Sentinel (redis_url "sentinel://h1:26379;sentinel://h2:26379/0"): the
    # monitored primary's name, and the Sentinels' own password and TLS, if they have any.
    redis_sentinel_master: str | None = None
    redis_sentinel_password: SecretStr | None = None
    redis_sentinel_tls: bool = False
    # Replicas that must hold a submitted job before submit returns (WAIT); also awaited,
    # without failing, after each change of a record. None: 1 behind Sentinel, else 0.
    redis_min_replicas_ack: int | None = Field(None, ge=0)
    redis_wait_ms: int = Field(500, gt=0)
    # How long one Redis call keeps reconnecting (a failover, a restart) before it raises;
    # producers then get broker_unavailable. None: 30 behind Sentinel, else 0 (at once);
    # set it for a managed Redis whose endpoint fails over.
    redis_retry_s: float | None = Field(None, ge=0)
    # A Redis primary lost just as a worker took a message loses that message while its job
    # stays queued (or its callback pending). An idle worker looks this often for jobs queued
    # (callbacks pending) longer than this, whose queue is empty and whose message no worker
    # holds, and sends them again.
    orphan_check_s: float = Field(10.0, gt=0)

    # S3 (AWS, MinIO, moto). Credentials: the standard AWS variables, or these.
    s3_endpoint_url: str | None = None
    s3_bucket: str = "face-refinery"
    s3_prefix: str = "refinery"
    s3_region: str = "us-east-1"
    s3_access_key_id: str | None = None
    s3_secret_access_key: SecretStr | None = None
    # Buckets besides s3_bucket that refine-only jobs may read their input from.
    s3_input_buckets: Annotated[list[str], NoDecode] = []
    presign_expiry_s: int = Field(3600, gt=0, le=7 * 24 * 3600)
    # Results, raw images and uploaded inputs (<prefix>/jobs/) are deleted by the bucket after
    # this many days: an S3 lifecycle rule that `refinery retention --apply` puts in place
    # and `refinery doctor` checks. The records' own default lifetime (job_ttl_s) is 7 days too.
    retention_days: int = Field(7, ge=1)
    # boto3's own retries with backoff ("standard" mode) before a job fails with storage_unavailable.
    s3_max_attempts: int = Field(5, ge=1)
    s3_timeout_s: float = Field(10.0, gt=0)
    # How long an upload keeps retrying (with backoff) through an S3 outage before the job
    # fails with storage_unavailable.
    s3_retry_budget_s: float = Field(60.0, ge=0)

    # Models.
    model_preset: str = "flux-schnell"
    # The teacher a pairs worker keeps resident beside model_preset (the student).
    teacher_preset: str = "flux-dev"
    teacher_path: str | None = None
    # Local directory or hub id that overrides the preset's model id.
    model_path: str | None = None
    # Where tiny presets are built once and loaded from (FluxPipeline.from_pretrained).
    model_cache_dir: Path = Path.home() / ".cache" / "face-refinery"
    # The refiner: a directory (safetensors + config.json), "identity" (unset: returns its
    # input), "noop" (the free model's), or "registry:NAME" to serve the versions of NAME that
    # its channels name, followed while the worker runs (`refinery refiner`, docs/refiner.md).
    refiner: str | None = None
    device: Literal["auto", "cpu", "cuda"] = "auto"
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    # For GPUs smaller than the model: move each component to the GPU only while it runs,
    # and decode the VAE in tiles.
    cpu_offload: bool = False
    vae_tiling: bool = False
    # Make a job's image independent of the batch it ran in (bit-exact). "auto": on CPU,
    # where it costs next to nothing; on CUDA, bf16 kernels differ by batch size anyway.
    batch_invariant: Literal["auto", "on", "off"] = "auto"

    # Dynamic batching: compatible jobs (same size, steps, guidance) share one model call.
    max_batch: int = Field(4, ge=1)
    # Per-resolution overrides, "WIDTHxHEIGHT=N" comma-separated, e.g. "1024x1024=2".
    max_batch_by_size: Annotated[dict[str, int], NoDecode] = {}
    max_wait_ms: float = Field(20.0, ge=0)
    # Submit refuses with queue_full when a queue holds more jobs than this (0: no limit).
    max_queue_depth: int = Field(10_000, ge=0)

    # Queues (one per model pool) and Celery worker behaviour. Each job kind's queue is its
    # declared default (shared/contract.py: generate_and_refine -> generate, refine_only ->
    # refine, pair -> pairs) unless this JSON object names another, e.g.
    # {"generate_and_refine": "generate-eu"}.
    queues: dict[str, str] = {}
    queue_callbacks: str = "callbacks"
    # Redis redelivers a message not acknowledged within this time. Keep it above the
    # longest job; a job redelivered while it still runs is held back by its lease anyway.
    visibility_timeout_s: int = Field(3600, gt=0)
    # A running job's lease, renewed every third of it; a dead worker's jobs run again after it.
    lease_s: float = Field(60.0, gt=0)
    # Attempts of one job: a worker that died mid-job or an unexpected error counts one.
    # Then it fails (worker_lost or internal_error) and is listed in the dead-letter list.
    max_attempts: int = Field(3, ge=1)
    callback_concurrency: int = Field(8, ge=1)
    # On SIGTERM a model worker hands back the jobs it has not started and lets the batches
    # on the model finish for this long; then it hands those back too and exits. Keep the
    # platform's grace period (Kubernetes terminationGracePeriodSeconds) above it.
    drain_timeout_s: float = Field(60.0, gt=0)
    # Each worker refreshes its record (what it serves, jobs done, metrics address) this
    # often; one not refreshed for three times as long is no longer listed as live.
    worker_heartbeat_s: float = Field(10.0, gt=0)
    # `refinery node` restarts a worker that died after node_backoff_s, doubling up to
    # node_backoff_max_s; one that died node_max_crashes times within node_crash_window_s
    # stays down.
    node_backoff_s: float = Field(1.0, gt=0)
    node_backoff_max_s: float = Field(60.0, gt=0)
    node_max_crashes: int = Field(5, ge=1)
    node_crash_window_s: float = Field(600.0, gt=0)
    # Prometheus /metrics of each worker process (0: off). Several workers on one host each
    # take the first free port of metrics_port .. metrics_port + metrics_port_span - 1, and
    # publish the address they got in their worker record (`refinery workers`).
    metrics_port: int = Field(9808, ge=0, le=65535)
    metrics_port_span: int = Field(16, ge=1, le=1024)

    # Input limits.
    max_input_bytes: int = Field(20 * 1024 * 1024, gt=0)
    max_input_pixels: int = Field(2048 * 2048, gt=0)

    # Callbacks: Standard Webhooks signing and the private-address refusal.
    callback_secret: SecretStr | None = None
    callback_allowlist: Annotated[list[str], NoDecode] = []
    callback_timeout_s: float = Field(10.0, gt=0)
    callback_max_retries: int = Field(6, ge=0)
    callback_backoff_max_s: int = Field(600, gt=0)
    callback_on_running: bool = False

    # Preflight (`refinery doctor`, `refinery status`): a terminal callback still queued
    # after this long with no callbacks worker alive is an alarm; and the most this host's
    # clock may differ from Redis's (leases, deadlines and queue waits compare the two).
    callback_wait_alarm_s: float = Field(60.0, gt=0)
    max_clock_skew_s: float = Field(2.0, gt=0)

    # Quality: every refined image's detail ratio (its high-frequency energy over its
    # input's) is scored, and a job is flagged when the ratio falls below min (or rises
    # above max, when set), or lies more than quality_max_sigmas robust sigmas from the
    # running median of its refiner version's last quality_window scores (once
    # quality_min_samples have been seen). No default ceiling: how much detail a refiner
    # rightly adds depends on how much its generator loses (about 9x on the offline doubles).
    quality_min_detail_ratio: float = Field(0.9, ge=0)
    quality_max_detail_ratio: float | None = Field(None, gt=0)
    quality_max_sigmas: float = Field(4.0, gt=0)
    quality_window: int = Field(1000, ge=2)
    quality_min_samples: int = Field(50, ge=2)

    # Refiner rollout (REFINERY_REFINER=registry:NAME). Workers read NAME's channels every
    # refiner_poll_s and keep at most refiner_max_resident versions loaded (stable and canary
    # always). A canary is rolled back once it and stable each have canary_min_jobs marks and
    # its flagged rate is above stable's by more than canary_flag_margin, or its mean detail
    # ratio below stable's by more than canary_detail_margin (relative), at canary_z standard
    # errors (shared/canary.py; benchmarks/canary_rule.py measures the false-alarm rate).
    # refiner_events_url receives a signed `refiner.rolled_back` webhook.
    refiner_poll_s: float = Field(2.0, gt=0)
    refiner_max_resident: int = Field(3, ge=2)
    refiner_events_url: str | None = None
    canary_min_jobs: int = Field(50, ge=2)
    canary_z: float = Field(3.5, gt=0)
    canary_flag_margin: float = Field(0.05, ge=0)
    canary_detail_margin: float = Field(0.05, ge=0)

    # The HTTP gateway (`refinery gateway`, producer/gateway): where it listens, how many
    # uvicorn worker processes it runs, the most jobs one POST /v1/jobs:batch admits and
    # the largest request body it reads. A key made without --rate / --max-queued gets the
    # default rate (jobs per second, a burst of one second's worth) and cap on queued jobs.
    gateway_host: str = "127.0.0.1"
    gateway_port: int = Field(8080, ge=0, le=65535)
    gateway_workers: int = Field(1, ge=1)
    gateway_max_batch: int = Field(1000, ge=1)
    gateway_max_body_bytes: int = Field(16 * 1024 * 1024, gt=0)
    gateway_default_rate: float = Field(50.0, gt=0)
    gateway_default_max_queued: int = Field(1000, ge=1)
    # Live event streams (GET /v1/jobs/{id}/events) one gateway process holds at once; beyond
    # it a new one gets 503, and submits keep their own threads.
    gateway_max_streams: int = Field(256, ge=1)
    # A request body must arrive within this many seconds, plus one for each 64 KiB received
    # (slow clients: 408 beyond, and the connection is closed).
    gateway_body_timeout_s: float = Field(30.0, gt=0)
    # Fairness: a tenant's jobs submitted while it already has this many queued go one
    # broker priority step lower, behind other tenants' jobs of the same priority (0: off).
    gateway_fair_share: int = Field(16, ge=0)

    @field_validator("callback_allowlist", "s3_input_buckets", mode="before")
    @classmethod
    def _csv(cls, value: object) -> object:
        return _split_csv(value)

    @field_validator("max_batch_by_size", mode="before")
    @classmethod
    def _sizes(cls, value: object) -> object:
        if isinstance(value, str):
            pairs = (part.split("=") for part in _csv_parts(value))
            return {size.strip().lower(): int(n) for size, n in pairs}
        return value

    @field_validator("queues", mode="after")
    @classmethod
    def _declared_kinds(cls, queues: dict[str, str]) -> dict[str, str]:
        # A misspelt kind would otherwise leave its jobs on their default queue, unserved.
        if unknown := sorted(set(queues) - set(KINDS)):
            raise ValueError(f"unknown job kind(s) {unknown}; known kinds: {', '.join(KINDS)}")
        return queues

    def queue(self, kind: str) -> str:
        """The queue of a declared job kind."""
        return self.queues.get(kind) or job_kind(kind).queue

    def max_batch_for(self, width: int, height: int) -> int:
        return self.max_batch_by_size.get(f"{width}x{height}", self.max_batch)

    @property
    def worker_concurrency(self) -> int:
        """Jobs a model worker holds at once: one batch running while the next one gathers."""
        return 2 * max([self.max_batch, *self.max_batch_by_size.values()])

    @field_validator("model_cache_dir", mode="after")
    @classmethod
    def _expand_home(cls, path: Path) -> Path:
        return path.expanduser()

    @field_validator("refiner", mode="after")
    @classmethod
    def _expand_refiner_home(cls, refiner: str | None) -> str | None:
        return str(Path(refiner).expanduser()) if refiner and refiner.startswith("~") else refiner

    @property
    def readable_buckets(self) -> list[str]:
        return [self.s3_bucket, *self.s3_input_buckets]


@lru_cache
def get_settings() -> Settings:
    return Settings()
