"""SIGTERM drains a model worker (Kubernetes eviction, spot preemption, ``docker stop``).

Real processes, default settings (the visibility timeout stays an hour, so a message that
came back sooner was handed back, not redelivered): the batch on the model finishes where
it runs, every job the worker held but had not started is back on its queue at once, and
another worker runs each of them once, the attempt not counted.
"""

from __future__ import annotations

import signal
import time
from collections import Counter

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from devstack.stack import LocalStack, free_port, wait_until
from producer.client import Client
from shared.broker import queue_depth
from shared.contract import JobState

pytestmark = pytest.mark.integration

LONG = 1024  # a batch of a few seconds on this CPU: long enough to be caught on the model
SMALL = 64  # jobs that only wait behind it, and then run quickly elsewhere


def _unfinished(client: Client, job_ids: list[str]) -> list[str]:
    return [j for j in job_ids if not client.status(j).state.terminal]


def _on_model(metrics_url: str) -> float:
    families = text_string_to_metric_families(httpx.get(metrics_url, timeout=10).text)
    return next(s.value for f in families for s in f.samples if s.name == "refinery_jobs_on_model")


def _terminate(stack: LocalStack, name: str, timeout_s: float = 120) -> tuple[int, float]:
    """SIGTERM, then the exit status and how long the drain took."""
    process = stack.processes.pop(name)
    started = time.monotonic()
    process.send_signal(signal.SIGTERM)
    return process.wait(timeout_s), time.monotonic() - started


def test_sigterm_finishes_the_batch_on_the_model_and_hands_back_the_rest_at_once(tmp_path, receiver):
    with LocalStack(tmp_path) as stack:
        stack.start_worker("callbacks", [stack.settings.queue_callbacks])
        stack.start_worker("leaving")
        client = Client(stack.settings)
        # Default max_batch 4 and 8 jobs held: a batch of long jobs on the model, four small
        # ones waiting behind it (a batch holds one size) and four more still queued.
        sizes = [LONG // 2] * 4 + [SMALL] * 8
        job_ids = [
            client.submit_generate("portrait", seed=s, width=size, height=size, callback_url=receiver.url).job_id
            for s, size in enumerate(sizes)
        ]
        wait_until(
            lambda: sum(client.status(j).state is JobState.running for j in job_ids) >= 8,
            timeout_s=60,
            what="eight jobs held by the worker",
        )
        status, drain_s = _terminate(stack, "leaving")
        left = _unfinished(client, job_ids)
        depth = queue_depth(client.store.redis, stack.settings.queue("generate_and_refine"))
        states = Counter(client.status(j).state for j in left)

        stack.start_worker("staying")
        records = [client.wait(j, 180) for j in job_ids]
        wait_until(lambda: len(receiver.requests) >= len(job_ids), timeout_s=60, what="callbacks")
        stack.wait_callbacks_settled()  # a duplicate, if there were one, has arrived too
        results = stack.results()
        log = (stack.logs / "leaving.log").read_text()

    print(f"drain took {drain_s:.1f} s; {len(job_ids) - len(left)} jobs finished there, {len(left)} handed back")
    assert status == 0, log[-3000:]
    finished_there = [r for r in records if r.worker == "leaving@localstack"]
    assert 1 <= len(finished_there) <= 4, "the batch on the model finished where it ran, and nothing else did"
    assert len(left) == len(job_ids) - len(finished_there) >= 8
    # Every unfinished job is queued again with its message on the queue, an hour before
    # the visibility timeout would have brought it back.
    assert states == Counter({JobState.queued: len(left)})
    assert depth == len(left)
    assert "handed back unstarted" in log

    assert all(r.state is JobState.succeeded for r in records), [r.error for r in records]
    assert all(r.attempts == 1 for r in records), "a handed-back job counted an attempt, or ran twice"
    assert {r.job_id for r in records if r.worker == "staying@localstack"} == set(left)
    assert results == {j: ["refined.png"] for j in job_ids}
    delivered = Counter(next(j for j in job_ids if j in body) for body in receiver.requests)
    assert delivered == Counter({j: 1 for j in job_ids})


def test_a_batch_longer_than_the_drain_timeout_is_handed_back_too(tmp_path):
    # The one setting changed is the one under test: a drain budget shorter than the batch.
    with LocalStack(tmp_path, drain_timeout_s=0.5) as stack:
        stack.start_worker("leaving", metrics_port=free_port())
        client = Client(stack.settings)
        job_ids = [
            client.submit_generate("portrait", seed=s, width=LONG // 2, height=LONG // 2).job_id for s in range(2)
        ]
        # Running is claimed, not yet on the model (a loaded machine claims a job well before
        # its batch starts): the worker's gauge says when the model has them (both, or the
        # first while the second waits for the next batch: both are handed back either way).
        metrics_url = client.store.workers()["leaving@localstack"]["metrics_url"]
        wait_until(lambda: _on_model(metrics_url) > 0, timeout_s=60, what="a batch on the model")
        status, _ = _terminate(stack, "leaving")
        records_after = [client.status(j) for j in job_ids]
        depth = queue_depth(client.store.redis, stack.settings.queue("generate_and_refine"))
        live = client.store.workers()
        log = (stack.logs / "leaving.log").read_text()

        stack.start_worker("staying")
        records = [client.wait(j, 180) for j in job_ids]
        results = stack.results()

    assert status == 0, log[-3000:]
    assert "outlived 0.5 s; handed back" in log
    assert all(r.state is JobState.queued and r.attempts == 0 for r in records_after)
    assert depth == len(job_ids)
    assert "leaving@localstack" not in live
    assert all(r.state is JobState.succeeded and r.attempts == 1 and r.worker == "staying@localstack" for r in records)
    assert results == {j: ["refined.png"] for j in job_ids}
