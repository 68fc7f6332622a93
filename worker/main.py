"""Starting a worker with the flags GPU work needs (``refinery worker``)."""

from __future__ import annotations

import os
import socket

from shared.errors import InvalidInput
from shared.settings import Settings


def run_worker(settings: Settings, queues: list[str], *, loglevel: str = "INFO", name: str | None = None) -> None:
    """Model queues run in the solo pool: one resident copy of the models, no fork after
    CUDA is initialised, one job at a time. The callbacks queue runs in a thread pool of
    its own process, so slow receivers never wait on (or hold up) the GPU."""
    model_queues = [q for q in queues if q in settings.model_queues]
    if model_queues and settings.queue_callbacks in queues:
        raise InvalidInput("run the callbacks queue in a worker of its own", field="queues")
    unknown = set(queues) - {*settings.model_queues, settings.queue_callbacks}
    if unknown:
        raise InvalidInput(f"unknown queue(s) {sorted(unknown)}", field="queues")
    hostname = name or f"{'+'.join(queues)}-{os.getpid()}@{socket.gethostname()}"

    from worker.app import app
    from worker import tasks

    if model_queues:
        tasks.configure_runner(settings, hostname, generator=settings.queue_generate in queues)
        pool, concurrency = "solo", 1
    else:
        pool, concurrency = "threads", settings.callback_concurrency
    app.worker_main(
        [
            "worker",
            f"--queues={','.join(queues)}",
            f"--pool={pool}",
            f"--concurrency={concurrency}",
            f"--hostname={hostname}",
            f"--loglevel={loglevel}",
            # Mingle and gossip sync state between workers at start; jobs need neither.
            "--without-mingle",
            "--without-gossip",
        ]
    )
