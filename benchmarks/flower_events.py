"""Does Flower see every job? Task events of a burst, counted where they arrive.

    python benchmarks/flower_events.py [--jobs 200] [--repeats 3] [--label after] [--quick]

A private stack (redis-server, moto's S3 server, ``refinery worker`` processes with the
settings a user keeps: batching on, the thread pool) and Flower started as docs/deploy.md
starts it (``celery -A worker.celery_cli flower``). Beside Flower, an event capture in this
process (``app.events.Receiver``, what ``celery -A worker.celery_cli events --dump``
runs) and a raw Redis pub/sub subscriber on the events exchange count what reached Redis.
Each scenario submits ``--jobs`` generate jobs at once and waits for every record to end,
then for the events of every job (or ``--settle-s`` without news, where they never come):

  one worker        one ``refinery worker``;
  two workers       two on one host, the second started while the first runs a burst;
  killed/restarted  a worker SIGKILLed once a quarter of the jobs succeeded and started
                    again (visibility timeout and lease 5 s, so its jobs come back soon);
  drained/restarted the same with SIGTERM: the worker drains, then starts again.

For each it reports, per job: task-started and task-succeeded in the capture and in raw
Redis, and in Flower's API SUCCESS with the worker and runtime the record names; and
whether one ``/api/workers?refresh=true`` right after a worker's start lists it. Counts are
the median over ``--repeats`` runs (each run is in ``runs``). Results go under ``--label``
in benchmarks/results/flower_events.json, beside other labels' runs.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import platform
import signal
import statistics
import sys
import tempfile
import threading
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path

import httpx
import redis
from rich.console import Console
from rich.table import Table

from devstack.stack import LocalStack, free_port, wait_until
from producer.client import Client
from shared.broker import make_celery
from shared.contract import JobState

RESULTS = Path(__file__).parent / "results" / "flower_events.json"
QUICK_RESULTS = Path(__file__).parents[1] / "build" / "benchmarks" / "flower_events-quick.json"
SIZE = 32
AUTH = ("ops", "bench")
SCENARIOS = ("one_worker", "two_workers", "killed_restarted", "drained_restarted")
console = Console()


class EventCapture:
    """Every event on the events exchange, twice: through Celery's receiver (Flower's and
    ``celery events``' way) and as raw Redis pub/sub messages (what the workers published)."""

    def __init__(self, stack: LocalStack) -> None:
        self.app = make_celery(stack.settings)
        self.celery: dict[str, set[str]] = defaultdict(set)  # event type -> task ids
        self.raw: dict[str, set[str]] = defaultdict(set)
        self.workers: set[str] = set()  # hostnames the receiver heard from
        self.lock = threading.Lock()
        self.stopped = threading.Event()
        self.pubsub = redis.Redis(port=stack.redis_port).pubsub(ignore_subscribe_messages=True)
        self.pubsub.psubscribe(f"/{self.app.conf.broker_url.rsplit('/', 1)[-1]}.celeryev/*")
        self.connection = self.app.connection_for_read()
        self.receiver = self.app.events.Receiver(self.connection, handlers={"*": self._on_event})
        self.threads = [
            threading.Thread(target=self._receive, daemon=True),
            threading.Thread(target=self._listen, daemon=True),
        ]
        for thread in self.threads:
            thread.start()

    def _on_event(self, event: dict) -> None:
        with self.lock:
            if event["type"].startswith("task-"):
                self.celery[event["type"]].add(event["uuid"])
            else:
                self.workers.add(event["hostname"])

    def _receive(self) -> None:
        self.receiver.capture(limit=None, timeout=None, wakeup=True)

    def _listen(self) -> None:
        while not self.stopped.is_set():
            message = self.pubsub.get_message(timeout=0.2)
            if message is None:
                continue
            envelope = json.loads(message["data"])
            body = envelope["body"]
            if envelope["properties"].get("body_encoding") == "base64":
                body = base64.b64decode(body)
            payload = json.loads(body)
            with self.lock:
                for event in payload if isinstance(payload, list) else [payload]:
                    if event["type"].startswith("task-"):
                        self.raw[event["type"]].add(event["uuid"])

    def count(self, kind: str, event_type: str, job_ids: set[str]) -> int:
        with self.lock:
            return len((self.celery if kind == "celery" else self.raw)[event_type] & job_ids)

    def close(self) -> None:
        self.receiver.should_stop = True
        self.stopped.set()
        for thread in self.threads:
            thread.join(5)
        self.pubsub.close()
        self.connection.release()


class Flower:
    def __init__(self, stack: LocalStack) -> None:
        port = free_port()
        argv = [sys.executable, "-m", "celery", "-A", "worker.celery_cli", "flower", f"--port={port}"]
        argv += ["--address=127.0.0.1", f"--basic-auth={AUTH[0]}:{AUTH[1]}"]
        self.process = stack.spawn("flower", argv, {"PYTHONPATH": str(Path(__file__).parents[1])})
        self.api = f"http://127.0.0.1:{port}/api"
        wait_until(lambda: self.get("workers").status_code == 200, timeout_s=60, what="flower", process=self.process)

    def get(self, path: str, **params: str) -> httpx.Response:
        return httpx.get(f"{self.api}/{path}", params=params, auth=AUTH, timeout=30)

    def alive(self) -> set[str]:
        """Workers Flower heard events from (not an inspect broadcast)."""
        return {name for name, alive in self.get("workers", status="true").json().items() if alive}

    def listed_at_once(self, hostname: str) -> bool:
        """One refresh, as an operator's click: does it list the worker?"""
        return hostname in self.get("workers", refresh="true").json()

    def tasks(self) -> dict[str, dict]:
        return self.get("tasks").json()


def run_scenario(scenario: str, jobs: int, settle_s: float) -> dict:
    overrides = {"visibility_timeout_s": 5, "lease_s": 5} if scenario.endswith("_restarted") else {}
    with tempfile.TemporaryDirectory() as tmp, LocalStack(Path(tmp), **overrides) as stack:
        flower = Flower(stack)
        capture = EventCapture(stack)
        client = Client(stack.settings)
        listed: dict[str, bool] = {}

        def start(name: str) -> None:
            stack.start_worker(name)
            listed[name] = flower.listed_at_once(f"{name}@localstack")
            # Both listeners hear the worker's own events before any job is sent.
            wait_until(
                lambda: f"{name}@localstack" in capture.workers and f"{name}@localstack" in flower.alive(),
                timeout_s=30,
                what=f"events of {name}",
            )

        start("one")
        started = time.monotonic()
        handles = [client.submit_generate("portrait", seed=s, width=SIZE, height=SIZE) for s in range(jobs)]
        ids = [h.job_id for h in handles]

        def succeeded() -> int:
            return sum(client.status(j).state is JobState.succeeded for j in ids)

        if scenario == "two_workers":
            start("two")  # while "one" runs the burst
        elif scenario.endswith("_restarted"):
            wait_until(lambda: succeeded() >= jobs // 4, timeout_s=300, what="a quarter of the jobs")
            how = signal.SIGKILL if scenario == "killed_restarted" else signal.SIGTERM
            stack.stop_process("one", how, timeout_s=120)
            start("one")
        records = [h.wait(600) for h in handles]
        burst_s = time.monotonic() - started
        finished = time.monotonic()
        job_ids = set(ids)

        def in_flower() -> int:
            tasks = flower.tasks()
            return sum(
                (task := tasks.get(r.job_id, {})).get("state") == "SUCCESS"
                and task.get("worker") == r.worker
                and task.get("runtime") is not None
                for r in records
            )

        def all_arrived() -> bool:
            return (
                capture.count("celery", "task-succeeded", job_ids) == jobs
                and capture.count("celery", "task-started", job_ids) == jobs
                and in_flower() == jobs
            )

        last = _progress(capture, job_ids, in_flower)
        deadline = time.monotonic() + settle_s
        while not all_arrived() and time.monotonic() < deadline:
            # Wait on news: while counts still move, keep waiting; settle_s without any, stop.
            now = _progress(capture, job_ids, in_flower)
            if now != last:
                last, deadline = now, time.monotonic() + settle_s
            time.sleep(0.1)
        complete = all_arrived()
        settled_s = time.monotonic() - finished
        states = defaultdict(int)
        tasks = flower.tasks()
        for job_id in ids:
            states[tasks.get(job_id, {}).get("state", "absent")] += 1
        result = {
            "jobs": jobs,
            "records_succeeded": sum(r.state is JobState.succeeded for r in records),
            "redelivered": sum(r.attempts > 1 for r in records),
            "capture_task_received": capture.count("celery", "task-received", job_ids),
            "capture_task_started": capture.count("celery", "task-started", job_ids),
            "capture_task_succeeded": capture.count("celery", "task-succeeded", job_ids),
            "redis_task_started": capture.count("raw", "task-started", job_ids),
            "redis_task_succeeded": capture.count("raw", "task-succeeded", job_ids),
            "flower_success_with_worker_and_runtime": in_flower(),
            "flower_states": dict(states),
            "listed_by_first_refresh": listed,
            "burst_s": round(burst_s, 2),
            "events_complete_after_s": round(settled_s, 2) if complete else None,
        }
        capture.close()
    return result


def _progress(capture: EventCapture, job_ids: set[str], in_flower: Callable[[], int]) -> tuple[int, ...]:
    counts = [capture.count(kind, t, job_ids) for kind in ("celery", "raw") for t in ("task-started", "task-succeeded")]
    return (*counts, in_flower())


def median_run(runs: list[dict]) -> dict:
    summary: dict = {}
    for key, value in runs[0].items():
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            summary[key] = statistics.median(run[key] for run in runs)
        elif value is None or key == "events_complete_after_s":
            done = [run[key] for run in runs if run[key] is not None]
            summary[key] = statistics.median(done) if len(done) == len(runs) else None
    summary["listed_by_first_refresh"] = all(all(run["listed_by_first_refresh"].values()) for run in runs)
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jobs", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--settle-s", type=float, default=10.0, help="stop waiting after this long without news")
    parser.add_argument("--scenarios", default=",".join(SCENARIOS))
    parser.add_argument("--label", default="after")
    parser.add_argument("--quick", action="store_true", help="40 jobs, one run; written under build/")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    if args.quick:
        args.jobs, args.repeats = 40, 1
    out = args.out or (QUICK_RESULTS if args.quick else RESULTS)

    results: dict = {}
    table = Table(title=f"{args.jobs} jobs at once, median of {args.repeats}")
    for column in ("scenario", "started (capture/redis)", "succeeded (capture/redis)", "flower SUCCESS", "listed"):
        table.add_column(column)
    for scenario in args.scenarios.split(","):
        runs = [run_scenario(scenario, args.jobs, args.settle_s) for _ in range(args.repeats)]
        summary = median_run(runs)
        results[scenario] = {"median": summary, "runs": runs}
        console.print(scenario, json.dumps(runs[-1]))
        table.add_row(
            scenario,
            f"{summary['capture_task_started']:g}/{summary['redis_task_started']:g}",
            f"{summary['capture_task_succeeded']:g}/{summary['redis_task_succeeded']:g}",
            f"{summary['flower_success_with_worker_and_runtime']:g}",
            str(summary["listed_by_first_refresh"]),
        )
    console.print(table)

    existing = json.loads(out.read_text()) if out.exists() else {}
    existing[args.label] = {
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
        "jobs": args.jobs,
        "repeats": args.repeats,
        "scenarios": results,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(existing, indent=2) + "\n")
    console.print(f"written to {out}")


if __name__ == "__main__":
    main()
