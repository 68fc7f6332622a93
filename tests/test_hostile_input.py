"""Hostile and malformed input, table-driven, against the session's real stack.

Every case names where it must be refused: at submit time (a typed ``RefineryError`` with
its code and field, and nothing written: no S3 object, no job record, no message), or as a
``failed`` job with an error code (and nothing written outside that job's own prefix). After
the table the worker still serves valid jobs.
"""

from __future__ import annotations

import io
import ipaddress
import json
import struct
import threading
import uuid
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from devstack.stack import wait_until
from producer.client import Client, JobHandle
from shared import keys
from shared.broker import queue_depth
from shared.contract import JobRecord, JobState, RefineSpec
from shared.errors import CallbackRefused, InvalidImage, InvalidInput, RefineryError

pytestmark = pytest.mark.integration

SIZE = 64
OTHER_BUCKET = "hostile-other-bucket"


# --- inputs ---------------------------------------------------------------------------------


def encoded(fmt: str, size: tuple[int, int] = (SIZE, SIZE), **options: Any) -> bytes:
    image = Image.new("RGB", size)
    width, height = size
    if width * height <= 256 * 256:  # a gradient, so that truncation cuts real pixel data
        image.putdata([(x * 4 % 256, y * 5 % 256, x * y % 256) for y in range(height) for x in range(width)])
    out = io.BytesIO()
    image.save(out, fmt, **options)
    return out.getvalue()


def png_declaring(width: int, height: int) -> bytes:
    """A tiny PNG whose header claims width x height: decoding it would be a bomb."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def truncated(data: bytes) -> bytes:
    return data[: len(data) // 2]


def too_many_bytes(client: Client) -> bytes:
    """A PNG signature followed by padding, one byte over the limit."""
    return encoded("PNG") + b"\0" * client.settings.max_input_bytes


def too_many_pixels(client: Client) -> bytes:
    """A real, solid (so small) PNG one row of pixels over max_input_pixels."""
    width = 2048
    height = client.settings.max_input_pixels // width + 1
    return encoded("PNG", (width, height))


def loopback_name_from_hosts() -> str:
    """A name other than localhost that /etc/hosts maps to loopback, else ``localhost.``."""
    try:
        lines = Path("/etc/hosts").read_text().splitlines()
    except OSError:
        return "localhost."
    for line in lines:
        fields = line.split("#", 1)[0].split()
        if len(fields) < 2:
            continue
        try:
            loopback = ipaddress.ip_address(fields[0]).is_loopback
        except ValueError:
            continue
        for name in fields[1:]:
            if loopback and not name.startswith(("localhost", "ip6-")):
                return name
    return "localhost."


HOSTS_NAME = loopback_name_from_hosts()


# --- the table ------------------------------------------------------------------------------


@dataclass
class Ctx:
    """What a case needs to submit: the stack's client, one with no callback allowlist (the
    production default; the test stack allowlists 127.0.0.1), and S3 uploads made before
    the 'before' snapshot."""

    client: Client
    strict: Client

    def upload(self, data: bytes, bucket: str | None = None) -> str:
        uri = f"s3://{bucket or self.client.settings.s3_bucket}/uploads/hostile/{uuid.uuid4().hex}"
        self.client.storage.put(uri, data, "application/octet-stream")
        return uri

    def foreign(self, **spec: Any) -> JobHandle:
        """A job written the way docs/deploy.md tells other producers to: record, then
        message, with no client-side checks. The worker must refuse what it must refuse."""
        job_id = uuid.uuid4().hex
        record = JobRecord(job_id=job_id, kind="refine_only", spec=RefineSpec(**spec))
        self.client.store.create(record)
        self.client.celery.send_task(
            keys.task_name("refine_only"),
            args=[job_id],
            task_id=job_id,
            queue=self.client.settings.queue("refine_only"),
            priority=3,
        )
        return JobHandle(job_id, self.client)


@dataclass(frozen=True)
class Case:
    at: str  # "submit" or "job"
    code: str
    field: str | None
    # Given the context, returns what to run (preparing inputs, such as S3 uploads, first).
    prepare: Callable[[Ctx], Callable[[], JobHandle]]
    error: type[RefineryError] = InvalidInput


def refused(
    code: str, field: str | None, submit: Callable[[Ctx], JobHandle], error: type[RefineryError] = InvalidInput
) -> Case:
    def prepare(ctx: Ctx) -> Callable[[], JobHandle]:
        return partial(submit, ctx)

    return Case("submit", code, field, prepare, error)


def refused_inline(code: str, data: Callable[[Client], bytes], **fields: Any) -> Case:
    return refused(code, "input", lambda ctx: ctx.client.submit_refine(image=data(ctx.client), **fields), InvalidImage)


def refused_callback(url: str, code: str = "callback_url_refused", *, strict: bool = True) -> Case:
    error = CallbackRefused if code == "callback_url_refused" else InvalidInput

    def submit(ctx: Ctx) -> JobHandle:
        client = ctx.strict if strict else ctx.client
        return client.submit_generate("portrait", seed=1, width=SIZE, height=SIZE, callback_url=url)

    return refused(code, "callback_url", submit, error)


def refused_input_uri(uri: str) -> Case:
    return refused("invalid_input", "input_uri", lambda ctx: ctx.client.submit_refine(input_uri=uri))


def generate(**fields: Any) -> Callable[[Ctx], JobHandle]:
    prompt = fields.pop("prompt", "portrait")
    return lambda ctx: ctx.client.submit_generate(prompt, **{"width": SIZE, "height": SIZE, **fields})


def failed_from_s3(code: str, field: str | None, data: Callable[[Client], bytes]) -> Case:
    """The object is uploaded first (outside any job prefix), then a refine-only job reads it."""

    def prepare(ctx: Ctx) -> Callable[[], JobHandle]:
        uri = ctx.upload(data(ctx.client))
        return partial(ctx.client.submit_refine, input_uri=uri)

    return Case("job", code, field, prepare)


def _other_bucket_uri(ctx: Ctx) -> str:
    s3 = ctx.client.storage.client
    if OTHER_BUCKET not in {b["Name"] for b in s3.list_buckets()["Buckets"]}:
        s3.create_bucket(Bucket=OTHER_BUCKET)
    # A real image: the refusal must come from the allowlist, not from a missing object.
    return ctx.upload(encoded("PNG"), bucket=OTHER_BUCKET)


def _foreign_other_bucket(ctx: Ctx) -> Callable[[], JobHandle]:
    return partial(ctx.foreign, input_uri=_other_bucket_uri(ctx))


def _client_other_bucket(ctx: Ctx) -> Callable[[], JobHandle]:
    return partial(ctx.client.submit_refine, input_uri=_other_bucket_uri(ctx))


def _missing_key(ctx: Ctx) -> Callable[[], JobHandle]:
    uri = f"s3://{ctx.client.settings.s3_bucket}/uploads/hostile/missing-{uuid.uuid4().hex}.png"
    return partial(ctx.client.submit_refine, input_uri=uri)


def _inline_image_with_private_callback(ctx: Ctx) -> JobHandle:
    return ctx.strict.submit_refine(image=encoded("PNG"), callback_url="http://169.254.169.254/latest/meta-data/")


def _deeply_nested() -> dict:
    root: dict = {}
    node = root
    for _ in range(5000):
        node["a"] = {}
        node = node["a"]
    return root


BUCKET = "refinery-local"  # any name: only used in URIs the contract refuses whatever the bucket

CASES = [
    # Image bytes sent inline: checked by the producer before anything is stored.
    pytest.param(
        refused_inline("invalid_image", lambda c: b"%PDF-1.7 this is not an image"), id="inline-non-image-bytes"
    ),
    pytest.param(refused_inline("invalid_image", lambda c: b""), id="inline-empty-bytes"),
    pytest.param(refused_inline("invalid_image", lambda c: truncated(encoded("PNG"))), id="inline-truncated-png"),
    pytest.param(
        refused_inline("invalid_image", lambda c: truncated(encoded("JPEG", quality=90))), id="inline-truncated-jpeg"
    ),
    pytest.param(
        refused_inline("invalid_image", lambda c: png_declaring(100_000, 100_000)), id="inline-decompression-bomb"
    ),
    pytest.param(
        refused_inline("invalid_image", lambda c: png_declaring(4096, 4096)), id="inline-declared-over-max-pixels"
    ),
    pytest.param(refused_inline("invalid_image", lambda c: encoded("PNG", (1, 1))), id="inline-1x1"),
    pytest.param(refused_inline("invalid_image", too_many_pixels), id="inline-oversized-pixels"),
    pytest.param(refused_inline("invalid_image", too_many_bytes), id="inline-oversized-bytes"),
    pytest.param(refused_inline("invalid_image", lambda c: encoded("GIF")), id="inline-gif-not-allowed"),
    pytest.param(refused_inline("invalid_image", lambda c: encoded("BMP")), id="inline-bmp-not-allowed"),
    pytest.param(
        refused(
            "invalid_input",
            "output_format",
            lambda ctx: ctx.client.submit_refine(image=encoded("PNG"), output_format="gif"),
        ),
        id="inline-valid-image-bad-format-stores-nothing",
    ),
    pytest.param(
        refused("callback_url_refused", "callback_url", _inline_image_with_private_callback, CallbackRefused),
        id="inline-valid-image-private-callback-stores-nothing",
    ),
    # Prompts.
    pytest.param(refused("invalid_input", "prompt", generate(prompt="")), id="prompt-empty"),
    pytest.param(refused("invalid_input", "prompt", generate(prompt=" \t\n ")), id="prompt-blank"),
    pytest.param(refused("invalid_input", "prompt", generate(prompt="x" * 100_000)), id="prompt-100k-chars"),
    pytest.param(refused("invalid_input", "prompt", generate(prompt=None)), id="prompt-not-a-string"),
    # Seeds.
    pytest.param(refused("invalid_input", "seed", generate(seed=-1)), id="seed-negative"),
    pytest.param(refused("invalid_input", "seed", generate(seed=2**64)), id="seed-over-max"),
    pytest.param(refused("invalid_input", "seed", generate(seed=1.5)), id="seed-float"),
    pytest.param(refused("invalid_input", "seed", generate(seed=7.0)), id="seed-integral-float"),
    pytest.param(refused("invalid_input", "seed", generate(seed="7")), id="seed-string"),
    pytest.param(refused("invalid_input", "seed", generate(seed=True)), id="seed-bool"),
    # Sizes and other numbers.
    pytest.param(refused("invalid_input", "width", generate(width=100)), id="width-not-multiple-of-16"),
    pytest.param(refused("invalid_input", "height", generate(height=72)), id="height-not-multiple-of-16"),
    pytest.param(refused("invalid_input", "width", generate(width=16)), id="width-below-range"),
    pytest.param(refused("invalid_input", "height", generate(height=4096)), id="height-above-range"),
    pytest.param(refused("invalid_input", "width", generate(width=-64)), id="width-negative"),
    pytest.param(refused("invalid_input", "width", generate(width=64.0)), id="width-float"),
    pytest.param(refused("invalid_input", "steps", generate(steps=1000)), id="steps-above-range"),
    pytest.param(refused("invalid_input", "guidance", generate(guidance=float("nan"))), id="guidance-nan"),
    pytest.param(refused("invalid_input", "deadline_s", generate(deadline_s=-1)), id="deadline-negative"),
    # Enumerations and the shape of the spec.
    pytest.param(refused("invalid_input", "output_format", generate(output_format="gif")), id="output-format-unknown"),
    pytest.param(refused("invalid_input", "priority", generate(priority="urgent")), id="priority-unknown"),
    pytest.param(refused("invalid_input", "colour", generate(colour="red")), id="unknown-field"),
    pytest.param(refused("invalid_input", "preset", generate(preset="flux-pro")), id="unknown-field-preset"),
    pytest.param(refused("invalid_input", "kind", generate(kind="refine_only")), id="kind-smuggled"),
    pytest.param(
        refused("invalid_input", "idempotency_key", generate(idempotency_key="../a b")), id="idempotency-key-bad-chars"
    ),
    pytest.param(refused("invalid_input", "metadata", generate(metadata={"x": "y" * 10_000})), id="metadata-too-large"),
    pytest.param(
        refused("invalid_input", "metadata", generate(metadata={"x": {1, 2}})),
        id="metadata-not-json",
    ),
    pytest.param(
        refused(
            "invalid_input",
            "metadata",
            lambda ctx: ctx.client.submit_generate("portrait", width=SIZE, height=SIZE, metadata=_deeply_nested()),
        ),
        id="metadata-nested-5000-deep",
    ),
    # S3 input URIs refused by the contract.
    pytest.param(refused_input_uri(f"s3://{BUCKET}/uploads/../refinery/jobs/x/input"), id="s3-dotdot-in-key"),
    pytest.param(refused_input_uri(f"s3://{BUCKET}/uploads/.."), id="s3-trailing-dotdot"),
    pytest.param(refused_input_uri(f"s3://{BUCKET}//etc/passwd"), id="s3-empty-segment"),
    pytest.param(refused_input_uri("http://169.254.169.254/latest/x.png"), id="input-uri-not-s3"),
    pytest.param(
        Case("submit", "invalid_input", "input_uri", _client_other_bucket),
        id="s3-bucket-outside-allowlist-at-submit",
    ),
    # S3 inputs only the worker can judge: failed jobs with an error code.
    pytest.param(
        Case("job", "invalid_input", "input_uri", _foreign_other_bucket),
        id="s3-bucket-outside-allowlist-foreign-producer",
    ),
    pytest.param(Case("job", "input_not_found", "input_uri", _missing_key), id="s3-missing-key"),
    pytest.param(failed_from_s3("invalid_image", "input", lambda c: b"this is not a png"), id="s3-non-image-bytes"),
    pytest.param(failed_from_s3("invalid_image", "input", lambda c: b""), id="s3-empty-object"),
    pytest.param(failed_from_s3("invalid_image", "input", lambda c: truncated(encoded("PNG"))), id="s3-truncated-png"),
    pytest.param(
        failed_from_s3("invalid_image", "input", lambda c: truncated(encoded("JPEG", quality=90))),
        id="s3-truncated-jpeg",
    ),
    pytest.param(
        failed_from_s3("invalid_image", "input", lambda c: png_declaring(100_000, 100_000)), id="s3-decompression-bomb"
    ),
    pytest.param(failed_from_s3("invalid_image", "input", lambda c: encoded("PNG", (1, 1))), id="s3-1x1"),
    pytest.param(failed_from_s3("invalid_image", "input", too_many_pixels), id="s3-oversized-pixels"),
    pytest.param(failed_from_s3("invalid_image", "input", too_many_bytes), id="s3-oversized-bytes"),
    pytest.param(failed_from_s3("invalid_image", "input", lambda c: encoded("GIF")), id="s3-gif-not-allowed"),
    # Callback URLs: private targets refused by address, at submit (and again at delivery).
    pytest.param(refused_callback("http://127.0.0.1:6379/"), id="callback-127.0.0.1-redis-port"),
    pytest.param(
        refused_callback("http://127.0.0.2/hook", strict=False), id="callback-127.0.0.2-despite-127.0.0.1-allowlisted"
    ),
    pytest.param(refused_callback("http://127.1/hook"), id="callback-127.1-short-form"),
    pytest.param(refused_callback("http://2130706433/hook"), id="callback-decimal-loopback"),
    pytest.param(refused_callback("http://localhost:8080/hook"), id="callback-localhost"),
    pytest.param(refused_callback("http://localhost./hook"), id="callback-localhost-trailing-dot"),
    pytest.param(refused_callback(f"http://{HOSTS_NAME}/hook"), id="callback-etc-hosts-name-to-loopback"),
    pytest.param(refused_callback("http://169.254.169.254/latest/meta-data/"), id="callback-cloud-metadata"),
    pytest.param(refused_callback("http://10.0.0.1/hook"), id="callback-10.x"),
    pytest.param(refused_callback("http://192.168.1.1/hook"), id="callback-192.168.x"),
    pytest.param(refused_callback("http://172.16.0.1/hook"), id="callback-172.16.x"),
    pytest.param(refused_callback("http://0.0.0.0:8000/hook"), id="callback-0.0.0.0"),
    pytest.param(refused_callback("http://[::1]/hook"), id="callback-ipv6-loopback"),
    pytest.param(refused_callback("http://[::ffff:127.0.0.1]/hook"), id="callback-ipv4-mapped-loopback"),
    pytest.param(refused_callback("http://[fd00::1]/hook"), id="callback-ipv6-unique-local"),
    pytest.param(refused_callback("http://user:pw@169.254.169.254/"), id="callback-userinfo-metadata"),
    # Non-http schemes: refused by the contract itself.
    pytest.param(refused_callback("ftp://example.com/hook", "invalid_input"), id="callback-ftp"),
    pytest.param(refused_callback("file:///etc/passwd", "invalid_input"), id="callback-file"),
    pytest.param(refused_callback("gopher://127.0.0.1:6379/_FLUSHALL", "invalid_input"), id="callback-gopher"),
    pytest.param(refused_callback("javascript:alert(1)", "invalid_input"), id="callback-javascript"),
    pytest.param(refused_callback("http://" + "a" * 3000 + ".example/", "invalid_input"), id="callback-too-long"),
]


# --- what was written ----------------------------------------------------------------------


def s3_objects(client: Client) -> set[str]:
    """Every object, as bucket/key, in the buckets a case can reach: the stack's own, those it
    reads inputs from and the other one the cases upload to. The other buckets the cases name
    do not exist; the rest on the moto server are other stacks' (devstack.stack.SharedS3)."""
    s3 = client.storage.client
    reachable = {*client.settings.readable_buckets, OTHER_BUCKET}
    found = set()
    for bucket in reachable & {b["Name"] for b in s3.list_buckets()["Buckets"]}:
        for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket):
            found |= {f"{bucket}/{obj['Key']}" for obj in page.get("Contents", [])}
    return found


def redis_state(client: Client) -> tuple[set[bytes], int]:
    """Job records and idempotency keys, and the messages waiting in the model queues."""
    r = client.store.redis
    names = set(r.scan_iter(keys.job_key("*"))) | set(r.scan_iter(keys.idempotency_key("*")))
    waiting = sum(
        queue_depth(r, q) for q in (client.settings.queue("generate_and_refine"), client.settings.queue("refine_only"))
    )
    return names, waiting


def job_prefixes(client: Client, job_keys: set[bytes]) -> tuple[str, ...]:
    """Where the jobs with these records may write: bucket/prefix/jobs/<id>/."""
    base = f"{client.settings.s3_bucket}/{client.settings.s3_prefix}/jobs/"
    return tuple(
        base + key.decode().removeprefix(keys.job_key("")) + "/"
        for key in job_keys
        if key.startswith(keys.job_key("").encode())
    )


def alive(stack) -> set[str]:
    return {name for name, process in stack.processes.items() if process.poll() is None}


@pytest.fixture(scope="module")
def ctx(stack, client) -> Ctx:
    return Ctx(client, Client(stack.settings.model_copy(update={"callback_allowlist": []})))


@pytest.mark.parametrize("case", CASES)
def test_hostile_input_is_refused_and_writes_nothing_outside_its_job(case: Case, ctx: Ctx, stack) -> None:
    run = case.prepare(ctx)
    running_before = alive(stack)
    objects_before = s3_objects(ctx.client)
    (records_before, waiting_before) = redis_state(ctx.client)
    # Jobs that existed before the case (earlier tests') may still write under their own
    # prefixes; nothing else may appear.
    earlier = job_prefixes(ctx.client, records_before)

    if case.at == "submit":
        try:
            handle = run()
        except RefineryError as exc:
            assert isinstance(exc, case.error), f"{type(exc).__name__}: {exc}"
            assert (exc.code, exc.field) == (case.code, case.field), str(exc)
        else:
            record = handle.wait(60)  # let it finish, so it cannot disturb the next case
            pytest.fail(f"accepted at submit; the job ended {record.state.value} with {record.error}")
        new = s3_objects(ctx.client) - objects_before
        assert not [name for name in new if not name.startswith(earlier)], (
            f"a refused submit wrote to S3: {sorted(new)}"
        )
        (records_after, waiting_after) = redis_state(ctx.client)
        assert records_after <= records_before, f"a refused submit created {records_after - records_before}"
        assert waiting_after <= waiting_before, "a refused submit enqueued a message"
        assert alive(stack) >= running_before
        return

    handle = run()
    record = handle.wait(60)
    assert record.state is JobState.failed, f"{record.state.value}: {record.error}"
    assert (record.error.code, record.error.field) == (case.code, case.field), record.error
    assert record.result is None
    own = job_prefixes(ctx.client, {keys.job_key(record.job_id).encode()})
    new = s3_objects(ctx.client) - objects_before
    outside = [name for name in new if not name.startswith(own + earlier)]
    assert not outside, f"written outside {own[0]}: {sorted(outside)}"
    assert alive(stack) >= running_before, "a worker died"


def test_foreign_record_breaking_the_contract_fails_instead_of_hanging(ctx: Ctx) -> None:
    """A hand-written record (docs/deploy.md) whose spec breaks the contract must end
    ``failed`` with invalid_input, not sit ``queued`` forever after its message is gone."""
    job_id = uuid.uuid4().hex
    record = JobRecord(job_id=job_id, kind="refine_only", spec=RefineSpec(input_uri=f"s3://{BUCKET}/uploads/x.png"))
    raw = record.model_dump(mode="json")
    raw["spec"]["input_uri"] = f"s3://{BUCKET}/uploads/../refinery/jobs/{job_id}/input"
    r = ctx.client.store.redis
    r.set(keys.job_key(job_id), json.dumps(raw), ex=3600)
    ctx.client.celery.send_task(
        keys.task_name("refine_only"),
        args=[job_id],
        task_id=job_id,
        queue=ctx.client.settings.queue("refine_only"),
        priority=3,
    )

    # The worker takes the message ...
    wait_until(
        lambda: queue_depth(r, ctx.client.settings.queue("refine_only")) == 0, timeout_s=30, what="message consumed"
    )

    # ... and the record must then say what became of the job.
    def terminal() -> bool:
        return json.loads(r.get(keys.job_key(job_id)))["state"] in ("failed", "succeeded", "cancelled")

    wait_until(terminal, timeout_s=10, what="a terminal record")
    stored = json.loads(r.get(keys.job_key(job_id)))
    assert stored["state"] == "failed" and stored["error"]["code"] == "invalid_input"


def test_callback_refused_at_delivery_when_the_submit_check_was_bypassed(ctx: Ctx) -> None:
    """A foreign producer skips the submit check; the callbacks worker checks again, sends
    nothing, and records why on the job."""
    job_id = uuid.uuid4().hex
    uri = ctx.upload(encoded("PNG"))
    spec = RefineSpec(input_uri=uri, callback_url="http://169.254.169.254/latest/meta-data/")
    ctx.client.store.create(JobRecord(job_id=job_id, kind="refine_only", spec=spec))
    ctx.client.celery.send_task(
        keys.task_name("refine_only"),
        args=[job_id],
        task_id=job_id,
        queue=ctx.client.settings.queue("refine_only"),
        priority=3,
    )

    record = ctx.client.wait(job_id, 60)
    assert record.state is JobState.succeeded, record.error
    wait_until(lambda: ctx.client.status(job_id).callback is not None, timeout_s=30, what="callback outcome")
    callback = ctx.client.status(job_id).callback
    assert not callback.delivered and callback.last_status is None
    assert "CallbackRefused" in callback.last_error and "169.254.169.254" in callback.last_error


def test_callback_redirect_to_a_private_address_is_not_followed(ctx: Ctx) -> None:
    """The receiver (allowlisted on the test stack) answers 302 to a private address where
    another server listens: the redirect is reported, and never followed."""
    reached: list[str] = []

    class Target(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            reached.append(self.path)
            self.send_response(204)
            self.end_headers()

        do_GET = do_POST

        def log_message(self, *args: object) -> None:
            pass

    class Redirector(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            self.send_response(302)
            self.send_header("Location", f"http://127.0.0.1:{target.server_address[1]}/latest/meta-data/")
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    target = ThreadingHTTPServer(("127.0.0.1", 0), Target)
    redirector = ThreadingHTTPServer(("127.0.0.1", 0), Redirector)
    for server in (target, redirector):
        threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{redirector.server_address[1]}/hook"
        record = ctx.client.submit_generate("portrait", seed=3, width=SIZE, height=SIZE, callback_url=url).wait(60)
        assert record.state is JobState.succeeded
        wait_until(lambda: ctx.client.status(record.job_id).callback is not None, timeout_s=30, what="callback outcome")
        callback = ctx.client.status(record.job_id).callback
        assert not callback.delivered and callback.last_status == 302
        assert "not followed" in callback.last_error
    finally:
        redirector.shutdown()
        target.shutdown()
    assert reached == []


def test_worker_still_serves_valid_jobs_after_the_table(ctx: Ctx) -> None:
    generated = ctx.client.submit_generate("portrait after the storm", seed=4, width=SIZE, height=SIZE).wait(60)
    refined = ctx.client.submit_refine(image=encoded("PNG")).wait(60)

    assert generated.state is JobState.succeeded, generated.error
    assert refined.state is JobState.succeeded, refined.error
