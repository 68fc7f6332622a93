"""A soak under faults: many jobs through several workers of the free model while a seeded
chaos loop kills workers, fails Redis over, cuts S3 off and drains workers, again and again.

    python benchmarks/soak.py [--jobs 100000] [--workers 3] [--rate 20] [--seed 7] [--quick]

The stack (real processes on loopback, devstack/): a Redis primary and replica behind three
Sentinels (devstack/sentinel.py), moto's S3 server, ``--workers`` model workers of the free
model (``noop`` generator and refiner, 64 px generate-and-refine jobs) and one callbacks
worker, all configured through Sentinel with the product's default settings except:

  record_linger_s 5        a finished record leaves Redis 5 s after it ends (its copy in the
                           bucket stays, shared/archive.py), so Redis memory comes back down
                           within the run instead of an hour later;
  visibility_timeout_s 30  a SIGKILLed worker's unacknowledged messages come back after
                           30 s instead of an hour (docs/operations.md); its jobs run again
                           once their lease (lease_s, default 60 s) has run out;
  job_ttl_s (--job-ttl-s)  the product's 7 days unless given: a shorter one lets the
                           idempotency keys expire at the end, so that memory can be seen
                           back at its baseline.

Two producer threads submit ``--jobs`` generate jobs (``--rate`` jobs/s in all, 0: as fast
as the system takes them; at most ``--in-flight`` not yet called back), each with its own
idempotency key and a callback to a counting receiver in this process. A submit that raises
(broker_unavailable during a failover, queue_full) is retried with the same key, which
returns the same job, never a second one.

The chaos loop (``random.Random(seed)``), every 20-40 s (``--quick``: 5-10 s), runs the next
fault of a shuffled round of four, so each happens as often as the others:

  kill      SIGKILL a model worker, start it again (as a supervisor would);
  failover  SIGKILL the Redis primary, wait for the Sentinels to promote the replica, start
            the killed node again as the new primary's replica (promotable once in sync,
            so that the next failover has somewhere to go);
  s3        S3 unreachable for 5-20 s, less than ``s3_retry_budget_s`` (60): connections to
            its endpoint are refused and open ones cut, at a gate in front of moto's server.
            moto keeps nothing across a restart, so stopping its process would also delete
            every archived record (jobs/<id>/job.json), which status and callbacks read once
            a record has left Redis; a real S3 outage loses no objects;
  drain     SIGTERM a model worker (it hands back what it has not started, finishes the
            batch on the model, exits), start it again.

The first model worker is never a target, so one process's RSS covers the whole run (a
leak shows as growth); the others are killed and drained at random.

What it reports (``--out``: benchmarks/results/soak.json and soak.png; a ``--quick`` run,
2,000 jobs with every fault at least once: build/soak/):

  lost              jobs submitted and never terminal (must be 0);
  double_written    jobs whose result (jobs/<id>/refined.png) S3 stored more than once:
                    the gate counts each PUT that S3 answered with success, per object (an
                    upload retried through an outage counts once);
  callbacks_per_job terminal callbacks each job's receiver got: {1: jobs} is exactly one each;
  queue_wait_ms     started_at - created_at of the attempt that finished (a requeued job's
                    wait includes its earlier attempts);
  redis             used_memory of the primary (whichever node it is) before the first
                    submit, its peak, and after every record's linger; what is left after is
                    the idempotency keys, which live job_ttl_s (7 days) by design;
  rss_mb            each model worker process's RSS, first and last sample, over its life;
  events            each fault, when, and what it took; plus jobs/s and wall time.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import statistics
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import redis
from PIL import Image, ImageDraw
from rich.console import Console

from devstack.s3_proxy import S3Proxy
from devstack.sentinel import MASTER_NAME, SentinelGroup
from devstack.stack import LocalStack, wait_until
from producer.client import Client
from refiner.export import NOOP
from shared import keys
from shared.errors import JobNotFound, QueueFull
from shared.records import RecordStore
from shared.redis_client import connect
from shared.settings import Settings

RESULTS = Path(__file__).parent / "results"
QUICK_RESULTS = Path(__file__).parents[1] / "build" / "soak"
FAULTS = ("kill", "failover", "s3", "drain")
LINGER_S = 5.0
DAY_S = 86_400
VISIBILITY_TIMEOUT_S = 30
SIZE = 64
PRODUCERS = 2
# INFO memory fields sampled: the data, and what Redis holds besides it.
MEMORY_FIELDS = {
    "used": "used_memory",
    "dataset": "used_memory_dataset",
    "overhead": "used_memory_overhead",
    "replication_backlog": "mem_replication_backlog",
    "clients_normal": "mem_clients_normal",
    "clients_replicas": "mem_clients_slaves",
}
console = Console()


# -- what the jobs leave behind ----------------------------------------------------------


@dataclass
class Ended:
    """What an archived record says about a job's end."""

    state: str
    code: str | None
    attempts: int
    queue_wait_ms: float | None
    worker: str | None


def ended_from(record: dict[str, Any]) -> Ended:
    started, created = record.get("started_at"), record.get("created_at")
    wait = None
    if started and created:
        wait = (datetime.fromisoformat(started) - datetime.fromisoformat(created)).total_seconds() * 1000
    error = record.get("error") or {}
    return Ended(record["state"], error.get("code"), int(record.get("attempts", 0)), wait, record.get("worker"))


class S3Gate(S3Proxy):
    """The S3 endpoint every client is given (devstack/s3_proxy.py, which plays the outages).

    It counts, per object key, the PUTs S3 answered with success, and keeps the last archived
    record (jobs/<id>/job.json) of each job as it went by."""

    def __init__(self) -> None:
        self.puts: Counter[str] = Counter()
        self.records: dict[str, Ended] = {}
        self.unreadable = 0
        super().__init__()

    def stored(self, path: str, body: bytes) -> None:
        # /<bucket>/<prefix>/jobs/<id>/<name>
        parts = path.lstrip("/").split("/")
        if len(parts) < 4 or parts[-3] != "jobs":
            return
        job_id, name = parts[-2], parts[-1]
        ended = None
        if name == "job.json":
            try:
                ended = ended_from(json.loads(body))
            except (ValueError, KeyError):
                self.unreadable += 1
        with self._lock:
            self.puts[f"{job_id}/{name}"] += 1
            if ended is not None:
                self.records[job_id] = ended


class CallbackCounter:
    """The callback receiver: counts terminal callbacks per job (and distinct webhook ids)."""

    def __init__(self) -> None:
        self.terminal: Counter[str] = Counter()
        self.message_ids: dict[str, set[str]] = {}
        self.other: Counter[str] = Counter()
        lock = threading.Lock()
        counter = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("content-length", 0)))
                try:
                    payload = json.loads(body)
                    kind, job_id = payload["type"], payload["data"]["job_id"]
                except (ValueError, KeyError):
                    kind, job_id = "unreadable", ""
                with lock:
                    if kind in ("job.succeeded", "job.failed", "job.cancelled"):
                        counter.terminal[job_id] += 1
                        counter.message_ids.setdefault(job_id, set()).add(self.headers.get("webhook-id", ""))
                    else:
                        counter.other[kind] += 1
                self.send_response(204)
                self.end_headers()

            def log_message(self, *_: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()


# -- producers ---------------------------------------------------------------------------


class Producers:
    """``PRODUCERS`` threads submitting jobs 0..jobs-1 between them; each submit is retried
    with its idempotency key until it returns a job."""

    def __init__(self, settings: Any, jobs: int, rate: float, in_flight: int, seed: int, receiver: CallbackCounter):
        self.settings = settings
        self.jobs = jobs
        self.rate = rate
        self.in_flight = in_flight
        self.seed = seed
        self.receiver = receiver
        self.job_ids: dict[int, str] = {}
        self.retries: Counter[str] = Counter()
        self.given_up: list[int] = []
        self._lock = threading.Lock()
        self.threads = [threading.Thread(target=self._run, args=(n,), daemon=True) for n in range(PRODUCERS)]

    @property
    def submitted(self) -> int:
        return len(self.job_ids)

    def start(self) -> None:
        for thread in self.threads:
            thread.start()

    def done(self) -> bool:
        return not any(thread.is_alive() for thread in self.threads)

    def _run(self, n: int) -> None:
        client = Client(self.settings)
        interval = PRODUCERS / self.rate if self.rate else 0.0
        next_at = time.monotonic()
        for index in range(n, self.jobs, PRODUCERS):
            while self.submitted - len(self.receiver.terminal) >= self.in_flight:
                time.sleep(0.05)
            if interval:
                next_at = max(next_at + interval, time.monotonic() - 1.0)
                time.sleep(max(0.0, next_at - time.monotonic()))
            job_id = self._submit(client, index)
            if job_id is None:
                with self._lock:
                    self.given_up.append(index)
                continue
            with self._lock:
                self.job_ids[index] = job_id

    def _submit(self, client: Client, index: int) -> str | None:
        for attempt in range(2000):
            try:
                handle = client.submit_generate(
                    "soak portrait",
                    seed=index,
                    width=SIZE,
                    height=SIZE,
                    idempotency_key=f"soak-{self.seed}-{index}",
                    callback_url=self.receiver.url,
                )
                return handle.job_id
            except QueueFull:
                self.retries["queue_full"] += 1
            except Exception as exc:  # broker_unavailable, and whatever else a failover raises
                self.retries[getattr(exc, "code", type(exc).__name__)] += 1
            time.sleep(min(0.1 * 2 ** min(attempt, 4), 1.0))
        return None


# -- faults ------------------------------------------------------------------------------


def _sentinels_see_a_promotable_replica(ha: SentinelGroup) -> bool:
    for port in ha.sentinel_ports:
        replicas: Any = redis.Redis(port=port).sentinel_slaves(MASTER_NAME)
        good = [
            r
            for r in replicas
            if not r.get("is_sdown")
            and not r.get("is_disconnected")
            and int(r.get("slave-priority", 0)) > 0
            and r.get("master-link-status") == "ok"
        ]
        if not good:
            return False
    return True


class Chaos:
    """The fault loop: seeded, one fault at a time, each fault once per shuffled round."""

    def __init__(self, stack: LocalStack, ha: SentinelGroup, gate: S3Gate, workers: list[str], args: Any) -> None:
        self.stack = stack
        self.ha = ha
        self.gate = gate
        self.workers = workers
        self.env = {**ha.env}
        self.store = RecordStore.from_settings(ha.settings)
        self.rng = random.Random(args.seed)
        self.pause = (5.0, 10.0) if args.quick else (20.0, 40.0)
        self.outage = (5.0, 10.0) if args.quick else (5.0, 20.0)
        self.events: list[dict[str, Any]] = []
        self.stop = threading.Event()
        self.t0 = 0.0
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.error: BaseException | None = None

    def counts(self) -> Counter[str]:
        return Counter(event["fault"] for event in self.events)

    def _run(self) -> None:
        round_: list[str] = []
        try:
            while not self.stop.wait(self.rng.uniform(*self.pause)):
                if not round_:
                    round_ = list(FAULTS)
                    self.rng.shuffle(round_)
                fault = round_.pop()
                at = time.monotonic() - self.t0
                detail = getattr(self, f"_{fault}")()
                took = round(time.monotonic() - self.t0 - at, 2)
                self.events.append({"t": round(at, 2), "fault": fault, "took_s": took, **detail})
                console.log(f"fault {len(self.events)}: {fault} at {at:.0f} s, {took} s: {detail}")
        except BaseException as exc:  # shown at the end, and the run stops
            self.error = exc
            console.print_exception()

    def _target(self) -> str:
        return self.rng.choice(self.workers[1:])  # the first is the RSS witness

    def _kill(self) -> dict[str, Any]:
        name = self._target()
        self.stack.stop_process(name, signal.SIGKILL)
        # The dead process's registration would outlive it (3 heartbeats) and pass for its
        # successor's readiness: gone, start_worker waits for the new one (then a drain
        # never catches a worker still starting).
        self.store.unregister_worker(f"{name}@localstack")
        started = time.monotonic()
        self.stack.start_worker(name, env=self.env)
        return {"target": name, "restart_s": round(time.monotonic() - started, 2)}

    def _drain(self) -> dict[str, Any]:
        name = self._target()
        process = self.stack.processes.pop(name)
        started = time.monotonic()
        process.send_signal(signal.SIGTERM)
        status = process.wait(180)
        drained = time.monotonic() - started
        self.stack.start_worker(name, env=self.env)
        return {"target": name, "exit_status": status, "drain_s": round(drained, 2)}

    def _s3(self) -> dict[str, Any]:
        seconds = round(self.rng.uniform(*self.outage), 1)
        self.gate.outage(seconds)
        return {"outage_s": seconds}

    def _failover(self) -> dict[str, Any]:
        ha, stack = self.ha, self.stack
        wait_until(lambda: _sentinels_see_a_promotable_replica(ha), timeout_s=90, what="a promotable replica")
        old = ha.primary()
        name = "redis" if old == ha.primary_port else "redis-replica"
        started = time.monotonic()
        stack.stop_process(name, signal.SIGKILL)
        wait_until(lambda: ha.primary() != old, timeout_s=90, what="a replica promoted")
        promoted = time.monotonic() - started
        new = ha.primary()
        # Back as the new primary's replica; promotable only once in sync (an empty node
        # promoted would hand every replica an empty data set: docs/deploy.md).
        workdir = stack.workdir / name
        workdir.mkdir(exist_ok=True)
        argv = ["redis-server", "--port", str(old), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
        argv += ["--dir", str(workdir), "--replicaof", "127.0.0.1", str(new), "--replica-priority", "0"]
        process = stack.spawn(name, argv)
        node = redis.Redis(port=old)
        wait_until(
            lambda: node.info("replication")["master_link_status"] == "up", timeout_s=60, what=name, process=process
        )
        node.config_set("replica-priority", 100)
        return {
            "from": old,
            "to": new,
            "promoted_s": round(promoted, 2),
            "rejoined_s": round(time.monotonic() - started, 2),
        }


# -- sampling ----------------------------------------------------------------------------


def rss_mb(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return round(int(line.split()[1]) / 1024, 1)
    except OSError:
        pass
    return None


@dataclass
class Sampler:
    stack: LocalStack
    ha: SentinelGroup
    producers: Producers
    gate: S3Gate
    receiver: CallbackCounter
    watched: list[str]
    every_s: float
    t0: float = 0.0
    samples: list[dict[str, Any]] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)

    def __post_init__(self) -> None:
        self.redis = connect(self.ha.settings.model_copy(update={"redis_retry_s": 2.0}))
        self.thread = threading.Thread(target=self._run, daemon=True)

    def memory(self) -> dict[str, int] | None:
        try:
            info = self.redis.info("memory")
        except Exception:  # a failover under way
            return None
        return {name: int(info[field]) for name, field in MEMORY_FIELDS.items() if field in info}

    def sample(self) -> dict[str, Any]:
        memory = self.memory()
        rss: dict[str, Any] = {}
        for name in self.watched:
            process = self.stack.processes.get(name)
            if process is not None and process.poll() is None:
                rss[name] = [process.pid, rss_mb(process.pid)]
        row = {
            "t": round(time.monotonic() - self.t0, 2),
            "submitted": self.producers.submitted,
            "ended": len(self.gate.records),
            "callbacks": len(self.receiver.terminal),
            "redis_used": memory["used"] if memory else None,
            "redis_dataset": memory["dataset"] if memory else None,
            "rss_mb": rss,
        }
        self.samples.append(row)
        return row

    def _run(self) -> None:
        while not self.stop.wait(self.every_s):
            self.sample()


# -- the run -----------------------------------------------------------------------------


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def redis_keys(client: redis.Redis) -> Counter[str]:
    found: Counter[str] = Counter()
    for key in client.scan_iter(count=1000):
        parts = key.decode().split(":")
        found[":".join(parts[:2]) if parts[0] == keys.PREFIX else parts[0]] += 1
    return found


def memory_breakdown(client: redis.Redis) -> dict[str, Any]:
    """MEMORY STATS' accounting, and MEMORY USAGE of each key that is not an idempotency key."""
    stats: Any = client.memory_stats()
    wanted = ("dataset.bytes", "keys.count", "overhead.total", "replication.backlog", "clients.normal")
    found: dict[str, Any] = {name: stats.get(name) for name in wanted}
    found["db.0"] = stats.get("db.0")  # its hash tables' overhead (main, expires)
    found["keys"] = {
        key.decode(): client.memory_usage(key, samples=0)
        for key in client.scan_iter(count=1000)
        if not key.startswith(keys.idempotency_key("").encode())
    }
    return found


def idempotency_bytes(client: redis.Redis) -> int:
    """What the idempotency keys hold (MEMORY USAGE, summed over up to 500 and scaled)."""
    names = list(client.scan_iter(keys.idempotency_key("*"), count=1000))
    sampled = names[:500]
    total = sum(int(client.memory_usage(name, samples=0) or 0) for name in sampled)
    return round(total * len(names) / len(sampled)) if sampled else 0


def final_records(client: Client, gate: S3Gate, job_ids: list[str]) -> dict[str, Ended]:
    found = {j: gate.records[j] for j in job_ids if j in gate.records and gate.records[j].state != "queued"}
    for job_id in set(job_ids) - set(found):  # never archived: ask Redis (and the bucket)
        try:
            record = client.status(job_id)
        except JobNotFound:
            continue
        found[job_id] = ended_from(json.loads(record.model_dump_json()))
    return found


def soak(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    gate = S3Gate()
    receiver = CallbackCounter()
    stack = LocalStack(
        workdir,
        preset="noop",
        refiner=NOOP,
        s3_endpoint_url=f"http://127.0.0.1:{gate.port}",
        record_linger_s=LINGER_S,
        visibility_timeout_s=VISIBILITY_TIMEOUT_S,
        job_ttl_s=args.job_ttl_s,
    )
    gate.upstream_port = stack.s3_port
    workers = [f"worker{n}" for n in range(args.workers)]
    with stack, SentinelGroup(stack) as ha:
        console.log(f"stack up in {workdir}; starting {len(workers)} model workers and a callbacks worker")
        stack.start_worker("callbacks", [stack.settings.queue_callbacks], env=ha.env)
        for name in workers:
            stack.start_worker(name, env=ha.env)
        client = Client(ha.settings)
        producers = Producers(ha.settings, args.jobs, args.rate, args.in_flight, args.seed, receiver)
        chaos = Chaos(stack, ha, gate, workers, args)
        sampler = Sampler(stack, ha, producers, gate, receiver, [*workers, "callbacks"], 2.0 if args.quick else 5.0)
        time.sleep(3.0)  # the workers' first heartbeats and sweeps are in
        baseline = sampler.memory()
        baseline_keys = redis_keys(sampler.redis)
        baseline_breakdown = memory_breakdown(sampler.redis)

        t0 = time.monotonic()
        chaos.t0 = sampler.t0 = t0
        sampler.sample()
        sampler.thread.start()
        producers.start()
        chaos.thread.start()
        each = 1 if args.quick else 0
        last_log = 0.0
        while not (producers.done() and min(chaos.counts()[f] for f in FAULTS) >= each) and chaos.error is None:
            time.sleep(1.0)
            if time.monotonic() - last_log >= (10 if args.quick else 30):
                last_log = time.monotonic()
                row = sampler.samples[-1]
                console.log(
                    f"{row['t']:.0f} s: submitted {producers.submitted}/{args.jobs}, ended {len(gate.records)}, "
                    f"callbacks {len(receiver.terminal)}, redis {(row['redis_used'] or 0) / 2**20:.1f} MiB, "
                    f"faults {dict(chaos.counts())}, submit retries {dict(producers.retries)}"
                )
        chaos.stop.set()
        chaos.thread.join()
        submitted_s = time.monotonic() - t0
        job_ids = list(producers.job_ids.values())
        console.log(f"all {len(job_ids)} submitted in {submitted_s:.0f} s; faults done; waiting for every job's end")

        # Every job terminal (from its archived record, or Redis for one never archived).
        deadline = time.monotonic() + args.settle_s
        pending = [j for j in job_ids if j not in gate.records or gate.records[j].state == "queued"]
        while pending and time.monotonic() < deadline:
            time.sleep(2.0)
            pending = [j for j in pending if j not in gate.records]
            if len(pending) <= 200:
                pending = [j for j in pending if j not in final_records(client, gate, pending)]
            console.log(f"{len(pending)} jobs not yet ended")
        ended_s = time.monotonic() - t0
        try:
            wait_until(
                lambda: len(receiver.terminal) >= len(job_ids), timeout_s=min(120, args.settle_s), what="callbacks"
            )
            stack.wait_callbacks_settled(ha.settings, timeout_s=120)
        except TimeoutError as exc:
            console.log(f"callbacks: {exc}")
        wall_s = time.monotonic() - t0
        # Past the linger of the last records (and the re-archive after each callback).
        time.sleep(2 * LINGER_S)
        try:
            wait_until(lambda: redis_keys(sampler.redis)[f"{keys.PREFIX}:job"] == 0, timeout_s=120, what="records gone")
        except TimeoutError as exc:
            console.log(str(exc))
        if args.job_ttl_s < DAY_S:
            # The idempotency keys (the only keys a job leaves) expire too: memory is back to
            # its baseline, which is what shows that nothing else accumulates.
            try:
                wait_until(
                    lambda: redis_keys(sampler.redis)[f"{keys.PREFIX}:idem"] == 0,
                    timeout_s=args.job_ttl_s + 120,
                    what="idempotency keys gone",
                )
            except TimeoutError as exc:
                console.log(str(exc))
        sampler.stop.set()
        sampler.thread.join()
        after = sampler.memory()
        after_keys = redis_keys(sampler.redis)
        idem_bytes = idempotency_bytes(sampler.redis)
        after_breakdown = memory_breakdown(sampler.redis)
        sampler.sample()
        records = final_records(client, gate, job_ids)
        logs = {
            path.stem: sum(" ERROR/" in line or "CRITICAL" in line for line in path.read_text().splitlines())
            for path in sorted(stack.logs.glob("*.log"))
        }
        primary = ha.primary()
    gate.close()
    receiver.server.shutdown()

    lost = [j for j in job_ids if j not in records or records[j].state not in ("succeeded", "failed", "cancelled")]
    result_puts = Counter(gate.puts[f"{j}/refined.png"] for j in job_ids)
    double = sorted(j for j in job_ids if gate.puts[f"{j}/refined.png"] > 1)
    waits = [r.queue_wait_ms for r in records.values() if r.queue_wait_ms is not None]
    per_job_callbacks = Counter(receiver.terminal[j] for j in job_ids)
    peak = max((s["redis_used"] for s in sampler.samples if s["redis_used"]), default=0)
    return {
        "run": {
            "date": datetime.now(UTC).isoformat(timespec="seconds"),
            "jobs": args.jobs,
            "workers": args.workers,
            "seed": args.seed,
            "rate": args.rate,
            "in_flight": args.in_flight,
            "quick": args.quick,
            "cpus": os.cpu_count(),
            "work_dir": str(workdir),
            "settings": {
                "preset": "noop",
                "refiner": NOOP,
                "size": SIZE,
                "record_linger_s": LINGER_S,
                "visibility_timeout_s": VISIBILITY_TIMEOUT_S,
                "lease_s": stack.settings.lease_s,
                "s3_retry_budget_s": stack.settings.s3_retry_budget_s,
                "job_ttl_s": stack.settings.job_ttl_s,
            },
        },
        "wall_s": round(wall_s, 1),
        "submitting_s": round(submitted_s, 1),
        "all_ended_s": round(ended_s, 1),
        "jobs_per_s": round(len(records) / ended_s, 2),
        "submitted": len(job_ids),
        "submits_given_up": len(producers.given_up),
        "submit_retries": dict(producers.retries),
        "states": dict(Counter(r.state for r in records.values())),
        "failed_by_code": dict(Counter(r.code for r in records.values() if r.state == "failed")),
        "lost": len(lost),
        "lost_ids": lost[:50],
        "attempts": {str(k): v for k, v in sorted(Counter(r.attempts for r in records.values()).items())},
        "double_written": len(double),
        "double_written_jobs": [
            {
                "job_id": j,
                "puts": gate.puts[f"{j}/refined.png"],
                "attempts": records[j].attempts if j in records else None,
            }
            for j in double[:50]
        ],
        "result_puts_per_job": {str(k): v for k, v in sorted(result_puts.items())},
        "callbacks_per_job": {str(k): v for k, v in sorted(per_job_callbacks.items())},
        "callbacks_not_one": {j: receiver.terminal[j] for j in job_ids if receiver.terminal[j] != 1},
        "callback_ids_per_job": {
            str(k): v for k, v in sorted(Counter(len(receiver.message_ids.get(j, ())) for j in job_ids).items())
        },
        "other_callbacks": dict(receiver.other),
        "archived_unreadable": gate.unreadable,
        "queue_wait_ms": {
            "p50": round(percentile(waits, 0.5), 1),
            "p99": round(percentile(waits, 0.99), 1),
            "max": round(max(waits), 1),
            "mean": round(statistics.fmean(waits), 1),
        }
        if waits
        else None,
        "redis": {
            "used_memory_before": baseline["used"] if baseline else None,
            "used_memory_peak": peak,
            "used_memory_after": after["used"] if after else None,
            "before": baseline,
            "after": after,
            "idempotency_keys_after_bytes": idem_bytes,
            "breakdown_before": baseline_breakdown,
            "breakdown_after": after_breakdown,
            "keys_before": dict(baseline_keys),
            "keys_after": dict(after_keys),
            "primary_at_end": primary,
        },
        "rss_mb": rss_summary(sampler.samples),
        "faults": dict(chaos.counts()),
        "chaos_error": repr(chaos.error) if chaos.error else None,
        "events": chaos.events,
        "log_error_lines": logs,
        "samples": sampler.samples,
    }


def rss_summary(samples: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """First, last and largest RSS of each process (name/pid), with how long it was seen."""
    lives: dict[str, dict[str, Any]] = {}
    for row in samples:
        for name, (pid, mb) in row["rss_mb"].items():
            if mb is None:
                continue
            life = lives.setdefault(f"{name}/{pid}", {"first": mb, "first_t": row["t"]})
            life.update(last=mb, last_t=row["t"], max=max(mb, life.get("max", mb)))
    for life in lives.values():
        life["seconds"] = round(life.pop("last_t") - life.pop("first_t"), 1)
    return lives


# -- the plot ----------------------------------------------------------------------------

FAULT_COLOURS = {"kill": (214, 39, 40), "failover": (148, 103, 189), "s3": (255, 127, 14), "drain": (44, 160, 44)}
LINE_COLOURS = [(31, 119, 180), (140, 86, 75), (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207)]


def plot(path: Path, run: dict[str, Any]) -> None:
    """Three panels over time, the faults as vertical lines: jobs ended per second, Redis
    used_memory, each worker's RSS (a break where a process was restarted)."""
    samples, events = run["samples"], run["events"]
    width, panel, left, right, top, gap = 1100, 200, 70, 150, 50, 40
    height = top + 3 * panel + 2 * gap + 40
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    end_t = max(samples[-1]["t"], 1.0)

    def x_of(t: float) -> float:
        return left + t / end_t * (width - left - right)

    rates = [
        ((a["t"] + b["t"]) / 2, (b["ended"] - a["ended"]) / max(b["t"] - a["t"], 1e-9))
        for a, b in zip(samples, samples[1:])
    ]
    redis_mb = [(s["t"], s["redis_used"] / 2**20 if s["redis_used"] else None) for s in samples]
    names = sorted({name for s in samples for name in s["rss_mb"]})
    rss = {
        name: [(s["t"], *s["rss_mb"][name]) if name in s["rss_mb"] else (s["t"], None, None) for s in samples]
        for name in names
    }
    panels = [
        ("jobs ended per second", {"jobs/s": [(t, v, 0) for t, v in rates]}),
        ("Redis used_memory of the primary (MiB)", {"redis": [(t, v, 0) for t, v in redis_mb]}),
        (
            "RSS per worker process (MiB)",
            {name: [(t, mb, pid) for t, pid, mb in series] for name, series in rss.items()},
        ),
    ]
    title = (
        f"soak: {run['submitted']} jobs, {run['run']['workers']} noop workers, seed {run['run']['seed']}; "
        f"lost {run['lost']}, callbacks per job {run['callbacks_per_job']}; faults {run['faults']}"
    )
    draw.text((left, 10), title, fill="black")
    for n, (fault, colour) in enumerate(FAULT_COLOURS.items()):
        draw.line([(left + 110 * n, 32), (left + 110 * n + 16, 32)], fill=colour, width=3)
        draw.text((left + 110 * n + 22, 26), fault, fill="black")
    for row, (label, series) in enumerate(panels):
        y0 = top + row * (panel + gap)
        y1 = y0 + panel
        values = [v for points in series.values() for _, v, _ in points if v is not None]
        high = max(values, default=1.0) * 1.1 or 1.0
        low = 0.0

        def y_of(v: float, y0: int = y0, y1: int = y1, high: float = high, low: float = low) -> float:
            return y1 - (v - low) / (high - low) * (y1 - y0)

        for tick in range(5):
            v = low + (high - low) * tick / 4
            draw.line([(left, y_of(v)), (width - right, y_of(v))], fill=(230, 230, 230))
            draw.text((6, y_of(v) - 6), f"{v:.1f}", fill="black")
        for event in events:  # a light band while the fault lasted, a line where it began
            x = x_of(event["t"])
            light = tuple(255 - (255 - c) // 4 for c in FAULT_COLOURS[event["fault"]])
            draw.rectangle([x, y0, max(x + 1, x_of(event["t"] + event["took_s"])), y1], fill=light)
            draw.line([(x, y0), (x, y1)], fill=FAULT_COLOURS[event["fault"]])
            if row == 0:
                draw.text((x - 3, y0 - 12), event["fault"][0].upper(), fill=FAULT_COLOURS[event["fault"]])
        draw.rectangle([left, y0, width - right, y1], outline="black")
        draw.text((left + 6, y0 + 4), label, fill="black")
        for n, (name, points) in enumerate(series.items()):
            colour = LINE_COLOURS[n % len(LINE_COLOURS)]
            run_: list[tuple[float, float]] = []
            last_pid: Any = None
            for t, v, pid in [*points, (0.0, None, None)]:
                if v is None or pid != last_pid:
                    if len(run_) > 1:
                        draw.line(run_, fill=colour, width=2)
                    run_ = []
                if v is not None:
                    run_.append((x_of(t), y_of(v)))
                last_pid = pid
            if len(series) > 1:
                draw.line(
                    [(width - right + 10, y0 + 10 + 14 * n), (width - right + 26, y0 + 10 + 14 * n)],
                    fill=colour,
                    width=3,
                )
                draw.text((width - right + 30, y0 + 4 + 14 * n), name, fill="black")
    for minute in range(0, int(end_t // 60) + 1, max(1, int(end_t // 60) // 10 or 1)):
        x = x_of(minute * 60)
        draw.text((x - 8, height - 34), f"{minute}m", fill="black")
    draw.text((width // 2 - 40, height - 18), "time since the first submit", fill="black")
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jobs", type=int, help="default 100000 (--quick: 2000)")
    parser.add_argument(
        "--workers", type=int, default=3, help="model workers (at least 2: the first is never a target)"
    )
    parser.add_argument("--rate", type=float, default=20.0, help="jobs/s in all (0: as fast as the system takes them)")
    parser.add_argument("--in-flight", type=int, default=500, help="most jobs submitted and not yet called back")
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--settle-s", type=float, default=600.0, help="how long the end waits for every job")
    parser.add_argument(
        "--quick", action="store_true", help="2,000 jobs, every fault at least once; writes build/soak/"
    )
    parser.add_argument(
        "--job-ttl-s",
        type=int,
        default=Settings.model_fields["job_ttl_s"].default,
        help="REFINERY_JOB_TTL_S (default the product's, 7 days); under a day, the run also waits "
        "for the idempotency keys to expire and measures memory after that",
    )
    parser.add_argument("--out", type=Path, help=f"default: {RESULTS}, or {QUICK_RESULTS} with --quick")
    parser.add_argument("--work", type=Path, help="the stack's directory, kept (logs): default build/soak/stack")
    args = parser.parse_args()
    if args.workers < 2:
        parser.error("--workers must be at least 2")
    args.jobs = args.jobs or (2000 if args.quick else 100_000)
    out = args.out or (QUICK_RESULTS if args.quick else RESULTS)
    workdir = (args.work or QUICK_RESULTS / "stack").resolve()  # redis-server runs in it: no relative paths
    shutil.rmtree(workdir, ignore_errors=True)
    run = soak(args, workdir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "soak.json").write_text(json.dumps(run, indent=1) + "\n")
    plot(out / "soak.png", run)
    summary = {k: v for k, v in run.items() if k not in ("samples", "events")}
    console.print_json(json.dumps(summary))
    console.print(f"wrote {out / 'soak.json'} and {out / 'soak.png'}")


if __name__ == "__main__":
    main()
