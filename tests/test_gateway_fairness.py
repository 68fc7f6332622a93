"""Fairness between tenants through a real gateway: tenant A queues 200 jobs, then tenant B
queues 5; the one worker finishes all of B's before A's 40th (producer/gateway/fairness.py).
A stack of its own (redis-server, moto's S3 server, one `refinery worker`, one
`refinery gateway`), default settings, tiny-schnell at 64 px."""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator

import httpx
import pytest

from devstack.stack import LocalStack, free_port, wait_until
from producer.gateway.fairness import broker_rank
from shared.contract import Priority

pytestmark = pytest.mark.integration

SIZE = 64


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[LocalStack, httpx.Client]]:
    with LocalStack(tmp_path_factory.mktemp("fairness")) as stack:
        port = free_port()
        process = stack.spawn("gateway", [sys.executable, "-m", "cli", "gateway", "--port", str(port)])
        url = f"http://127.0.0.1:{port}"
        log = stack.logs / "gateway.log"
        wait_until(
            lambda: httpx.get(f"{url}/readyz").status_code == 200,
            timeout_s=60,
            what="gateway",
            process=process,
            log=log,
        )
        with httpx.Client(base_url=url, timeout=60) as client:
            yield stack, client


def key(stack: LocalStack, tenant: str) -> dict[str, str]:
    done = stack.refinery("keys", "create", "--tenant", tenant, "--json")
    assert done.returncode == 0, done.stderr
    return {"Authorization": f"Bearer {json.loads(done.stdout)['key']}"}


def job(seed: int) -> dict:
    return {"kind": "generate_and_refine", "prompt": "portrait", "seed": seed, "width": SIZE, "height": SIZE}


def finish(client: httpx.Client, job_id: str, headers: dict[str, str]) -> None:
    """Follow the job's events until its stream ends (a terminal state)."""
    with client.stream("GET", f"/v1/jobs/{job_id}/events", headers=headers, timeout=120) as response:
        assert response.status_code == 200
        last = [line for line in response.iter_lines() if line.startswith("event: ")][-1]
    assert last == "event: succeeded", last


def test_a_burst_does_not_hold_another_tenants_jobs_behind_it(stack):
    stack, client = stack
    a, b = key(stack, "bursty"), key(stack, "quiet")
    # The worker starts after both submits, so the queue is exactly what the gateway made it.
    burst = client.post("/v1/jobs:batch", json={"jobs": [job(i) for i in range(200)]}, headers=a)
    assert burst.status_code == 200, burst.text
    a_ids = [item["job_id"] for item in burst.json()["jobs"]]
    assert all(a_ids)
    b_ids = []
    for i in range(5):
        submitted = client.post("/v1/jobs", json=job(1000 + i), headers=b)
        assert submitted.status_code == 202, submitted.text
        b_ids.append(submitted.json()["job_id"])
    stack.start_worker("worker")

    for job_id in b_ids:
        finish(client, job_id, b)
    b_done = [client.get(f"/v1/jobs/{job_id}", headers=b).json()["finished_at"] for job_id in b_ids]
    a_records = [client.get(f"/v1/jobs/{job_id}", headers=a).json() for job_id in a_ids]
    a_done = sorted(r["finished_at"] for r in a_records if r["finished_at"])
    # 1-based positions of B's jobs among every finished job, by finished_at.
    order = sorted([(t, "a") for t in a_done] + [(t, "b") for t in b_done])
    positions = [n for n, (_, tenant) in enumerate(order, start=1) if tenant == "b"]
    print(f"B's jobs finished at positions {positions} of the {len(order)} finished so far")
    assert max(positions) < 40, positions
    # A's first jobs kept their place: fairness demotes a burst's tail, not the tenant.
    assert positions[0] > 1, positions


def test_explicit_priority_combines_with_the_demotion():
    # Quiet tenant: high 0, normal 3, low 6; bursting: one step lower each, low at the last.
    ranks = [Priority.high.rank, Priority.normal.rank, Priority.low.rank]
    assert [broker_rank(rank, False) for rank in ranks] == [0, 3, 6]
    assert [broker_rank(rank, True) for rank in ranks] == [3, 6, 9]
