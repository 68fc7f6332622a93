"""Starting a worker with the flags GPU work needs (``refinery worker``)."""

from __future__ import annotations

import os

from celery.utils.nodenames import host_format

from shared.errors import InvalidInput
from shared.settings import Settings


def run_worker(settings: Settings, queues: list[str], *, loglevel: str = "INFO", name: str | None = None) -> None:
    """Model queues run in Celery's thread pool: one process, so one resident copy of the
    models and no fork after CUDA is initialised. Each delivered job has a thread for its
    I/O (S3, Redis, encoding) and hands its model work to the one batcher thread
    (worker/batcher.py). The callbacks queue runs in a worker process of its own, so slow
    receivers never wait on (or hold up) the GPU."""
    model_queues = [q for q in queues if q in settings.model_queues]
    if model_queues and settings.queue_callbacks in queues:
        raise InvalidInput("run the callbacks queue in a worker of its own", field="queues")
    unknown = set(queues) - {*settings.model_queues, settings.queue_callbacks}
    if unknown:
        raise InvalidInput(f"unknown queue(s) {sorted(unknown)}", field="queues")
    # Expanded here (%h -> this host), so job records name the worker as Celery does.
    hostname = host_format(name or f"{'+'.join(queues)}-{os.getpid()}@%h")

    from worker import metrics, tasks
    from worker.app import app

    metrics.start_metrics_server(settings.metrics_port)
    if model_queues:
        tasks.configure_runner(
            settings, hostname, generator=settings.queue_generate in queues, teacher=settings.queue_pairs in queues
        )
        concurrency = settings.worker_concurrency
    else:
        concurrency = settings.callback_concurrency
    app.worker_main(
        [
            "worker",
            f"--queues={','.join(queues)}",
            "--pool=threads",
            f"--concurrency={concurrency}",
            f"--hostname={hostname}",
            f"--loglevel={loglevel}",
            # Mingle and gossip sync state between workers at start; jobs need neither.
            "--without-mingle",
            "--without-gossip",
        ]
    )
