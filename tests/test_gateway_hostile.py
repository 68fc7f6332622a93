"""Hostile clients against a real `refinery gateway` process (redis-server and moto's S3
server beside it, no worker: every job stays queued). Each gets its HTTP error, and the
gateway keeps serving everyone else: bodies that trickle or stall (408), a flood of event
streams (503 beyond the cap), malformed headers (400), bodies over the limit (413), deep
and huge JSON (400); a schema-driven fuzzing run from the served OpenAPI document finds no
5xx; a batch is admitted in one script call. Settings are the defaults but for the two
limits under test, lowered so the test waits seconds rather than minutes:
REFINERY_GATEWAY_MAX_STREAMS=4 and REFINERY_GATEWAY_BODY_TIMEOUT_S=1."""

from __future__ import annotations

import base64
import io
import json
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from pathlib import Path

import httpx
import pytest
import redis
from PIL import Image

from devstack.stack import LocalStack, free_port, wait_until
from shared.broker import job_push, make_celery
from shared.contract import GenerateSpec, JobRecord, build_spec
from shared.routing import job_message
from shared.settings import Settings

pytestmark = pytest.mark.integration

MAX_STREAMS = 4
BODY_TIMEOUT_S = 1
PROBLEM_JSON = "application/problem+json"
RESET = b"<connection reset>"
JOB = {"kind": "generate_and_refine", "prompt": "portrait", "seed": 1, "width": 64, "height": 64}


class Gateway:
    """The stack, one gateway process and a way to make keys."""

    def __init__(self, stack: LocalStack) -> None:
        self.stack = stack
        self.port = free_port()
        env = {"REFINERY_GATEWAY_MAX_STREAMS": str(MAX_STREAMS), "REFINERY_GATEWAY_BODY_TIMEOUT_S": str(BODY_TIMEOUT_S)}
        process = stack.spawn("gateway", [sys.executable, "-m", "cli", "gateway", "--port", str(self.port)], env)
        self.url = f"http://127.0.0.1:{self.port}"
        wait_until(
            lambda: httpx.get(f"{self.url}/readyz").status_code == 200,
            timeout_s=60,
            what="gateway",
            process=process,
            log=stack.logs / "gateway.log",
        )
        self.http = httpx.Client(base_url=self.url, timeout=30)

    def key(self, tenant: str, *options: str) -> dict:
        done = self.stack.refinery("keys", "create", "--tenant", tenant, *options, "--json")
        assert done.returncode == 0, done.stderr
        return json.loads(done.stdout)

    def log(self) -> str:
        return (self.stack.logs / "gateway.log").read_text()

    def served(self) -> bool:
        """Someone else is served, promptly."""
        started = time.monotonic()
        answer = self.http.get("/healthz", timeout=5)
        return answer.status_code == 200 and time.monotonic() - started < 1


@pytest.fixture(scope="module")
def gw(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    with LocalStack(tmp_path_factory.mktemp("hostile")) as stack:
        gateway = Gateway(stack)
        yield gateway
        gateway.http.close()


def auth(key: dict) -> dict[str, str]:
    return {"Authorization": f"Bearer {key['key']}"}


def png() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (64, 64), (120, 90, 60)).save(buffer, "PNG")
    return buffer.getvalue()


def connect(gw: Gateway) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", gw.port), timeout=30)
    return sock


def answer_of(sock: socket.socket) -> bytes:
    """Everything the gateway sends until it closes the connection (blocks until then)."""
    received = b""
    while chunk := sock.recv(65536):
        received += chunk
    return received


def raw(gw: Gateway, request: bytes) -> bytes:
    """The answer to ``request``; ``RESET`` when the gateway cut the connection before the
    client was done sending (a 400 it sent may be lost with it)."""
    with connect(gw) as sock:
        try:
            sock.sendall(request)
            return answer_of(sock)
        except (BrokenPipeError, ConnectionResetError):
            return RESET


def test_slow_bodies_get_408_while_others_are_served(gw):
    """Slowloris: clients that send their headers and part of the body, then stall or
    trickle a byte at a time; and clients that never finish their headers. The gateway
    answers the body stalls with 408 once REFINERY_GATEWAY_BODY_TIMEOUT_S passes (the
    trickle too: the deadline is for the whole body), and serves others all along."""
    key = gw.key("slowloris")
    body = json.dumps(JOB).encode()
    head = (
        f"POST /v1/jobs HTTP/1.1\r\nHost: gw\r\nAuthorization: Bearer {key['key']}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    ).encode()
    with ExitStack() as held:
        stalled = [held.enter_context(connect(gw)) for _ in range(5)]
        for sock in stalled:
            sock.sendall(head + body[:10])
        # Headers never finished: uvicorn waits for them (a proxy in front times them out).
        for sock in [held.enter_context(connect(gw)) for _ in range(5)]:
            sock.sendall(b"POST /v1/jobs HTTP/1.1\r\nHost: gw\r\nX-Slow: ")
        trickler = held.enter_context(connect(gw))
        trickler.sendall(head)
        gone = threading.Event()

        def trickle() -> None:
            # The client's own pace: a byte every 0.1 s, far slower than the body needs.
            for byte in body:
                if gone.wait(0.1):
                    return
                try:
                    trickler.sendall(bytes([byte]))
                except OSError:
                    return  # the gateway gave up on it

        pacer = threading.Thread(target=trickle)
        pacer.start()
        try:
            # Others are served while they hang, with a job of their own.
            assert gw.served()
            assert gw.http.post("/v1/jobs", json=JOB, headers=auth(gw.key("patient"))).status_code == 202
            started = time.monotonic()
            for sock in [*stalled, trickler]:
                answer = answer_of(sock)
                assert answer.startswith(b"HTTP/1.1 408 "), answer[:200]
                assert b'"code":"request_timeout"' in answer, answer
            # Within the timeout, and a little for the bytes the trickle earned.
            assert time.monotonic() - started < BODY_TIMEOUT_S + 5
            assert gw.served()
        finally:
            gone.set()
            pacer.join()


def test_a_flood_of_event_streams_gets_503_beyond_the_cap(gw):
    """30 clients open a job's event stream at once: exactly REFINERY_GATEWAY_MAX_STREAMS
    are served (they stay open: the job waits for a worker), the others get 503
    too_many_streams with Retry-After; the rest of the API answers meanwhile, and once the
    streams close their slots are free again."""
    key = gw.key("flood")
    job_id = gw.http.post("/v1/jobs", json=JOB, headers=auth(key)).json()["job_id"]
    flood = 30
    ready = threading.Barrier(flood)
    release = threading.Event()
    statuses: list[tuple[int, dict]] = []

    def open_stream() -> None:
        with httpx.Client(base_url=gw.url, timeout=30) as client:
            ready.wait()
            with client.stream("GET", f"/v1/jobs/{job_id}/events", headers=auth(key)) as response:
                if response.status_code == 200:
                    # Held while waiting: an iterator dropped half-read closes the connection.
                    lines = response.iter_lines()
                    statuses.append((200, {"first": next(lines)}))  # the stream runs: its first event
                    release.wait(60)
                else:
                    response.read()
                    statuses.append((response.status_code, {**response.json(), **response.headers}))

    with ThreadPoolExecutor(flood) as pool:
        futures = [pool.submit(open_stream) for _ in range(flood)]
        try:
            wait_until(lambda: len(statuses) == flood, timeout_s=30, what="every stream answered")
            served = [s for s in statuses if s[0] == 200]
            refused = [s for s in statuses if s[0] != 200]
            assert len(served) == MAX_STREAMS, [s[0] for s in statuses]
            assert all(first["first"] == "event: queued" for _, first in served)
            for status, problem in refused:
                assert status == 503 and problem["code"] == "too_many_streams", problem
                assert problem["retry-after"] == "1" and problem["content-type"] == PROBLEM_JSON
            # Everyone else is served while the streams hold their slots.
            assert gw.served()
            assert gw.http.get(f"/v1/jobs/{job_id}", headers=auth(key)).json()["state"] == "queued"
        finally:
            release.set()
            for future in futures:
                future.result()

    def stream_admitted() -> bool:
        with gw.http.stream("GET", f"/v1/jobs/{job_id}/events", headers=auth(key)) as response:
            return response.status_code == 200

    # The slots come back when the streams end, whoever ended them.
    wait_until(stream_admitted, timeout_s=10, what="a stream admitted again")
    assert "Traceback" not in gw.log()


def test_malformed_headers_get_400_and_the_gateway_keeps_serving(gw):
    key = gw.key("malformed")["key"]
    # What HTTP/1.1's grammar refuses (h11, in uvicorn): answered 400, the connection closed.
    cases = [
        b"GET /healthz HTTP/1.1\r\nHost: gw\r\nno colon here\r\n\r\n",
        b"GET /healthz HTTP/1.1\r\nHost: gw\r\nBad Name: x\r\n\r\n",
        b"GET /healthz HTTP/1.1\r\nHost: gw\r\nX-Nul: a\x00b\r\n\r\n",
        b"GET /healthz HTTP/1.1\r\n\r\n",  # no Host
        b"GET /healthz HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n",
        b"GET  /healthz HTTP/1.1\r\nHost: gw\r\n\r\n",
        b"GET /heal\x7fthz HTTP/1.1\r\nHost: gw\r\n\r\n",
        b"POST /v1/jobs HTTP/1.1\r\nHost: gw\r\nContent-Length: abc\r\n\r\n",
        b"POST /v1/jobs HTTP/1.1\r\nHost: gw\r\nContent-Length: -1\r\n\r\n",
        b"POST /v1/jobs HTTP/1.1\r\nHost: gw\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nhello",
        b"POST /v1/jobs HTTP/1.1\r\nHost: gw\r\nTransfer-Encoding: gzip\r\n\r\n",
        b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + b"\x00" * 64,  # a TLS hello on plain HTTP
    ]
    for request in cases:
        answer = raw(gw, request)
        assert answer.startswith(b"HTTP/1.1 400 "), (request[:60], answer[:200])
    # A megabyte of header: past h11's 16 KiB for an incomplete one, refused mid-send.
    huge = raw(gw, b"GET /healthz HTTP/1.1\r\nHost: gw\r\nX-Big: " + b"a" * 1_000_000 + b"\r\n\r\n")
    assert huge == RESET or huge.startswith(b"HTTP/1.1 400 "), huge[:200]
    # Headers that parse but say nothing useful: the API's own answers, as problem details.
    parsed = [
        (f"Authorization: Bearer {key}\xff".encode("latin-1"), 401),
        (b"Authorization: Bearer", 401),
        (b"Authorization: " + base64.b64encode(b"x" * 300), 401),
        (f"Authorization: Bearer {key}\r\nIdempotency-Key: {'k' * 300}".encode(), 400),
        (f"Authorization: Bearer {key}\r\nIdempotency-Key: a/b".encode(), 400),
    ]
    body = json.dumps({**JOB, "prompt": "x"}).encode()
    for header, status in parsed:
        request = b"POST /v1/jobs HTTP/1.1\r\nHost: gw\r\nConnection: close\r\n" + header
        answer = raw(gw, request + b"\r\nContent-Length: %d\r\n\r\n" % len(body) + body)
        head, _, payload = answer.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 %d " % status), (header[:60], answer[:300])
        assert b"content-type: " + PROBLEM_JSON.encode() in head.lower(), head
        assert json.loads(payload)["status"] == status
    assert gw.served()
    assert "Traceback" not in gw.log()


def test_bodies_over_the_limit_get_413(gw):
    """Declared or not (chunked), a JSON body past REFINERY_GATEWAY_MAX_BODY_BYTES and an
    upload past REFINERY_MAX_INPUT_BYTES are refused as soon as they pass it."""
    headers = auth(gw.key("heavy"))
    limit = gw.stack.settings.gateway_max_body_bytes

    def chunks(total: int) -> Iterator[bytes]:
        sent = 0
        while sent < total:
            yield b" " * min(1 << 20, total - sent)
            sent += 1 << 20

    for path, size, content_type in (
        ("/v1/jobs", limit + 1, "application/json"),
        ("/v1/jobs:batch", limit + 1, "application/json"),
        ("/v1/jobs:upload", gw.stack.settings.max_input_bytes + 1, "image/png"),
    ):
        # A generator body goes chunked: no Content-Length for the gateway to judge by.
        answer = gw.http.post(path, content=chunks(size), headers={**headers, "Content-Type": content_type})
        assert answer.status_code == 413 and answer.json()["code"] == "body_too_large", (path, answer.text)
        declared = gw.http.post(path, content=b" " * size, headers={**headers, "Content-Type": content_type})
        assert declared.status_code == 413, (path, declared.text)
    assert gw.served()


def test_deep_and_huge_json_gets_400(gw):
    headers = {**auth(gw.key("deep")), "Content-Type": "application/json"}
    bodies = [
        b"[" * 100_000 + b"]" * 100_000,
        b'{"jobs": ' + b"[" * 5_000 + b"]" * 5_000 + b"}",
        b'{"kind": "generate_and_refine", "prompt": "x", "seed": ' + b"9" * 5_000 + b"}",
        json.dumps({**JOB, "metadata": {f"k{i}": "v" * 10 for i in range(100_000)}}).encode(),
        json.dumps({**JOB, "prompt": "x" * 1_000_000}).encode(),
        # Metadata nested past the contract's 32 levels, within the parser's reach.
        b'{"jobs": [{"kind": "generate_and_refine", "prompt": "x", "metadata": '
        + b'{"a": ' * 40
        + b"1"
        + b"}" * 41
        + b"]}",
    ]
    for body in bodies:
        for path in ("/v1/jobs", "/v1/jobs:batch"):
            answer = gw.http.post(path, content=body, headers=headers)
            if answer.status_code == 200:  # a batch: refused item by item
                problems = [item["problem"] for item in answer.json()["jobs"]]
                assert problems and all(p and p["code"] == "invalid_input" for p in problems), answer.text[:300]
                continue
            assert answer.status_code == 400 and answer.json()["code"] == "invalid_input", (path, answer.text[:300])
    assert gw.served()
    assert "Traceback" not in gw.log()


def test_a_batch_is_admitted_in_one_script_call(gw):
    """Whatever its size: no transaction, no message sent apart (the producer library's
    own way takes a WATCH/MULTI/EXEC and a push per job), one call of the admission script."""
    headers = auth(gw.key("bulk", "--rate", "1000"))
    client = redis.Redis(port=gw.stack.redis_port)
    assert gw.http.post("/v1/jobs", json=JOB, headers=headers).status_code == 202  # the script is loaded

    def calls() -> dict[str, int]:
        stats = client.info("commandstats")
        names = ("evalsha", "eval", "multi", "exec", "watch", "lpush")
        return {name: stats.get(f"cmdstat_{name}", {}).get("calls", 0) for name in names}

    before = calls()
    answer = gw.http.post("/v1/jobs:batch", json={"jobs": [JOB] * 200}, headers=headers)
    after = calls()

    assert answer.status_code == 200 and all(item["job_id"] for item in answer.json()["jobs"]), answer.text[:300]
    assert {name: after[name] - before[name] for name in before} == {
        "evalsha": 1,
        "eval": 0,
        "multi": 0,
        "exec": 0,
        "watch": 0,
        "lpush": 200,  # inside the script
    }


def test_job_message_is_what_celery_sends(gw):
    """The message the admission script pushes (shared.routing.job_message) against the one
    Celery's own send_task pushes for the same job, captured from Redis."""
    settings = Settings(
        _env_file=None, redis_url=gw.stack.settings.redis_url, queues={"generate_and_refine": "scratch"}
    )
    app = make_celery(settings)
    spec = build_spec(GenerateSpec, prompt="portrait")
    record = JobRecord(job_id="f" * 32, kind="generate_and_refine", spec=spec, seed=1)
    app.send_task(
        "refinery.generate_and_refine", args=[record.job_id], task_id=record.job_id, queue="scratch", priority=3
    )
    client = redis.Redis(port=gw.stack.redis_port)
    sent = json.loads(client.lpop("scratch\x06\x163"))

    queue, message = job_message(app, record, settings)

    assert queue == "scratch"
    for part in ("body", "content-encoding", "content-type", "headers"):
        assert message[part] == sent[part], part
    assert sent["properties"].pop("priority") == 3  # the script sets it to the list's step
    for name in ("delivery_tag", "reply_to"):  # fresh per message; for result backends
        sent["properties"].pop(name)
        message["properties"].pop(name)
    assert message["properties"] == sent["properties"]
    # The producer library pushes it at the job's own priority, in its record's transaction.
    push = job_push(app, record, settings)
    assert push.list == "scratch\x06\x163" and json.loads(push.message)["properties"]["priority"] == 3


def test_bad_requests_get_problem_details_never_a_500(gw):
    key = gw.key("hostile")
    good = auth(key)
    limit = gw.stack.settings.gateway_max_body_bytes
    bucket = gw.stack.settings.s3_bucket
    # Nested within the JSON parser's reach, beyond the contract's.
    deep_metadata = b'{"kind": "generate_and_refine", "prompt": "x", "metadata": ' + b'{"a": ' * 900 + b"1" + b"}" * 901
    cases = [
        ("POST", "/v1/jobs", {"content": b"{not json", "headers": good}, 400, "invalid_input"),
        ("POST", "/v1/jobs", {"content": b"[" * 100_000, "headers": good}, 400, "invalid_input"),
        ("POST", "/v1/jobs", {"content": b"\xff\xfe", "headers": good}, 400, "invalid_input"),
        ("POST", "/v1/jobs", {"json": [1, 2], "headers": good}, 400, "invalid_input"),
        ("POST", "/v1/jobs", {"json": {"kind": "pair"}, "headers": good}, 400, "invalid_input"),
        ("POST", "/v1/jobs", {"json": {"kind": []}, "headers": good}, 400, "invalid_input"),
        ("POST", "/v1/jobs", {"content": deep_metadata, "headers": good}, 400, "invalid_input"),
        (
            "POST",
            "/v1/jobs",
            {"json": {"kind": "generate_and_refine", "prompt": "x", "tenant": "x"}, "headers": good},
            400,
            "invalid_input",
        ),
        (
            "POST",
            "/v1/jobs",
            {"json": {"kind": "generate_and_refine", "prompt": 7}, "headers": good},
            400,
            "invalid_input",
        ),
        (
            "POST",
            "/v1/jobs",
            {"json": {"kind": "generate_and_refine", "prompt": "x"}, "headers": {**good, "Idempotency-Key": "a b"}},
            400,
            "invalid_input",
        ),
        (
            "POST",
            "/v1/jobs",
            {
                "json": {"kind": "generate_and_refine", "prompt": "x", "callback_url": "http://169.254.169.254/"},
                "headers": good,
            },
            400,
            "callback_url_refused",
        ),
        (
            "POST",
            "/v1/jobs",
            {"json": {"kind": "refine_only", "input_uri": "s3://other-bucket/x.png"}, "headers": good},
            400,
            "invalid_input",
        ),
        (
            "POST",
            "/v1/jobs",
            {"json": {"kind": "refine_only", "input_uri": f"s3://{bucket}/pairs/x.png"}, "headers": good},
            400,
            "invalid_input",
        ),
        ("POST", "/v1/jobs", {"content": b"x" * (limit + 1), "headers": good}, 413, "body_too_large"),
        ("POST", "/v1/jobs:batch", {"json": {"jobs": []}, "headers": good}, 400, "invalid_input"),
        ("POST", "/v1/jobs:batch", {"json": {"jobs": [{}] * 1001}, "headers": good}, 400, "invalid_input"),
        (
            "POST",
            "/v1/jobs:upload",
            {"content": b"not an image", "headers": {**good, "Content-Type": "image/png"}},
            400,
            "invalid_image",
        ),
        (
            "POST",
            "/v1/jobs:upload",
            {"content": png(), "headers": {**good, "Content-Type": "text/plain"}},
            415,
            "unsupported_media_type",
        ),
        (
            "POST",
            "/v1/jobs:upload?deadline_s=soon",
            {"content": png(), "headers": {**good, "Content-Type": "image/png"}},
            400,
            "invalid_input",
        ),
        (
            "POST",
            "/v1/jobs:upload?metadata=%5B",
            {"content": png(), "headers": {**good, "Content-Type": "image/png"}},
            400,
            "invalid_input",
        ),
        ("GET", "/v1/usage", {}, 401, "unauthorized"),
        ("GET", "/v1/usage", {"headers": {"Authorization": "Bearer rfk_nope"}}, 401, "unauthorized"),
        ("GET", "/v1/usage", {"headers": {"Authorization": "Basic dXNlcjpwYXNz"}}, 401, "unauthorized"),
        (
            "GET",
            "/v1/usage",
            {"headers": {"Authorization": "Bearer rfk_" + "0" * 16 + "_" + "A" * 43}},
            401,
            "unauthorized",
        ),
        ("GET", "/v1/jobs/%00%ff", {"headers": good}, 404, "job_not_found"),
        ("GET", "/v1/nowhere", {}, 404, "not_found"),
        ("DELETE", "/v1/jobs", {"headers": good}, 405, "method_not_allowed"),
    ]
    for method, path, request, status, code in cases:
        answer = gw.http.request(method, path, **request)
        assert (answer.status_code, answer.headers["content-type"]) == (status, PROBLEM_JSON), (path, answer.text)
        assert answer.json()["code"] == code, (path, answer.text)
    assert "Traceback" not in gw.log()


def test_schema_driven_fuzzing_finds_no_server_error(gw):
    """Schemathesis generates requests from the served OpenAPI document, valid and not,
    and fails on any 5xx. The tenant may queue one job at most (every other submit is a
    429 after the contract's checks ran), so the worker is not left with fuzzed jobs."""
    key = gw.key("fuzz", "--rate", "0.01", "--max-queued", "1")
    argv = [str(Path(sys.executable).parent / "st"), "run", f"{gw.url}/openapi.json", "--no-color"]
    argv += ["-H", f"Authorization: Bearer {key['key']}", "--checks", "not_a_server_error"]
    argv += ["--max-examples", "60", "--seed", "20", "--workers", "2"]

    done = subprocess.run(argv, capture_output=True, text=True, timeout=300)

    assert done.returncode == 0, done.stdout[-4000:]
    assert "Traceback" not in gw.log()
