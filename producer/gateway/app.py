"""The HTTP gateway: the job contract over HTTP, for tenants holding API keys.

A stateless ASGI app: everything it knows lives in Redis and S3, so any number of replicas
serve behind a load balancer. Submits are checked by the producer library
(``producer.client.Client``): the same contract, the same checks and the same error codes
as the CLI and the Python API, answered as RFC 9457 problem details
(``producer.gateway.problems``); then a request's jobs are admitted, quotas, fairness and
writes, in one round trip to Redis (``producer.gateway.admission``). Each job records its
tenant; a tenant sees, follows and cancels only its own.

    uvicorn --factory producer.gateway.app:create_app     # or: refinery gateway
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Annotated, Any

import anyio.to_thread
from botocore.exceptions import BotoCoreError, ClientError
from fastapi import Depends, FastAPI, Header, Query, Request, Response
from fastapi.concurrency import run_in_threadpool
from fastapi.openapi.utils import get_openapi
from fastapi.responses import StreamingResponse
from fastapi.security import HTTPBearer
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Histogram, generate_latest
from pydantic import BaseModel, Field, TypeAdapter
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from producer.client import Client
from producer.gateway import problems
from producer.gateway.admission import Admission
from producer.gateway.auth import ApiKey, KeyStore
from producer.gateway.events import EventStream, StreamSlots
from producer.gateway.problems import (
    BodyTooLarge,
    Problem,
    RequestTimeout,
    StreamsExhausted,
    UnsupportedMediaType,
)
from producer.gateway.usage import Usage, UsageBook, UsageCollector
from shared.contract import (
    GenerateSpec,
    JobRecord,
    JobSpec,
    OutputFormat,
    Priority,
    RefineSpec,
    build_spec,
    parse_s3_uri,
)
from shared.errors import InvalidInput, JobNotFound, RefineryError, StorageUnavailable
from shared.images import decode_image
from shared.settings import Settings, get_settings

API_VERSION = "1"

# The kinds a tenant may submit; dataset pairs are an operator's job (`refinery pairs`).
KINDS: dict[str, type[JobSpec]] = {"generate_and_refine": GenerateSpec, "refine_only": RefineSpec}

# A submission's body, for the OpenAPI document: one of the kinds' specs, told apart by `kind`.
JobSubmission = Annotated[GenerateSpec | RefineSpec, Field(discriminator="kind")]

# Threads the app keeps for everything but event streams (Starlette's default pool size).
_WORK_THREADS = 40

# Bytes per second a request body earns beyond REFINERY_GATEWAY_BODY_TIMEOUT_S (read_body).
BODY_MIN_RATE = 64 * 1024


class BatchItem(BaseModel):
    """One job of a batch: its id once queued, or the problem that refused it."""

    index: int
    job_id: str | None = None
    problem: Problem | None = None


class BatchResult(BaseModel):
    jobs: list[BatchItem]


class Gateway:
    """What every request shares: the producer client, admission and the tenants' books in Redis."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.client = Client(settings)
        self.keys = KeyStore(self.client.store.redis)
        self.admission = Admission(self.client)
        self.usage = UsageBook(self.client.store.redis, settings.job_ttl_s)
        self.streams = StreamSlots(settings.gateway_max_streams)

    def validate(self, item: Any, tenant: str, idempotency_key: str | None) -> JobSpec:
        """One job of a request, checked against the contract before any quota is spent.
        Its idempotency key (the header's, else the body's) is the tenant's own: stored as
        ``<tenant>:<key>``, so another tenant's same key neither returns nor reveals the job."""
        if not isinstance(item, dict):
            raise InvalidInput("a job must be a JSON object", field="body")
        kind = item.get("kind")
        spec_type = KINDS.get(kind) if isinstance(kind, str) else None
        if spec_type is None:
            raise InvalidInput(f"kind must be one of {', '.join(KINDS)}", field="kind")
        if idempotency_key is None:
            idempotency_key = item.get("idempotency_key")
        if isinstance(idempotency_key, str):  # anything else: the contract refuses it below
            item = {**item, "idempotency_key": scoped(tenant, idempotency_key)}
        return build_spec(spec_type, **item)

    def prepare(self, spec: JobSpec, tenant: str, job_id: str | None = None) -> JobRecord:
        """A checked job's record, after the checks only the producer library can make (the
        preset's sizes, the input's bucket, the callback's address, a pinned refiner) and
        the tenant's own (its inputs)."""
        seed = None
        if isinstance(spec, GenerateSpec):
            seed = self.client.generate_seed(spec)
        elif isinstance(spec, RefineSpec):
            self.client.check_readable(spec.input_uri)
            self.check_input(spec.input_uri, tenant)
        return self.client.checked_record(spec, seed=seed, job_id=job_id, tenant=tenant)

    def check_input(self, uri: str, tenant: str) -> None:
        """In the service's own bucket a tenant may refine only its own jobs' objects: else
        one who learnt another's job id (or a dataset's path) could refine, and so download,
        images that are not its own. Other readable buckets are open to every tenant."""
        bucket, key = parse_s3_uri(uri)
        if bucket != self.settings.s3_bucket:
            return
        jobs = f"{self.settings.s3_prefix}/jobs/"
        try:
            if not key.startswith(jobs):
                raise JobNotFound("outside the jobs' objects")
            self.own(key.removeprefix(jobs).split("/")[0], tenant)
        except JobNotFound:
            raise InvalidInput(
                "in this service's bucket, only objects of your own jobs (an image of your own: POST /v1/jobs:upload)",
                field="input_uri",
            ) from None

    def submit_one(self, key: ApiKey, spec: JobSpec) -> JobRecord:
        """One job, admitted in one round trip; the record as it stands once queued (or
        the first job made with its idempotency key)."""
        record = self.prepare(spec, key.tenant)
        (outcome,) = self.admission.admit(key, [record])
        if isinstance(outcome, RefineryError):
            raise outcome
        return record if outcome.created else self.client.status(outcome.job_id)

    def submit_many(self, key: ApiKey, specs: dict[int, JobSpec], results: list[BatchItem]) -> None:
        """A batch's valid jobs, checked one by one (a callback URL refused fails that job
        only), then admitted together in one round trip: the quotas for all of them, and a
        place or ``queue_full`` for each."""
        records: dict[int, JobRecord] = {}
        for i, spec in specs.items():
            try:
                records[i] = self.prepare(spec, key.tenant)
            except RefineryError as exc:
                results[i].problem = problems.problem(exc)
        if not records:
            return
        for i, outcome in zip(records, self.admission.admit(key, list(records.values())), strict=True):
            if isinstance(outcome, RefineryError):
                results[i].problem = problems.problem(outcome)
            else:
                results[i].job_id = outcome.job_id

    def submit_upload(self, key: ApiKey, image: bytes, fields: dict[str, Any]) -> JobRecord:
        """A refine-only job for an uploaded image. The image is checked, then the job's
        admission asked without writing (quota, idempotency key): only then is the image
        stored, and the job admitted; a refusal in between deletes the image again."""
        settings = self.settings
        decode_image(image, max_bytes=settings.max_input_bytes, max_pixels=settings.max_input_pixels)
        job_id = uuid.uuid4().hex
        spec = build_spec(RefineSpec, input_uri=self.client.storage.job_uri(job_id, "input"), **fields)
        record = self.client.checked_record(spec, job_id=job_id, tenant=key.tenant)
        self.client.check_readable(spec.input_uri)
        (peek,) = self.admission.admit(key, [record], write=False)
        if isinstance(peek, RefineryError):
            raise peek
        if not peek.created:
            return self.client.status(peek.job_id)
        self.client.storage.put(spec.input_uri, image, "application/octet-stream")
        try:
            (outcome,) = self.admission.admit(key, [record])
            if isinstance(outcome, RefineryError):
                raise outcome
        except BaseException:
            self.client.storage.delete(spec.input_uri)
            raise
        if not outcome.created:  # the same key, admitted by another request meanwhile
            self.client.storage.delete(spec.input_uri)
            return self.client.status(outcome.job_id)
        return record

    def own(self, job_id: str, tenant: str) -> JobRecord:
        """The tenant's job; another tenant's is exactly as unknown as a missing one."""
        missing = JobNotFound(f"no job {job_id!r} (unknown or expired)", field="job_id")
        try:
            record = self.client.status(job_id)
        except JobNotFound:
            raise missing from None
        if record.tenant != tenant:
            raise missing
        return record


def scoped(tenant: str, idempotency_key: str) -> str:
    """Idempotency keys are the tenant's own: another tenant's same key must not return
    (or reveal) this job."""
    return f"{tenant}:{idempotency_key}"


class RequestTimer:
    """Each request's seconds by route and status. Plain ASGI rather than Starlette's
    BaseHTTPMiddleware, which runs every request in a task of its own: a cost on each submit."""

    def __init__(self, app: ASGIApp, histogram: Histogram) -> None:
        self.app = app
        self.histogram = histogram

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started, status = time.perf_counter(), 500

        async def send_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            # The route's template, not the path: job ids would make one series per job.
            route = getattr(scope.get("route"), "path", "unmatched")
            self.histogram.labels(scope["method"], route, str(status)).observe(time.perf_counter() - started)


def accepted(record: JobRecord) -> Response:
    """202 with the record as the job store serialises it, and where to find it next."""
    return Response(
        record.model_dump_json(),
        status_code=202,
        media_type="application/json",
        headers={"Location": f"/v1/jobs/{record.job_id}"},
    )


async def read_body(request: Request, limit: int, timeout_s: float) -> bytes:
    """The request body, refused with 413 as soon as it passes ``limit`` (declared or sent),
    and with 408 unless it arrives within ``timeout_s``, plus a second for each
    ``BODY_MIN_RATE`` bytes received (as Apache's mod_reqtimeout does): a client that
    trickles its body holds a connection that long, and no more."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise BodyTooLarge(f"request body of {declared} bytes is over the limit of {limit}", field="body")
    chunks: list[bytes] = []
    size = 0
    deadline = time.monotonic() + timeout_s
    stream = request.stream()
    while True:
        with anyio.move_on_after(deadline - time.monotonic()):
            try:
                chunk = await anext(stream)
            except StopAsyncIteration:
                return b"".join(chunks)
            size += len(chunk)
            if size > limit:
                raise BodyTooLarge(f"request body is over the limit of {limit} bytes", field="body")
            chunks.append(chunk)
            deadline += len(chunk) / BODY_MIN_RATE
            continue
        raise RequestTimeout(
            f"request body incomplete after {timeout_s:g} s (and 1 s per {BODY_MIN_RATE} bytes received)",
            field="body",
        )


def parse_json(body: bytes) -> Any:
    try:
        return json.loads(body)
    except (ValueError, RecursionError) as exc:  # RecursionError: nesting deeper than the parser's stack
        raise InvalidInput(f"body is not valid JSON ({type(exc).__name__})", field="body") from None


_PROBLEM = {"content": {problems.MEDIA_TYPE: {"schema": {"$ref": "#/components/schemas/Problem"}}}}
PROBLEMS: dict[int | str, dict[str, Any]] = {
    400: {"description": "Invalid input (`invalid_input` and its kin, with `field`)", **_PROBLEM},
    401: {"description": "Missing, unknown or revoked API key", **_PROBLEM},
    404: {"description": "No such job for this tenant", **_PROBLEM},
    408: {"description": "`request_timeout`: the request body did not arrive in time", **_PROBLEM},
    413: {"description": "Request body over the limit", **_PROBLEM},
    429: {"description": "`rate_limited`, `max_queued` or `queue_full`; see Retry-After", **_PROBLEM},
    503: {
        "description": "`broker_unavailable`, `storage_unavailable` or `too_many_streams`; see Retry-After",
        **_PROBLEM,
    },
}


BEARER = HTTPBearer(auto_error=False, description="An API key from `refinery keys create`")


def current_key(request: Request, _: Annotated[Any, Depends(BEARER)]) -> ApiKey:
    # HTTPBearer only declares the scheme in the OpenAPI document; the key store checks.
    gateway: Gateway = request.app.state.gateway
    return gateway.keys.authenticate(request.headers.get("authorization"))


Key = Annotated[ApiKey, Depends(current_key)]
IdempotencyKey = Annotated[
    str | None, Header(alias="Idempotency-Key", description="The job contract's idempotency_key")
]


def _body_schema(ref: str) -> dict[str, Any]:
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": {"$ref": ref}}}}}


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or get_settings()
    gateway = Gateway(settings)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        # An event stream holds a thread while it waits for the job's next change: room
        # for all of them, beside the threads submits and reads need.
        anyio.to_thread.current_default_thread_limiter().total_tokens = _WORK_THREADS + settings.gateway_max_streams
        yield

    app = FastAPI(
        title="face-refinery gateway",
        version=API_VERSION,
        description="Submit, follow and cancel portrait jobs over HTTP (docs/gateway.md).",
        lifespan=lifespan,
        responses=PROBLEMS,
        redoc_url=None,
    )
    problems.install(app)
    app.state.gateway = gateway

    registry = CollectorRegistry()
    registry.register(UsageCollector(gateway.usage))
    latency = Histogram(
        "refinery_gateway_request_seconds",
        "Gateway requests by route and status",
        ["method", "route", "status"],
        registry=registry,
    )

    app.add_middleware(RequestTimer, histogram=latency)

    @app.post(
        "/v1/jobs",
        status_code=202,
        response_model=JobRecord,
        openapi_extra=_body_schema("#/components/schemas/JobSubmission"),
    )
    async def submit_job(request: Request, key: Key, idempotency_key: IdempotencyKey = None) -> Response:
        """Queue one job; `kind` in the body picks its contract."""
        body = parse_json(await read_body(request, settings.gateway_max_body_bytes, settings.gateway_body_timeout_s))
        spec = gateway.validate(body, key.tenant, idempotency_key)
        record = await run_in_threadpool(gateway.submit_one, key, spec)
        return accepted(record)

    @app.post(
        "/v1/jobs:batch",
        response_model=BatchResult,
        openapi_extra=_body_schema("#/components/schemas/BatchSubmission"),
    )
    async def submit_batch(request: Request, key: Key, idempotency_key: IdempotencyKey = None) -> BatchResult:
        """Queue up to REFINERY_GATEWAY_MAX_BATCH jobs, each checked on its own: the answer
        lists, in order, each job's id or the problem that refused it. With an
        Idempotency-Key header K, job i gets the key `K.i`."""
        body = parse_json(await read_body(request, settings.gateway_max_body_bytes, settings.gateway_body_timeout_s))
        items = body.get("jobs") if isinstance(body, dict) else None
        if not isinstance(items, list) or not items:
            raise InvalidInput("expected an object with a non-empty list 'jobs'", field="jobs")
        if len(items) > settings.gateway_max_batch:
            raise InvalidInput(f"{len(items)} jobs; at most {settings.gateway_max_batch} per batch", field="jobs")
        results = [BatchItem(index=i) for i in range(len(items))]
        specs: dict[int, JobSpec] = {}
        for i, item in enumerate(items):
            try:
                specs[i] = gateway.validate(item, key.tenant, f"{idempotency_key}.{i}" if idempotency_key else None)
            except RefineryError as exc:
                results[i].problem = problems.problem(exc)
        if specs:
            await run_in_threadpool(gateway.submit_many, key, specs, results)
        return BatchResult(jobs=results)

    @app.post(
        "/v1/jobs:upload",
        status_code=202,
        response_model=JobRecord,
        openapi_extra={
            "requestBody": {
                "required": True,
                "content": {
                    media: {"schema": {"type": "string", "format": "binary"}}
                    for media in ("image/png", "image/jpeg", "image/webp", "application/octet-stream")
                },
            }
        },
    )
    async def submit_upload(
        request: Request,
        key: Key,
        idempotency_key: IdempotencyKey = None,
        output_format: OutputFormat = OutputFormat.png,
        priority: Priority = Priority.normal,
        callback_url: Annotated[str | None, Query(max_length=2048)] = None,
        deadline_s: float | None = None,
        metadata: Annotated[str | None, Query(description="A JSON object", max_length=8192)] = None,
        keep_input: Annotated[bool, Query(description="Keep the upload after the job ends")] = False,
        refiner_version: Annotated[str | None, Query(description="A published refiner, NAME@VERSION")] = None,
    ) -> Response:
        """Queue a refine-only job for the image sent as the raw body (an `s3://` input:
        POST /v1/jobs with kind refine_only and input_uri)."""
        media = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if not (media.startswith("image/") or media == "application/octet-stream"):
            raise UnsupportedMediaType("send the image as the raw body, Content-Type image/*", field="content-type")
        image = await read_body(request, settings.max_input_bytes, settings.gateway_body_timeout_s)
        fields: dict[str, Any] = {"output_format": output_format, "priority": priority, "keep_input": keep_input}
        optional = {"callback_url": callback_url, "deadline_s": deadline_s, "refiner_version": refiner_version}
        fields.update({name: value for name, value in optional.items() if value is not None})
        if idempotency_key is not None:
            fields["idempotency_key"] = scoped(key.tenant, idempotency_key)
        if metadata is not None:
            try:
                fields["metadata"] = json.loads(metadata)
            except (ValueError, RecursionError):
                raise InvalidInput("must be a JSON object", field="metadata") from None
        record = await run_in_threadpool(gateway.submit_upload, key, image, fields)
        return accepted(record)

    @app.get("/v1/jobs/{job_id}", response_model=JobRecord)
    def get_job(job_id: str, key: Key) -> JobRecord:
        return gateway.own(job_id, key.tenant)

    @app.post("/v1/jobs/{job_id}:cancel", response_model=JobRecord)
    def cancel_job(job_id: str, key: Key) -> JobRecord:
        """Cancel a job that has not finished; a finished one is returned as it is."""
        gateway.own(job_id, key.tenant)
        return gateway.client.cancel(job_id)

    @app.get(
        "/v1/jobs/{job_id}/events",
        response_class=StreamingResponse,
        responses={200: {"content": {"text/event-stream": {"schema": {"type": "string"}}}}},
    )
    def job_events_stream(job_id: str, key: Key) -> StreamingResponse:
        """Server-Sent Events: one event per state change (named after the state, the record
        as data) until a terminal state, then the stream ends."""
        gateway.own(job_id, key.tenant)
        if not gateway.streams.take():
            raise StreamsExhausted(f"this replica follows {settings.gateway_max_streams} streams already; retry")
        try:
            return EventStream(gateway.client.records, job_id, gateway.streams)
        except BaseException:
            gateway.streams.give_back()
            raise

    @app.get("/v1/usage", response_model=Usage)
    def usage(key: Key) -> Usage:
        """The tenant's jobs and images by kind and state, and model seconds of finished jobs."""
        return gateway.usage.report(key.tenant)

    @app.get("/healthz")
    def healthz() -> dict[str, str]:
        """The process answers."""
        return {"status": "ok"}

    @app.get("/readyz")
    def readyz() -> dict[str, str]:
        """Redis and the bucket are reachable: this replica can take jobs."""
        gateway.client.store.redis.ping()  # unreachable: broker_unavailable (problems.install)
        try:
            gateway.client.storage.client.head_bucket(Bucket=settings.s3_bucket)
        except (BotoCoreError, ClientError) as exc:
            raise StorageUnavailable(f"bucket {settings.s3_bucket!r} unreachable ({exc})", field="s3") from None
        return {"status": "ready"}

    @app.get("/metrics", response_class=Response, responses={200: {"content": {CONTENT_TYPE_LATEST: {}}}})
    def metrics() -> Response:
        """Prometheus: every tenant's usage (from Redis) and this process's request latencies."""
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            document = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
            schemas = document.setdefault("components", {}).setdefault("schemas", {})
            submission = TypeAdapter(JobSubmission).json_schema(ref_template="#/components/schemas/{model}")
            for name, schema in submission.pop("$defs", {}).items():
                schemas.setdefault(name, schema)
            schemas["JobSubmission"] = submission
            schemas["BatchSubmission"] = {
                "type": "object",
                "required": ["jobs"],
                "properties": {
                    "jobs": {"type": "array", "minItems": 1, "items": {"$ref": "#/components/schemas/JobSubmission"}}
                },
            }
            schemas["Problem"] = Problem.model_json_schema()
            # FastAPI documents its own 422 for every route with parameters; here a
            # malformed parameter is a 400 problem like any other invalid input.
            for operations in document["paths"].values():
                for operation in operations.values():
                    operation["responses"].pop("422", None)
            schemas.pop("HTTPValidationError", None)
            schemas.pop("ValidationError", None)
            app.openapi_schema = document
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
    return app
