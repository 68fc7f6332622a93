"""A private, throwaway stack on loopback: redis-server, an S3 server (moto), workers.

The demo, the integration tests and the benchmarks all run the system through this: real
processes on free ports, started and stopped here, nothing shared with the machine's own
services.
"""

from __future__ import annotations

import atexit
import itertools
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import redis

from devstack.forked import ForkedProcess
from shared import keys
from shared.archive import RECORD_NAME
from shared.objects import ObjectStore
from shared.records import RecordStore
from shared.routing import default_queues
from shared.settings import Settings

Process = subprocess.Popen | ForkedProcess

TEST_CALLBACK_SECRET = "whsec_" + "MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_until(check, *, timeout_s: float, what: str, process: Process | None = None, log: Path | None = None) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            tail = log.read_text()[-3000:] if log and log.exists() else ""
            raise RuntimeError(f"{what}: process exited with {process.returncode}\n{tail}")
        try:
            if check():
                return
        except Exception:
            pass
        time.sleep(0.05)
    raise TimeoutError(f"{what} not ready after {timeout_s} s")


def moto_server(port: int, log: Path) -> subprocess.Popen:
    """moto's S3 server on ``port``, returned once it answers."""
    with open(log, "ab") as out:
        argv = [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)]
        process = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/moto-api/"
    wait_until(lambda: httpx.get(url).status_code < 500, timeout_s=30, what="S3 (moto)", process=process, log=log)
    return process


class SharedS3:
    """One moto server for the stacks of this process that keep S3 up, each with a bucket of
    its own. A stack with a server of its own (``private_s3``, for a test that stops S3) costs
    1.8 core-seconds more to start and stop (benchmarks/stack_start.py), and the test suite
    starts some 45 stacks. The server lives until the process exits."""

    def __init__(self) -> None:
        self._port: int | None = None
        self.process: subprocess.Popen | None = None

    @property
    def port(self) -> int:
        self._port = self._port or free_port()
        return self._port

    def start(self, log: Path) -> None:
        if self.process is None or self.process.poll() is not None:
            self.process = moto_server(self.port, log)
            atexit.register(self.process.terminate)


shared_s3 = SharedS3()
_stacks = itertools.count()  # numbers the stacks' buckets, one name each on the shared server


def _env_value(value: Any) -> str:
    if isinstance(value, list):
        return ",".join(value)
    if hasattr(value, "get_secret_value"):
        return value.get_secret_value()
    return str(value)


class LocalStack:
    """``with LocalStack(workdir) as stack:`` gives ``stack.settings`` and running services.

    Its S3 is a bucket of its own on the process's shared moto server (`shared_s3`), or,
    with ``private_s3``, a moto server of its own: process ``"s3"``, which a test may stop."""

    def __init__(
        self,
        workdir: Path,
        *,
        preset: str = "tiny-schnell",
        redis_aof: bool = False,
        private_s3: bool = False,
        **overrides: Any,
    ) -> None:
        self.workdir = Path(workdir)
        self.redis_aof = redis_aof
        self.private_s3 = private_s3
        self.logs = self.workdir / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        self.redis_port = free_port()
        self.s3_port = free_port() if private_s3 else shared_s3.port
        fields: dict[str, Any] = {
            "redis_url": f"redis://127.0.0.1:{self.redis_port}/0",
            "s3_endpoint_url": f"http://127.0.0.1:{self.s3_port}",
            "s3_bucket": f"refinery-local-{next(_stacks)}",
            # moto accepts any credentials; these only need to be consistent.
            "s3_access_key_id": "testing",
            "s3_secret_access_key": "testing",
            "model_preset": preset,
            "teacher_preset": "tiny-dev",
            "model_cache_dir": self.workdir / "models",
            "callback_secret": TEST_CALLBACK_SECRET,
            "callback_allowlist": ["127.0.0.1"],
            "device": "cpu",
            "metrics_port": 0,  # several workers share this host; start_worker gives each its own
        }
        fields.update(overrides)
        self.settings = Settings(_env_file=None, **fields)
        self.env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        self.env.update({f"REFINERY_{name.upper()}": _env_value(value) for name, value in fields.items()})
        self.processes: dict[str, Process] = {}
        self._commands = itertools.count()

    def __enter__(self) -> LocalStack:
        try:
            self.start_redis()
            self.start_s3()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def spawn(self, name: str, argv: list[str], env: dict[str, str] | None = None) -> subprocess.Popen:
        """Start a process of the stack (logged to logs/NAME.log, stopped with the stack)."""
        log = open(self.logs / f"{name}.log", "ab")
        process = subprocess.Popen(
            argv, stdout=log, stderr=subprocess.STDOUT, env={**self.env, **(env or {})}, cwd=self.workdir
        )
        log.close()
        self.processes[name] = process
        return process

    def refinery(
        self, *args: str, timeout_s: float = 300, env: dict[str, str] | None = None
    ) -> subprocess.CompletedProcess:
        """Run the ``refinery`` command against this stack (``env``: variables of its own), as
        `subprocess.run` would with its output captured as text; forked as the workers are.
        Its stdout and stderr stay under logs/ as ``refinery-N.out`` and ``refinery-N.err``."""
        argv = list(map(str, args))
        out, err = (self.logs / f"refinery-{next(self._commands)}.{name}" for name in ("out", "err"))
        process = ForkedProcess(argv, {**self.env, **(env or {})}, self.workdir, out, err)
        try:
            returncode = process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
            raise
        return subprocess.CompletedProcess(argv, returncode, out.read_text(), err.read_text())

    def start_redis(self) -> None:
        argv = ["redis-server", "--port", str(self.redis_port), "--bind", "127.0.0.1", "--save", ""]
        # AOF, as the compose file runs it: a restart keeps queued jobs and records.
        argv += ["--appendonly", "yes" if self.redis_aof else "no", "--dir", str(self.workdir)]
        process = self.spawn("redis", argv)
        client = redis.Redis(port=self.redis_port)
        wait_until(client.ping, timeout_s=10, what="redis-server", process=process, log=self.logs / "redis.log")

    def start_s3(self) -> None:
        if self.private_s3:
            self.processes["s3"] = moto_server(self.s3_port, self.logs / "s3.log")
        else:
            shared_s3.start(self.logs / "s3-shared.log")
        storage = ObjectStore(self.settings)
        storage.ensure_bucket()
        storage.apply_retention()  # as a deployment does once (`refinery retention --apply`)

    def start_worker(
        self,
        name: str,
        queues: list[str] | None = None,
        *,
        metrics_port: int = 0,
        env: dict[str, str] | None = None,
        timeout_s: float = 120,
        callbacks: bool = False,
    ) -> Process:
        """Start ``refinery worker`` (``env``: settings of its own, e.g. ``REFINERY_REFINER``)
        and return once it announced itself ready. It is forked from a process that imported
        the worker's modules once (devstack/forked.py), so it is ready in about a second.
        Callbacks run as in production, in a worker of their own (``start_worker(name,
        ["callbacks"])``), unless ``callbacks`` starts one beside this worker, as a lone
        ``refinery worker`` does."""
        queues = queues or default_queues(self.settings)
        hostname = f"{name}@localstack"
        args = ["worker", f"--queues={','.join(queues)}", f"--name={hostname}"]
        args.append("--callbacks" if callbacks else "--no-callbacks")
        own = {**self.env, "REFINERY_METRICS_PORT": str(metrics_port), **(env or {})}
        process = self.processes[name] = ForkedProcess(args, own, self.workdir, self.logs / f"{name}.log")
        store = RecordStore.from_settings(self.settings)
        wait_until(
            lambda: hostname in store.workers(),
            timeout_s=timeout_s,
            what=f"worker {name}",
            process=process,
            log=self.logs / f"{name}.log",
        )
        return process

    def results(self) -> dict[str, list[str]]:
        """The objects jobs wrote, by job id: file names under ``jobs/<id>/``, without the
        archived record (``job.json``), which every finished job has."""
        prefix = f"{self.settings.s3_prefix}/jobs/"
        pages = ObjectStore(self.settings).client.get_paginator("list_objects_v2")
        found: dict[str, list[str]] = {}
        for page in pages.paginate(Bucket=self.settings.s3_bucket, Prefix=prefix):
            for obj in page.get("Contents", []):
                job_id, name = obj["Key"].removeprefix(prefix).split("/", 1)
                if name != RECORD_NAME:
                    found.setdefault(job_id, []).append(name)
        return found

    def wait_callbacks_settled(self, settings: Settings | None = None, timeout_s: float = 60) -> None:
        """Wait until every callback message sent so far is delivered or abandoned: the
        callbacks queue is empty and no delivery is held unacknowledged (a retry waiting out
        its backoff is held). Called once the expected callbacks arrived, so that a duplicate
        or a further retry, if the system sent one, has arrived too."""
        from shared.broker import UNACKED, queue_depth
        from shared.redis_client import connect

        settings = settings or self.settings  # others: a Sentinel group's (devstack/sentinel.py)
        client = connect(settings)
        callbacks = settings.queue_callbacks

        def held() -> int:
            # kombu keeps each unacknowledged message as JSON [message, exchange, routing key].
            return sum(json.loads(raw)[0]["headers"]["task"] == keys.TASK_CALLBACK for raw in client.hvals(UNACKED))

        def settled() -> bool:
            return queue_depth(client, callbacks) == 0 and held() == 0

        wait_until(settled, timeout_s=timeout_s, what="callbacks settled")

    def stop_process(self, name: str, sig: int = signal.SIGTERM, timeout_s: float = 20) -> None:
        process = self.processes.pop(name, None)
        if process is None or process.poll() is not None:
            return
        process.send_signal(sig)
        try:
            process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()

    def stop(self) -> None:
        # Workers first, so they do not spin on a vanished broker.
        for name in sorted(self.processes, key=lambda n: n in ("redis", "s3")):
            self.stop_process(name)
