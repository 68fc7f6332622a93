"""Faults set up for real: workers killed, Redis restarted, S3 stopped, callback receivers
down, poisonous jobs, cancellation mid-run. Nothing is lost and nothing runs twice.

Each test runs its own stack (tests/conftest.py's session stack stays healthy). Timings
only bound waits; assertions are about outcomes and order, never about speed.
"""

from __future__ import annotations

import json
import signal
import threading
import time
from collections import Counter

import pytest

from devstack.s3_proxy import S3Proxy
from devstack.stack import LocalStack, wait_until
from producer.client import Client
from shared import keys
from shared.broker import queue_lists
from shared.contract import GenerateSpec, JobRecord, JobState

pytestmark = pytest.mark.integration

SIZE = 64
LONG = 1024  # a job of a few seconds on this CPU: long enough to be caught running


def _wait_running(client: Client, job_ids: list[str], timeout_s: float = 60) -> None:
    wait_until(
        lambda: any(client.status(j).state is JobState.running for j in job_ids),
        timeout_s=timeout_s,
        what="a running job",
    )


def test_worker_killed_mid_batch_loses_nothing_and_runs_nothing_twice(tmp_path, receiver):
    with LocalStack(tmp_path, visibility_timeout_s=3, lease_s=3, max_batch=4) as stack:
        stack.start_worker("callbacks", [stack.settings.queue_callbacks])
        stack.start_worker("doomed")
        client = Client(stack.settings)
        jobs = [
            client.submit_generate("portrait", seed=s, width=LONG // 2, height=LONG // 2, callback_url=receiver.url)
            for s in range(4)
        ]
        _wait_running(client, [j.job_id for j in jobs])
        stack.stop_process("doomed", signal.SIGKILL)
        stack.start_worker("rescuer")

        records = [j.wait(180) for j in jobs]
        wait_until(lambda: len(receiver.requests) >= len(jobs), timeout_s=60, what="callbacks")
        stack.wait_callbacks_settled()  # a duplicate, if there were one, has arrived too
        results = stack.results()

    assert all(r.state is JobState.succeeded for r in records), [r.error for r in records]
    assert all(r.worker == "rescuer@localstack" for r in records)
    assert max(r.attempts for r in records) == 2  # those caught running ran again, once
    assert results == {r.job_id: ["refined.png"] for r in records}
    delivered = Counter(next(r.job_id for r in records if r.job_id in body) for body in receiver.requests)
    assert delivered == Counter({r.job_id: 1 for r in records})


def test_worker_killed_right_after_a_job_succeeded_still_calls_back_once(tmp_path, receiver):
    """benchmarks/soak.py's case: a worker SIGKILLed the moment its job's success is
    published. The callback goes in the transaction that ends the job, so the receiver hears
    of it once, from a callbacks worker started afterwards (before, 2 of 10 such kills in the
    soak lost it: the redelivery finds the job finished and does nothing)."""
    with LocalStack(tmp_path) as stack:
        stack.start_worker("doomed")
        client = Client(stack.settings)
        events = client.store.redis.pubsub(ignore_subscribe_messages=True)
        events.psubscribe(keys.job_events_channel("*"))
        job = client.submit_generate("portrait", seed=1, width=SIZE, height=SIZE, callback_url=receiver.url)
        deadline = time.monotonic() + 60
        while (message := events.get_message(timeout=1)) is None or message["data"] != b"succeeded":
            assert time.monotonic() < deadline, "the job did not succeed in 60 s"
        stack.stop_process("doomed", signal.SIGKILL)
        events.close()

        stack.start_worker("callbacks", [stack.settings.queue_callbacks])
        wait_until(lambda: len(receiver.requests) >= 1, timeout_s=60, what="the callback")
        stack.wait_callbacks_settled()
        record = job.status()

    assert record.state is JobState.succeeded
    assert [json.loads(body)["data"]["job_id"] for body in receiver.requests] == [job.job_id]


def test_a_callback_message_lost_on_the_broker_is_sent_again_once(tmp_path, receiver):
    """benchmarks/soak.py's missing callback (1 of 30,000 with 7 failovers): a failover
    between kombu's BRPOP and its unacknowledged entry loses the message. The callback
    stays pending (keys.CALLBACKS_PENDING) until a callbacks worker settles it, and that
    worker's sweep sends it again; before, the receiver never heard of the job."""
    with LocalStack(tmp_path) as stack:
        stack.start_worker("worker")
        client = Client(stack.settings)
        job = client.submit_generate("portrait", seed=1, width=SIZE, height=SIZE, callback_url=receiver.url)
        assert job.wait(60).state is JobState.succeeded
        redis = client.store.redis
        lost = redis.delete(*queue_lists(stack.settings.queue_callbacks))  # what the failover took
        stack.start_worker("callbacks", [stack.settings.queue_callbacks])
        wait_until(lambda: len(receiver.requests) >= 1, timeout_s=4 * stack.settings.orphan_check_s, what="callback")
        stack.wait_callbacks_settled()
        pending = redis.zcard(keys.CALLBACKS_PENDING)
        log = (stack.logs / "callbacks.log").read_text()

    assert lost == 1
    assert [json.loads(body)["data"]["job_id"] for body in receiver.requests] == [job.job_id]
    assert f"job {job.job_id}: its succeeded callback had no message left on the broker; sent again" in log
    assert pending == 0  # settled: no sweep sends it again


class HoldFirstUpload(S3Proxy):
    """S3 stores the first upload of each result, then its reply waits until ``release``:
    the window between a worker's upload and the transaction that ends its job."""

    def __init__(self) -> None:
        super().__init__()
        self.stored_results: Counter[str] = Counter()
        self.holding, self.release = threading.Event(), threading.Event()

    def stored(self, path: str, body: bytes) -> None:
        if "/jobs/" in path and not path.endswith("/job.json"):
            self.stored_results[path] += 1
            if self.stored_results[path] == 1:
                self.holding.set()
                self.release.wait(60)


def test_a_worker_killed_between_its_upload_and_the_end_of_its_job_leaves_the_result_stored_once(tmp_path):
    """benchmarks/soak.py's double write: the attempt that runs the job again finds the
    bytes it made already stored (results are written with If-None-Match) and keeps them;
    before, S3 stored each such result twice (2 of 30,000 jobs in the soak)."""
    proxy = HoldFirstUpload()
    stack = LocalStack(tmp_path, s3_endpoint_url=f"http://127.0.0.1:{proxy.port}", visibility_timeout_s=3, lease_s=3)
    proxy.upstream_port = stack.s3_port
    try:
        with stack:
            stack.start_worker("doomed")
            client = Client(stack.settings)
            job = client.submit_generate("portrait", seed=1, width=SIZE, height=SIZE)
            assert proxy.holding.wait(60), "the result was never uploaded"
            stack.stop_process("doomed", signal.SIGKILL)
            proxy.release.set()
            stack.start_worker("rescuer")
            record = job.wait(120)
            rescuer_log = (stack.logs / "rescuer.log").read_text()
    finally:
        proxy.release.set()
        proxy.close()

    assert record.state is JobState.succeeded and record.attempts == 2
    assert record.worker == "rescuer@localstack"
    assert list(proxy.stored_results.values()) == [1]
    assert "stored the same bytes; kept" in rescuer_log


def test_redelivered_long_job_is_held_back_by_its_lease(tmp_path):
    # Redis redelivers the message after 1 s while the job runs for several: the lease,
    # renewed by the live worker, keeps the second delivery from running it again.
    with LocalStack(tmp_path, visibility_timeout_s=1, lease_s=3) as stack:
        stack.start_worker("worker")
        client = Client(stack.settings)
        record = client.submit_generate("portrait", seed=1, width=LONG, height=LONG).wait(180)
        log = (stack.logs / "worker.log").read_text()
        results = stack.results()

    assert record.state is JobState.succeeded and record.attempts == 1
    assert f"job {record.job_id}: not run now (running" in log, "the message was never redelivered: no test"
    assert results == {record.job_id: ["refined.png"]}


def test_job_that_kills_its_worker_every_time_ends_worker_lost(tmp_path):
    with LocalStack(tmp_path, visibility_timeout_s=2, lease_s=2, max_attempts=2) as stack:
        client = Client(stack.settings)
        victim = client.submit_generate("portrait", seed=1, width=LONG, height=LONG)
        for attempt in (1, 2):
            stack.start_worker(f"worker{attempt}")
            wait_until(
                lambda: client.status(victim.job_id).attempts == attempt, timeout_s=60, what=f"attempt {attempt}"
            )
            stack.stop_process(f"worker{attempt}", signal.SIGKILL)
        stack.start_worker("survivor")

        lost = victim.wait(120)
        after = client.submit_generate("portrait", seed=2, width=SIZE, height=SIZE).wait(60)
        dead = client.store.dead_letters()

    assert lost.state is JobState.failed and lost.error.code == "worker_lost" and lost.attempts == 2
    assert dead == [victim.job_id]
    assert after.state is JobState.succeeded


def test_redis_restart_with_aof_keeps_queued_jobs_and_everyone_reconnects(tmp_path):
    with LocalStack(tmp_path, redis_aof=True) as stack:
        client = Client(stack.settings)
        queued = [client.submit_generate("portrait", seed=s, width=SIZE, height=SIZE) for s in range(3)]
        stack.stop_process("redis")
        stack.start_redis()
        stack.start_worker("worker")
        assert all(j.wait(60).state is JobState.succeeded for j in queued)

        # Again with the worker running: it and this producer reconnect on their own.
        stack.stop_process("redis")
        stack.start_redis()
        later = client.submit_generate("portrait", seed=9, width=SIZE, height=SIZE).wait(120)
    assert later.state is JobState.succeeded


def test_upload_rides_out_a_short_s3_outage(tmp_path):
    with LocalStack(tmp_path, private_s3=True, s3_retry_budget_s=60) as stack:
        stack.start_worker("worker")
        client = Client(stack.settings)
        stack.stop_process("s3")
        job = client.submit_generate("portrait", seed=1, width=SIZE, height=SIZE)
        wait_until(
            lambda: "retrying in" in (stack.logs / "worker.log").read_text(), timeout_s=60, what="a failed upload"
        )
        stack.start_s3()  # a fresh S3 (moto keeps nothing), bucket recreated
        record = job.wait(120)
        results = stack.results()

    assert record.state is JobState.succeeded and record.attempts == 1
    assert results == {record.job_id: ["refined.png"]}


def test_s3_outage_longer_than_the_budget_fails_storage_unavailable(tmp_path):
    with LocalStack(tmp_path, private_s3=True, s3_retry_budget_s=1) as stack:
        stack.start_worker("worker")
        client = Client(stack.settings)
        stack.stop_process("s3")
        failed = client.submit_generate("portrait", seed=1, width=SIZE, height=SIZE).wait(120)
        stack.start_s3()
        after = client.submit_generate("portrait", seed=2, width=SIZE, height=SIZE).wait(60)
        dead = client.store.dead_letters()

    assert failed.state is JobState.failed and failed.error.code == "storage_unavailable"
    assert dead == [failed.job_id]
    assert after.state is JobState.succeeded


def test_callbacks_retry_with_backoff_and_never_hold_up_jobs(tmp_path, make_receiver):
    down_then_up = make_receiver(fail_first=2)
    slow = make_receiver(delay_s=3)
    always_down = make_receiver(fail_first=10**6)
    with LocalStack(tmp_path, callback_max_retries=3, callback_timeout_s=1) as stack:
        stack.start_worker("worker")
        stack.start_worker("callbacks", [stack.settings.queue_callbacks])
        client = Client(stack.settings)
        recovering = client.submit_generate("portrait", seed=1, width=SIZE, height=SIZE, callback_url=down_then_up.url)
        hanging = client.submit_generate("portrait", seed=2, width=SIZE, height=SIZE, callback_url=slow.url)
        lost = client.submit_generate("portrait", seed=3, width=SIZE, height=SIZE, callback_url=always_down.url)
        # Jobs finish while their receivers still fail or hang.
        assert all(j.wait(60).state is JobState.succeeded for j in (recovering, hanging, lost))
        others = [client.submit_generate("portrait", seed=s, width=SIZE, height=SIZE).wait(60) for s in range(4, 7)]

        def callback(job):
            return client.status(job.job_id).callback

        wait_until(lambda: callback(recovering).delivered, timeout_s=60, what="recovered delivery")
        wait_until(lambda: callback(lost).attempts == 4, timeout_s=60, what="all retries")
        wait_until(lambda: callback(hanging).attempts >= 1, timeout_s=60, what="a timed-out delivery")
        stack.wait_callbacks_settled()  # no retry is held back: no fifth attempt can come
        recovered, abandoned, slowed = (client.status(j.job_id) for j in (recovering, lost, hanging))

    assert all(r.state is JobState.succeeded for r in others)
    assert (
        recovered.callback.attempts == 3 and recovered.callback.last_status == 204 and len(down_then_up.requests) == 3
    )
    assert abandoned.callback.attempts == 4 and not abandoned.callback.delivered
    assert abandoned.callback.last_status == 503 and len(always_down.requests) == 4
    assert not slowed.callback.delivered and "timeout" in slowed.callback.last_error.lower()


def test_poison_job_is_retried_a_bounded_number_of_times_then_dead_lettered(tmp_path):
    with LocalStack(tmp_path, max_attempts=2) as stack:
        stack.start_worker("worker")
        client = Client(stack.settings)
        # A foreign producer's bug: a seed no generator takes. The record parses; every
        # model call with it raises.
        poison = JobRecord(
            job_id="poison",
            kind="generate_and_refine",
            spec=GenerateSpec(prompt="x", width=SIZE, height=SIZE),
            seed=2**70,
        )
        client.store.create(poison)
        client.celery.send_task(
            keys.task_name("generate_and_refine"),
            args=["poison"],
            task_id="poison",
            queue=stack.settings.queue("generate_and_refine"),
        )
        good = [client.submit_generate("portrait", seed=s, width=SIZE, height=SIZE) for s in range(3)]

        failed = client.wait("poison", 120)
        assert all(j.wait(60).state is JobState.succeeded for j in good)
        listed = stack.refinery("dead-letters", "--json")
        assert listed.returncode == 0, listed.stderr

    assert failed.state is JobState.failed and failed.error.code == "internal_error" and failed.attempts == 2
    assert [json.loads(line)["job_id"] for line in listed.stdout.splitlines()] == ["poison"]


def test_cancel_while_running_publishes_nothing(tmp_path, receiver):
    with LocalStack(tmp_path) as stack:
        stack.start_worker("worker")
        stack.start_worker("callbacks", [stack.settings.queue_callbacks])
        client = Client(stack.settings)
        # Running for a second or more on the model, where a cancel takes milliseconds.
        job = client.submit_generate("portrait", seed=1, width=LONG // 2, height=LONG // 2, callback_url=receiver.url)
        _wait_running(client, [job.job_id])
        assert job.cancel().state is JobState.cancelled
        # The worker lets go of a cancelled job (clears its lease) once it is done with it.
        wait_until(lambda: client.status(job.job_id).lease_owner is None, timeout_s=120, what="worker done")
        final = job.status()
        results = stack.results()
        after = client.submit_generate("portrait", seed=2, width=SIZE, height=SIZE).wait(60)
        wait_until(lambda: len(receiver.requests) >= 1, timeout_s=30, what="cancel callback")
        stack.wait_callbacks_settled()  # a second callback, if there were one, has arrived too

    assert final.state is JobState.cancelled and final.result is None
    assert results == {}
    assert after.state is JobState.succeeded
    assert len(receiver.requests) == 1 and '"job.cancelled"' in receiver.requests[0]
