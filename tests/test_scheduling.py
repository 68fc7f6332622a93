"""Jobs while they wait: cancellation, deadlines, priorities and admission control.

Each test starts a stack with no worker, so its jobs are certainly still queued, sets
the scene, then starts the worker and checks what it did.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest

from devstack.stack import LocalStack
from producer.client import Client
from shared.broker import queue_lists
from shared.contract import JobState
from shared.errors import QueueFull

pytestmark = pytest.mark.integration

SIZE = 32


@pytest.fixture
def idle_stack(tmp_path) -> Iterator[LocalStack]:
    # max_batch 1 runs jobs one at a time, so their order is visible in started_at.
    with LocalStack(tmp_path, max_batch=1, max_queue_depth=4) as stack:
        yield stack


def test_cancelled_queued_job_never_runs(idle_stack):
    client = Client(idle_stack.settings)
    cancelled = client.submit_generate("portrait", seed=1, width=SIZE, height=SIZE)
    kept = client.submit_generate("portrait", seed=2, width=SIZE, height=SIZE)
    assert cancelled.cancel().state is JobState.cancelled

    idle_stack.start_worker("worker")

    assert kept.wait(60).state is JobState.succeeded
    final = cancelled.status()
    assert final.state is JobState.cancelled and final.attempts == 0 and final.started_at is None
    assert cancelled.job_id not in idle_stack.results()


def test_job_past_its_deadline_fails_expired(idle_stack):
    client = Client(idle_stack.settings)
    late = client.submit_generate("portrait", seed=1, width=SIZE, height=SIZE, deadline_s=0.2)
    in_time = client.submit_generate("portrait", seed=2, width=SIZE, height=SIZE, deadline_s=600)
    time.sleep(0.3)  # the first deadline (0.2 s) passes in the queue: no worker is running yet

    idle_stack.start_worker("worker")

    expired = late.wait(60)
    assert expired.state is JobState.failed and expired.error.code == "expired" and expired.attempts == 0
    assert in_time.wait(60).state is JobState.succeeded
    assert late.job_id not in idle_stack.results()


def test_higher_priority_runs_first(idle_stack):
    client = Client(idle_stack.settings)
    low = client.submit_generate("portrait", seed=1, width=SIZE, height=SIZE, priority="low")
    normal = client.submit_generate("portrait", seed=2, width=SIZE, height=SIZE)
    high = client.submit_generate("portrait", seed=3, width=SIZE, height=SIZE, priority="high")

    idle_stack.start_worker("worker")

    first, second, last = (job.wait(60) for job in (high, normal, low))
    assert all(r.state is JobState.succeeded and r.batch_size == 1 for r in (first, second, last))
    # The worker holds two jobs at a time (one running, one gathering): it took the
    # high and normal ones from the broker first, and low only once a slot was free.
    # (The order within the worker is the batcher's, tested in test_batcher.py.)
    assert last.started_at > max(first.started_at, second.started_at)
    assert last.started_at >= min(first.finished_at, second.finished_at)


def test_an_idempotent_resubmit_sends_no_second_message(idle_stack):
    """A producer retrying a submit (its reply lost) gets the first job, and the queue still
    holds one message for it: a second would count twice in the depth that `queue_full` and
    KEDA's scaling read."""
    client = Client(idle_stack.settings)
    queue = client.settings.queue("generate_and_refine")

    def submit(seed: int, **extra):
        return client.submit_generate("portrait", seed=seed, width=SIZE, height=SIZE, **extra)

    first = submit(1, idempotency_key="order-7", priority="low")
    assert {submit(1, idempotency_key="order-7", priority="low").job_id for _ in range(5)} == {first.job_id}
    # One message, on the low priority's list, where Celery itself would have put it.
    assert [client.store.redis.llen(name) for name in queue_lists(queue)] == [0, 0, 1, 0]
    for seed in (2, 3, 4):  # the limit is 4 jobs, not 4 messages
        submit(seed)
    with pytest.raises(QueueFull):
        submit(5)

    idle_stack.start_worker("worker")
    record = first.wait(60)
    assert record.state is JobState.succeeded and record.attempts == 1


def test_full_queue_refuses_submit(idle_stack):
    client = Client(idle_stack.settings)
    for seed in range(4):
        client.submit_generate("portrait", seed=seed, width=SIZE, height=SIZE)

    with pytest.raises(QueueFull) as refused:
        client.submit_generate("portrait", seed=9, width=SIZE, height=SIZE)
    assert refused.value.code == "queue_full"
    # The refine queue is counted on its own.
    assert client.submit_refine(input_uri=f"s3://{client.settings.s3_bucket}/x.png").job_id
