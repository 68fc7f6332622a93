"""The HTTP gateway end to end: two real `refinery gateway` processes (replicas sharing
Redis), a real `refinery worker`, redis-server and moto's S3 server, all on loopback, with
the settings a user would keep. Everything is driven over HTTP, as a client in any
language would."""

from __future__ import annotations

import io
import json
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from PIL import Image

from devstack.stack import LocalStack, free_port, wait_until
from producer.gateway.usage import model_ms_of
from shared.contract import JobRecord

pytestmark = pytest.mark.integration

OPENAPI = Path(__file__).parents[1] / "docs" / "openapi.json"
SIZE = 64
PROBLEM_JSON = "application/problem+json"


class Gateways:
    """The stack, two gateway replicas (``a``, ``b``) and a way to make keys."""

    def __init__(self, stack: LocalStack) -> None:
        self.stack = stack
        self.urls: list[str] = []
        for name in ("gateway-a", "gateway-b"):
            port = free_port()
            argv = [sys.executable, "-m", "cli", "gateway", "--port", str(port)]
            process = stack.spawn(name, argv)
            url = f"http://127.0.0.1:{port}"
            wait_until(
                lambda: httpx.get(f"{url}/readyz").status_code == 200,
                timeout_s=60,
                what=name,
                process=process,
                log=stack.logs / f"{name}.log",
            )
            self.urls.append(url)
        self.a, self.b = (httpx.Client(base_url=url, timeout=60) for url in self.urls)

    def key(self, tenant: str, *options: str) -> dict:
        done = self.stack.refinery("keys", "create", "--tenant", tenant, *options, "--json")
        assert done.returncode == 0, done.stderr
        return json.loads(done.stdout)


def auth(key: dict) -> dict[str, str]:
    return {"Authorization": f"Bearer {key['key']}"}


@pytest.fixture(scope="module")
def gw(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateways]:
    with LocalStack(tmp_path_factory.mktemp("gateway")) as stack:
        stack.start_worker("worker")
        yield Gateways(stack)


def follow(client: httpx.Client, job_id: str, key: dict) -> list[tuple[str, dict]]:
    """Every event of a job's stream, until the gateway ends it."""
    events, name = [], None
    with client.stream("GET", f"/v1/jobs/{job_id}/events", headers=auth(key), timeout=120) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        for line in response.iter_lines():
            if line.startswith("event: "):
                name = line.removeprefix("event: ")
            elif line.startswith("data: "):
                events.append((name, json.loads(line.removeprefix("data: "))))
    return events


def png(colour: tuple[int, int, int] = (120, 90, 60)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (SIZE, SIZE), colour).save(buffer, "PNG")
    return buffer.getvalue()


def test_submit_follow_and_download(gw):
    key = gw.key("acme")
    job = {"kind": "generate_and_refine", "prompt": "portrait of a fisherman", "seed": 3, "width": SIZE, "height": SIZE}

    submitted = gw.a.post("/v1/jobs", json=job, headers=auth(key))
    assert submitted.status_code == 202, submitted.text
    record = submitted.json()
    # As it stood just after the submit: the worker may already have taken it.
    assert record["tenant"] == "acme" and record["state"] in ("queued", "running")
    assert submitted.headers["location"] == f"/v1/jobs/{record['job_id']}"

    # Followed on the other replica: the gateway keeps nothing of its own.
    events = follow(gw.b, record["job_id"], key)
    states = [name for name, _ in events]
    assert states[-1] == "succeeded" and "queued" not in states[1:], states
    assert events[-1][1]["state"] == "succeeded"
    done = gw.a.get(f"/v1/jobs/{record['job_id']}", headers=auth(key)).json()
    image = Image.open(io.BytesIO(httpx.get(done["result"]["url"]).content))
    assert image.size == (SIZE, SIZE)


def test_refine_upload_and_s3_input(gw):
    key = gw.key("uploader")
    uploaded = gw.a.post(
        "/v1/jobs:upload?output_format=webp&keep_input=true",  # refined again below
        content=png(),
        headers={**auth(key), "Content-Type": "image/png", "Idempotency-Key": "upload-1"},
    )
    assert uploaded.status_code == 202, uploaded.text
    again = gw.b.post(
        "/v1/jobs:upload?output_format=webp&keep_input=true",
        content=png(),
        headers={**auth(key), "Content-Type": "image/png", "Idempotency-Key": "upload-1"},
    )
    assert again.json()["job_id"] == uploaded.json()["job_id"]
    record = follow(gw.a, uploaded.json()["job_id"], key)[-1][1]
    assert record["state"] == "succeeded" and record["result"]["format"] == "webp"

    # The uploaded input now lives in the bucket: refine it again by its s3:// URI.
    job = {"kind": "refine_only", "input_uri": record["spec"]["input_uri"]}
    by_uri = gw.b.post("/v1/jobs", json=job, headers=auth(key)).json()
    assert follow(gw.b, by_uri["job_id"], key)[-1][0] == "succeeded"
    # Another tenant may not: the objects of a job are its tenant's.
    for uri in (record["spec"]["input_uri"], record["result"]["uri"]):
        refused = gw.b.post("/v1/jobs", json={**job, "input_uri": uri}, headers=auth(gw.key("prying")))
        assert refused.status_code == 400 and refused.json()["field"] == "input_uri", refused.text


def test_batch_with_one_bad_item(gw):
    key = gw.key("batcher")
    jobs = [
        {"kind": "generate_and_refine", "prompt": "portrait", "seed": i, "width": SIZE, "height": SIZE}
        for i in range(3)
    ]
    jobs[1]["width"] = 100

    answer = gw.a.post("/v1/jobs:batch", json={"jobs": jobs}, headers=auth(key))

    assert answer.status_code == 200, answer.text
    items = answer.json()["jobs"]
    assert [item["index"] for item in items] == [0, 1, 2]
    assert items[1]["job_id"] is None
    assert items[1]["problem"]["code"] == "invalid_input" and items[1]["problem"]["field"] == "width"
    for item in (items[0], items[2]):
        assert item["problem"] is None
        assert follow(gw.b, item["job_id"], key)[-1][0] == "succeeded"


def test_tenants_see_only_their_own_jobs(gw):
    owner, other = gw.key("owner"), gw.key("intruder")
    job = {"kind": "generate_and_refine", "prompt": "portrait", "width": SIZE, "height": SIZE, "seed": 1}
    job_id = gw.a.post("/v1/jobs", json=job, headers=auth(owner)).json()["job_id"]
    unknown = "0" * 32

    for path, method in (("", "GET"), (":cancel", "POST"), ("/events", "GET")):
        theirs = gw.b.request(method, f"/v1/jobs/{job_id}{path}", headers=auth(other))
        missing = gw.b.request(method, f"/v1/jobs/{unknown}{path}", headers=auth(other))
        assert theirs.status_code == missing.status_code == 404
        assert theirs.headers["content-type"] == missing.headers["content-type"] == PROBLEM_JSON
        # The same answer but for the id it names.
        assert theirs.json() == json.loads(missing.text.replace(unknown, job_id))
    # Same idempotency key, other tenant: a job of its own, not the owner's.
    keyed = {**job, "idempotency_key": "order-1"}
    first = gw.a.post("/v1/jobs", json=keyed, headers=auth(owner)).json()["job_id"]
    second = gw.a.post("/v1/jobs", json=keyed, headers=auth(other)).json()["job_id"]
    assert first != second
    assert gw.a.get(f"/v1/jobs/{job_id}", headers=auth(owner)).json()["tenant"] == "owner"


def test_rate_limit_and_queued_cap_across_replicas(gw):
    slow = gw.key("slow", "--rate", "0.5")
    job = {"kind": "generate_and_refine", "prompt": "portrait", "width": SIZE, "height": SIZE, "seed": 2}

    assert gw.a.post("/v1/jobs", json=job, headers=auth(slow)).status_code == 202
    refused = gw.b.post("/v1/jobs", json=job, headers=auth(slow))

    assert refused.status_code == 429 and refused.headers["content-type"] == PROBLEM_JSON
    assert refused.json()["code"] == "rate_limited"
    assert 1 <= int(refused.headers["retry-after"]) <= 2

    capped = gw.key("capped", "--max-queued", "2")
    over = gw.b.post("/v1/jobs:batch", json={"jobs": [job] * 3}, headers=auth(capped))
    assert over.status_code == 429 and over.json()["code"] == "max_queued"
    assert int(over.headers["retry-after"]) >= 1
    # Jobs a worker took no longer count: the cap frees up as they run.
    for _ in range(2):
        items = gw.a.post("/v1/jobs:batch", json={"jobs": [job] * 2}, headers=auth(capped)).json()["jobs"]
        assert all(follow(gw.b, item["job_id"], capped)[-1][0] == "succeeded" for item in items)


def test_revoked_key_fails_on_every_replica_within_a_second(gw):
    key = gw.key("leaver")
    assert all(client.get("/v1/usage", headers=auth(key)).status_code == 200 for client in (gw.a, gw.b))

    done = gw.stack.refinery("keys", "revoke", key["key_id"])
    revoked_at = time.monotonic()
    assert done.returncode == 0, done.stderr

    for client in (gw.a, gw.b):
        answer = client.get("/v1/usage", headers=auth(key))
        assert answer.status_code == 401 and answer.json()["code"] == "unauthorized"
        assert answer.headers["www-authenticate"].startswith("Bearer")
    assert time.monotonic() - revoked_at < 1.0
    listed = gw.stack.refinery("keys", "list", "--json").stdout.splitlines()
    assert any(json.loads(line)["key_id"] == key["key_id"] and json.loads(line)["revoked_at"] for line in listed)


def test_usage_equals_what_ran(gw):
    key = gw.key("billed")
    bucket = gw.stack.settings.s3_bucket
    jobs = [
        {"kind": "generate_and_refine", "prompt": "portrait", "width": SIZE, "height": SIZE, "seed": 4},
        {"kind": "generate_and_refine", "prompt": "portrait", "width": SIZE, "height": SIZE, "keep_raw": True},
    ]
    job_ids = [
        item["job_id"] for item in gw.a.post("/v1/jobs:batch", json={"jobs": jobs}, headers=auth(key)).json()["jobs"]
    ]
    # An object of its own job that does not exist: accepted, then failed by the worker.
    missing = f"s3://{bucket}/{gw.stack.settings.s3_prefix}/jobs/{job_ids[0]}/missing.png"
    job_ids.append(
        gw.a.post("/v1/jobs", json={"kind": "refine_only", "input_uri": missing}, headers=auth(key)).json()["job_id"]
    )
    records = [JobRecord.model_validate(follow(gw.a, job_id, key)[-1][1]) for job_id in job_ids]
    assert [r.state.value for r in records] == ["succeeded", "succeeded", "failed"]

    usage = gw.b.get("/v1/usage", headers=auth(key)).json()

    assert usage["jobs"] == {"generate_and_refine": {"succeeded": 2}, "refine_only": {"failed": 1}}
    assert usage["images"] == {"generate_and_refine": {"succeeded": 3}, "refine_only": {"failed": 1}}
    model_s = sum(model_ms_of(r) for r in records[:2]) / 1000
    assert model_s > 0
    assert usage["model_seconds"] == {"generate_and_refine": pytest.approx(model_s, abs=1e-6)}
    # Read again (on the other replica): finished jobs are counted once.
    assert gw.a.get("/v1/usage", headers=auth(key)).json() == usage
    metrics = gw.a.get("/metrics").text
    assert 'refinery_tenant_jobs{kind="generate_and_refine",state="succeeded",tenant="billed"} 2.0' in metrics
    assert 'refinery_tenant_images{kind="refine_only",state="failed",tenant="billed"} 1.0' in metrics
    assert 'refinery_tenant_model_seconds_total{kind="generate_and_refine",tenant="billed"}' in metrics
    assert 'refinery_gateway_request_seconds_count{method="POST",route="/v1/jobs:batch",status="200"}' in metrics


def test_committed_openapi_is_what_the_gateway_serves(gw):
    served = gw.a.get("/openapi.json").json()
    assert served == json.loads(OPENAPI.read_text()), "regenerate: refinery gateway --openapi > docs/openapi.json"


def test_keys_refuses_bad_input(gw):
    for argv, field in (
        (["create", "--tenant", "two words"], "tenant"),
        (["create", "--tenant", "ok", "--rate", "inf"], "rate"),
        (["create", "--tenant", "ok", "--max-queued", "0"], "max_queued"),
        (["revoke", "0" * 16], "key_id"),
    ):
        done = gw.stack.refinery("keys", *argv)
        assert done.returncode == 2 and f"error [invalid_input] {field}:" in done.stderr, done.stderr


def test_redis_down_is_503_with_retry_after(gw):
    """Last in the module: it stops the stack's Redis."""
    key = gw.key("late")
    gw.stack.stop_process("redis")

    for answer in (
        gw.a.get("/readyz"),
        gw.a.get("/v1/usage", headers=auth(key)),
        gw.b.post("/v1/jobs", json={"kind": "generate_and_refine", "prompt": "x"}, headers=auth(key)),
    ):
        assert answer.status_code == 503 and answer.headers["content-type"] == PROBLEM_JSON, answer.text
        assert answer.json()["code"] == "broker_unavailable" and answer.headers["retry-after"] == "1"
    assert gw.a.get("/healthz").status_code == 200
