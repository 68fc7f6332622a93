"""Starting a worker with the flags GPU work needs (``refinery worker``)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
from functools import partial
from typing import TYPE_CHECKING

from celery import Celery
from celery.utils.nodenames import host_format

from shared.broker import callback_push
from shared.errors import InvalidInput
from shared.presets import get_preset
from shared.routing import kinds_served, model_queues
from shared.settings import Settings

if TYPE_CHECKING:
    from worker.lifecycle import JobRunner


def run_worker(
    settings: Settings,
    queues: list[str],
    *,
    loglevel: str = "INFO",
    name: str | None = None,
    callbacks: bool = True,
) -> None:
    """Model queues run in Celery's thread pool: one process, so one resident copy of the
    models and no fork after CUDA is initialised. Each delivered job has a thread for its
    I/O (S3, Redis, encoding) and hands its model work to the one batcher thread
    (worker/batcher.py). The callbacks queue runs in a worker process of its own, so slow
    receivers never wait on (or hold up) the GPU."""
    served = [q for q in queues if q in model_queues(settings)]
    if served and settings.queue_callbacks in queues:
        raise InvalidInput("run the callbacks queue in a worker of its own", field="queues")
    unknown = set(queues) - {*model_queues(settings), settings.queue_callbacks}
    if unknown:
        raise InvalidInput(f"unknown queue(s) {sorted(unknown)}", field="queues")
    if served:
        get_preset(settings.model_preset)  # an unknown one fails now, not after 8 s of imports
    # Expanded here (%h -> this host), so job records name the worker as Celery does.
    hostname = host_format(name or f"{'+'.join(queues)}-{os.getpid()}@%h")

    # Held until this worker ends: its callbacks worker stops when the pipe closes.
    sidecar = (
        _start_callbacks_worker(settings, f"{settings.queue_callbacks}-{hostname}") if served and callbacks else None
    )

    from worker import metrics
    from worker.app import make_app

    metrics_port = metrics.start_metrics_server(settings.metrics_port, settings.metrics_port_span)
    metrics_url = f"http://{socket.gethostname()}:{metrics_port}/metrics" if metrics_port else None
    build = None
    if served:
        from worker.lifecycle import build_runner

        kinds = kinds_served(settings, queues)

        def build(app: Celery) -> JobRunner:
            return build_runner(settings, hostname, kinds, callback=partial(callback_push, app, settings=settings))

    app = make_app(settings, build, metrics_url=metrics_url)
    app.worker_main(
        [
            "worker",
            f"--queues={','.join(queues)}",
            "--pool=threads",
            f"--concurrency={settings.worker_concurrency if served else settings.callback_concurrency}",
            f"--hostname={hostname}",
            f"--loglevel={loglevel}",
            # Mingle and gossip sync state between workers at start; jobs need neither.
            "--without-mingle",
            "--without-gossip",
        ]
    )
    if sidecar is not None:
        sidecar.communicate()  # closes its stdin: it drains too, and this worker waits for it


def _start_callbacks_worker(settings: Settings, hostname: str) -> subprocess.Popen:
    """A callbacks worker that stops when this one does, however this one stops."""
    argv = [sys.executable, "-m", "cli", "worker", f"--queues={settings.queue_callbacks}", f"--name={hostname}"]
    return subprocess.Popen([*argv, "--exit-with-parent"], stdin=subprocess.PIPE)


def exit_with_parent() -> None:
    """Drain (SIGTERM to itself, once) when the process that started this one is gone.

    That process holds the only write end of this one's stdin and never writes, so the read
    returns when it exits or is killed. (Linux's PR_SET_PDEATHSIG would also fire, once per
    thread, while a killed parent's threads die, and repeated SIGTERMs can hang Celery's
    shutdown.)"""

    def watch() -> None:
        # os.read, not sys.stdin: a thread blocked in a buffered read holds the buffer's lock,
        # and an interpreter exiting under it (a worker that fails to start) aborts (SIGABRT).
        while os.read(sys.stdin.fileno(), 4096):
            pass
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()
