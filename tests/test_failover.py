"""The Redis primary dies (SIGKILL) while jobs are queued and running; Redis Sentinel
promotes the replica, and everyone finds it by themselves: no job is lost, none runs twice
to completion, each gets one result object and one terminal callback.

Real processes on loopback: a primary and a replica (redis-server --replicaof), three
Sentinels, the moto S3 server, a model worker and a callbacks worker configured through
Sentinel with the product's default settings (devstack/sentinel.py).
"""

from __future__ import annotations

import json
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from typing import cast

import pytest

from devstack.sentinel import SentinelGroup
from devstack.stack import LocalStack, wait_until
from producer import preflight
from producer.client import Client, JobHandle
from shared.broker import make_celery, queue_lists
from shared.contract import JobState
from shared.errors import BrokerUnavailable, InvalidInput
from shared.redis_client import connect, min_replicas_ack, parse_sentinel_url, sentinel_topology
from shared.settings import Settings

JOBS = 40
SIZE = 128


class FailoverProducer:
    """Submits a job every 100 ms from the moment of the kill until one is accepted; each
    submit ends in a handle or a BrokerUnavailable, and both are kept."""

    def __init__(self, client: Client) -> None:
        self.client = client
        self.handles: list[JobHandle] = []
        self.refused: list[BrokerUnavailable] = []
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self.handles:
            try:
                self.handles.append(
                    self.client.submit_generate("portrait", seed=len(self.refused), width=SIZE, height=SIZE)
                )
            except BrokerUnavailable as exc:
                self.refused.append(exc)
                time.sleep(0.1)


def _drop_message(client: Client, job_id: str) -> None:
    """Take a job's message off its queue, as a primary lost just after a worker took it
    (and before kombu recorded it as unacknowledged) does."""
    for name in queue_lists(client.settings.queue("generate_and_refine")):
        for raw in cast(list[bytes], client.store.redis.lrange(name, 0, -1)):
            if json.loads(raw)["headers"]["id"] == job_id:
                client.store.redis.lrem(name, 1, raw.decode())
                return
    raise AssertionError(f"no message for job {job_id}")


def test_sentinel_urls_are_read_as_celery_spells_them() -> None:
    address = parse_sentinel_url("sentinel://:p%40ss@h1:26379;sentinel://h2:26380;sentinel://h3/0")
    assert address.sentinels == [("h1", 26379), ("h2", 26380), ("h3", 26379)]
    assert (address.password, address.db) == ("p@ss", 0)
    assert parse_sentinel_url("sentinel://h1/2;sentinel://h2/2").db == 2
    # kombu takes the db from the address it is connected through: one on the last only
    # would mean db 0 through the others.
    for url in ("sentinel://h1;sentinel://h2/2", "sentinel://h1/x", "redis://h1;sentinel://h2"):
        with pytest.raises(InvalidInput) as refused:
            parse_sentinel_url(url)
        assert refused.value.field == "redis_url"


def test_sentinel_without_a_master_name_is_refused_at_startup() -> None:
    settings = Settings(_env_file=None, redis_url="sentinel://127.0.0.1:26379/0")
    for start in (connect, make_celery):
        with pytest.raises(InvalidInput) as refused:
            start(settings)
        assert refused.value.field == "redis_sentinel_master"


def test_behind_sentinel_the_broker_asks_the_sentinels_and_submit_waits_for_a_replica() -> None:
    settings = Settings(
        _env_file=None,
        redis_url="sentinel://:data-pw@h1:26379;sentinel://h2:26379/0",
        redis_sentinel_master="mymaster",
        redis_sentinel_password="sentinel-pw",
    )
    transport = make_celery(settings).conf.broker_transport_options
    assert transport["master_name"] == "mymaster"
    assert transport["sentinel_kwargs"]["password"] == "sentinel-pw"
    assert min_replicas_ack(settings) == 1
    assert min_replicas_ack(Settings(_env_file=None)) == 0
    assert min_replicas_ack(settings.model_copy(update={"redis_min_replicas_ack": 2})) == 2


@pytest.mark.integration
def test_primary_killed_mid_run_loses_nothing_and_runs_nothing_twice(tmp_path, receiver):
    started = time.monotonic()
    with LocalStack(tmp_path) as stack, SentinelGroup(stack) as ha:
        before = sentinel_topology(ha.settings)
        doctor = {check.name: check for check in preflight.run(Client(ha.settings), required=[])}
        stack.start_worker("callbacks", [stack.settings.queue_callbacks], env=ha.env)
        client = Client(ha.settings)
        jobs = [
            client.submit_generate("portrait", seed=s, width=SIZE, height=SIZE, callback_url=receiver.url)
            for s in range(JOBS)
        ]
        orphan = client.submit_generate("portrait", seed=JOBS, width=SIZE, height=SIZE)
        _drop_message(client, orphan.job_id)
        # Started after the submits, so that most jobs are still queued at the kill.
        stack.start_worker("worker", env=ha.env)
        ready = time.monotonic() - started
        wait_until(
            lambda: any(client.status(j.job_id).state is JobState.running for j in jobs),
            timeout_s=60,
            what="a running job",
        )
        at_kill = Counter(client.status(j.job_id).state for j in jobs)
        # A producer already waiting (pub/sub) when the primary dies.
        waiter = ThreadPoolExecutor(1)
        waiting = waiter.submit(jobs[-1].wait, 120)
        killed_at = datetime.now(UTC)
        producer = FailoverProducer(client)
        ha.kill_primary()
        producer.thread.start()
        ha.wait_promoted()
        # The dead node comes back as the new primary's replica.
        ha.rejoin_old_primary()
        after = sentinel_topology(ha.settings)

        records = [j.wait(120) for j in jobs]
        waited = waiting.result(60)  # raises what the waiter raised, if it did
        waiter.shutdown()
        orphaned = orphan.wait(120)
        producer.thread.join(60)
        during = [h.wait(120) for h in producer.handles]
        wait_until(lambda: len(receiver.requests) >= JOBS, timeout_s=60, what="callbacks")
        stack.wait_callbacks_settled(ha.settings)  # a duplicate, if there were one, has arrived too
        results = stack.results()
        worker_log = (stack.logs / "worker.log").read_text()
        finished = time.monotonic() - started

    finish_times = [r.finished_at for r in records if r.finished_at is not None]
    first_after_kill = min((at - killed_at).total_seconds() for at in finish_times if at > killed_at)
    print(
        f"\nat the kill: {dict(at_kill)}; first job finished on the new primary "
        f"{first_after_kill:.2f} s after the kill; during the failover {len(during)} submits "
        f"returned a job, {len(producer.refused)} raised broker_unavailable; stack ready in {ready:.1f} s, "
        f"all done in {finished:.1f} s, stopped in {time.monotonic() - started - finished:.1f} s"
    )
    assert at_kill[JobState.queued] > 0 and at_kill[JobState.running] > 0, at_kill
    assert before["primary"] == f"127.0.0.1:{ha.primary_port}" and before["quorum_ok"]
    assert (
        doctor["redis sentinel"].status == "ok"
        and f"primary 127.0.0.1:{ha.primary_port}" in doctor["redis sentinel"].detail
    )
    assert after["primary"] == f"127.0.0.1:{ha.replica_port}" and after["sentinels"] == 3
    assert all(r.state is JobState.succeeded for r in records), [(r.state, r.error) for r in records]
    assert waited.job_id == jobs[-1].job_id and waited.state is JobState.succeeded
    assert all(r.attempts == 1 for r in records), [r.attempts for r in records]
    assert all(results[r.job_id] == ["refined.png"] for r in records), {r.job_id: results[r.job_id] for r in records}
    delivered = Counter(json.loads(body)["data"]["job_id"] for body in receiver.requests)
    assert delivered == Counter({r.job_id: 1 for r in records})
    assert all(json.loads(body)["type"] == "job.succeeded" for body in receiver.requests)
    # The job whose message was lost is found by the idle worker and run, once.
    assert f"job {orphan.job_id}: queued with no message left on the broker; sent again" in worker_log
    assert orphaned.state is JobState.succeeded and orphaned.attempts == 1
    assert results[orphan.job_id] == ["refined.png"]
    # Every submit during the failover either returned a job that completed, or said so;
    # once the old primary is back as a replica to confirm them, submits succeed again.
    assert len(during) == 1
    assert all(r.state is JobState.succeeded for r in during), [(r.state, r.error) for r in during]
    assert all(exc.code == "broker_unavailable" for exc in producer.refused)
