"""Monitoring and scale-out with real processes: the worker's Prometheus endpoint, Flower,
and two workers sharing one Redis."""

from __future__ import annotations

import json
import sys
from collections import Counter
from urllib.parse import urlsplit

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from devstack.stack import LocalStack, free_port, wait_until
from producer.client import Client
from shared import keys
from shared.contract import JobState
from shared.settings import Settings

pytestmark = pytest.mark.integration

SIZE = 32


def _samples(url: str) -> dict[tuple[str, tuple], float]:
    text = httpx.get(url, timeout=10).text
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def test_worker_metrics_count_the_jobs_it_ran(tmp_path):
    port = free_port()
    with LocalStack(tmp_path) as stack:
        stack.start_worker("worker", metrics_port=port)
        client = Client(stack.settings)
        ok = [client.submit_generate("portrait", seed=s, width=SIZE, height=SIZE).wait(60) for s in range(3)]
        bad = client.submit_refine(input_uri=f"s3://{stack.settings.s3_bucket}/missing.png").wait(60)
        samples = _samples(f"http://127.0.0.1:{port}/metrics")

    assert all(r.state is JobState.succeeded for r in ok) and bad.state is JobState.failed

    def jobs(kind: str, state: str) -> float:
        return samples.get(("refinery_jobs_total", (("kind", kind), ("state", state)))) or 0

    assert jobs("generate_and_refine", "succeeded") == 3
    assert jobs("refine_only", "failed") == 1
    assert samples[("refinery_stage_seconds_count", (("kind", "generate_and_refine"), ("stage", "generate")))] == 3
    assert samples[("refinery_batch_size_count", (("kind", "generate_and_refine"),))] == 3
    info = [labels for name, labels in samples if name == "refinery_worker_info"]
    assert ("preset", "tiny-schnell") in info[0] and ("device", "cpu") in info[0]


def test_workers_on_one_host_with_default_settings_each_serve_and_publish_their_own(tmp_path):
    base = Settings(_env_file=None).metrics_port  # what a user keeps: the same port for every worker
    with LocalStack(tmp_path) as stack:
        # The README's single-host path: plain workers, each with the callbacks worker it starts.
        stack.start_worker("one", metrics_port=base, callbacks=True)
        stack.start_worker("two", metrics_port=base, callbacks=True)
        client = Client(stack.settings)
        wait_until(lambda: len(client.store.workers()) == 4, timeout_s=60, what="both callbacks workers")
        records = [client.submit_generate("portrait", seed=s, width=64, height=64).wait(120) for s in range(6)]
        wait_until(
            lambda: sum(int(info["jobs_done"] or 0) for info in client.store.workers().values()) == 6,
            timeout_s=3 * Settings(_env_file=None).worker_heartbeat_s,
            what="jobs done in the heartbeats",
        )
        listed = stack.refinery("workers", "--json")
        assert listed.returncode == 0, listed.stderr
        live = json.loads(listed.stdout)
        ports = {name: urlsplit(info["metrics_url"]).port for name, info in live.items()}
        served = {name: _samples(f"http://127.0.0.1:{port}/metrics") for name, port in ports.items()}
        expiry_ms = [client.store.redis.pttl(keys.worker_key(name)) for name in live]
        table = stack.refinery("workers")
        file_sd = json.loads(stack.refinery("workers", "--file-sd").stdout)

    assert all(r.state is JobState.succeeded for r in records)
    assert sorted(live) == ["callbacks-one@localstack", "callbacks-two@localstack", "one@localstack", "two@localstack"]
    assert len(set(ports.values())) == 4 and all(base <= port < base + 16 for port in ports.values())
    assert live["one@localstack"]["queues"] == ["generate", "refine"] == live["two@localstack"]["queues"]
    assert live["callbacks-one@localstack"]["queues"] == ["callbacks"]
    assert {r.worker for r in records} <= {"one@localstack", "two@localstack"}
    # A worker that dies unannounced drops off the list within three heartbeats.
    assert all(0 < ms <= 3000 * Settings(_env_file=None).worker_heartbeat_s for ms in expiry_ms)
    for name, samples in served.items():
        info = [dict(labels) for metric, labels in samples if metric == "refinery_worker_info"][0]
        assert info["preset"] == ("" if name.startswith("callbacks") else "tiny-schnell"), name
    assert table.returncode == 0 and "4 live workers" in table.stdout and "jobs done" in table.stdout
    # What Prometheus' file_sd_configs reads: every worker's metrics address, labelled.
    assert {group["labels"]["worker"]: group["targets"] for group in file_sd} == {
        name: [urlsplit(info["metrics_url"]).netloc] for name, info in live.items()
    }


def test_two_workers_share_a_burst_and_none_runs_twice(tmp_path):
    with LocalStack(tmp_path, max_batch=1) as stack:
        stack.start_worker("one")
        stack.start_worker("two")
        client = Client(stack.settings)
        handles = [client.submit_generate("portrait", seed=s, width=SIZE, height=SIZE) for s in range(16)]
        records = [h.wait(120) for h in handles]
        results = stack.results()

    assert all(r.state is JobState.succeeded and r.attempts == 1 for r in records)
    by_worker = Counter(r.worker for r in records)
    assert set(by_worker) == {"one@localstack", "two@localstack"}
    assert results == {r.job_id: ["refined.png"] for r in records}


def test_flower_lists_the_worker_and_its_finished_tasks(tmp_path):
    port = free_port()
    auth = ("ops", "s3cret")
    with LocalStack(tmp_path) as stack:
        flower = stack.spawn(
            "flower",
            [
                sys.executable,
                "-m",
                "celery",
                "--broker",
                stack.settings.redis_url,
                "flower",
                f"--port={port}",
                "--address=127.0.0.1",
                f"--basic-auth={auth[0]}:{auth[1]}",
            ],
        )
        api = f"http://127.0.0.1:{port}/api"
        wait_until(
            lambda: httpx.get(f"{api}/workers", auth=auth).status_code == 200,
            timeout_s=60,
            what="flower",
            process=flower,
        )
        stack.start_worker("worker")
        client = Client(stack.settings)

        def finished_in_flower(records: list) -> bool:
            tasks = httpx.get(f"{api}/tasks", auth=auth, timeout=10).json()
            return all(tasks.get(r.job_id, {}).get("state") == "SUCCESS" for r in records)

        def worker_heard() -> bool:
            # Flower sees only the events sent after its receiver subscribed: once it has the
            # worker's own events (online, heartbeats), it has every later one.
            alive = httpx.get(f"{api}/workers", params={"status": "true"}, auth=auth, timeout=10).json()
            return alive.get("worker@localstack") is True

        wait_until(worker_heard, timeout_s=60, what="flower receiving the worker's events")

        # Every finished job is listed: the worker sends each task event, from whichever of
        # its threads runs the job (shared.broker.SerialEventDispatcher); none is dropped.
        burst = [client.submit_generate("portrait", seed=100 + s, width=SIZE, height=SIZE) for s in range(8)]
        finished = [h.wait(60) for h in burst]
        assert all(r.state is JobState.succeeded for r in finished)
        wait_until(lambda: finished_in_flower(finished), timeout_s=30, what="every finished task in flower")
        tasks = httpx.get(f"{api}/tasks", auth=auth, timeout=10).json()
        assert all(tasks[r.job_id]["worker"] == r.worker and tasks[r.job_id]["runtime"] for r in finished)

        # The first refresh (an `inspect` broadcast) finds the consuming worker: no second try.
        workers = httpx.get(f"{api}/workers", params={"refresh": "true"}, auth=auth, timeout=30).json()
        assert "worker@localstack" in workers, sorted(workers)
        assert httpx.get(f"{api}/workers", timeout=10).status_code == 401
