"""The Celery app of one worker process, built from the settings it is given.

Tasks are thin: they take a job id and hand it to the ``JobRunner``. Every model task
runs the same lifecycle; the task names only route jobs (``shared/routing.py``). A
callbacks worker has no runner and never imports torch.

On SIGTERM (Celery's warm shutdown) a model worker drains: it stops fetching, hands the
messages of jobs not yet on the model back to the broker at once, and lets the batches on
the model finish for up to ``REFINERY_DRAIN_TIMEOUT_S``.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from celery import Celery, Task
from celery.exceptions import Reject
from celery.signals import worker_ready, worker_shutdown, worker_shutting_down

from shared import keys
from shared.archive import RecordArchive
from shared.broker import make_celery
from shared.callbacks import CallbackFailed
from shared.contract import KINDS
from shared.objects import ObjectStore
from shared.records import RecordStore
from shared.settings import Settings
from worker import metrics
from worker.orphans import CallbackSweeper, OrphanSweeper

if TYPE_CHECKING:
    from celery.worker.consumer import Consumer

    from worker.lifecycle import JobRunner

logger = logging.getLogger(__name__)


def make_app(
    settings: Settings,
    build_runner: Callable[[Celery], JobRunner] | None = None,
    metrics_url: str | None = None,
) -> Celery:
    """The callbacks task always; the model tasks when given ``build_runner``, which builds
    the runner that serves them around this app (it sends their callbacks through it).
    ``metrics_url``: where this worker serves Prometheus, published in its worker record."""
    app = make_celery(settings)
    runner = build_runner(app) if build_runner is not None else None
    store = RecordStore.from_settings(settings)
    records = RecordArchive(store, ObjectStore(settings))

    if runner is not None:
        from worker.lifecycle import HandBack

        def run_job(task: Task, job_id: str) -> None:
            try:
                retry_in = runner.run(job_id)
            except HandBack:
                # Back on its queue now, for any worker; not after the visibility timeout.
                raise Reject("worker draining", requeue=True) from None
            if retry_in is not None:
                # A new message for the same job, due later; this one is acknowledged.
                raise task.retry(countdown=retry_in)

        # Registered under each kind's task name: foreign producers send by those names.
        for kind in KINDS.values():
            app.task(name=kind.task, bind=True, max_retries=None)(run_job)

    @app.task(name=keys.TASK_CALLBACK, bind=True, max_retries=None)
    def deliver_callback(task: Task, job_id: str, event: str) -> None:
        from worker.notify import deliver_job_callback

        task_id = keys.callback_task_id(job_id, event)
        if not store.callback_pending(task_id):
            # Delivered or given up already: a message kombu restored because its ack was
            # lost (a failover between the delivery and the ack; 3 of 100,000 in the soak).
            logger.info("job %s: its %s callback was settled already; not sent again", job_id, event)
            return
        retrying = False
        try:
            deliver_job_callback(settings, records, job_id, event)
        except CallbackFailed as exc:
            if task.request.retries >= settings.callback_max_retries:
                logger.warning(
                    "job %s: callback abandoned after %d attempts: %s", job_id, task.request.retries + 1, exc
                )
                return
            # Exponential backoff, capped; the job's own state is already final.
            countdown = min(settings.callback_backoff_max_s, 2**task.request.retries)
            retrying = True
            raise task.retry(countdown=countdown, exc=exc) from None
        finally:
            if not retrying:
                store.callback_settled(task_id)

    consumers: list[Consumer] = []
    stopped = threading.Event()
    changed = threading.Event()  # what the worker serves changed: publish now, not at the next beat

    def announce(sender: Consumer, **_: object) -> None:
        """Publish what this worker serves (preset, device, dtype, refiners) for status tools,
        and keep publishing it while the worker lives: the record expires with the worker."""
        consumers.append(sender)
        info: dict[str, object] = runner.registry.describe() if runner is not None else {"role": "callbacks"}
        metrics.set_worker_info(info)
        info |= {"queues": sorted(sender.app.amqp.queues.consume_from or ()), "metrics_url": metrics_url}
        threading.Thread(target=heartbeat, args=(sender.hostname, info), name="heartbeat", daemon=True).start()
        if runner is not None:
            OrphanSweeper(app, store, settings, list(runner.handlers.by_kind)).start()
            runner.registry.refiners.start(on_change=changed.set)
        else:
            CallbackSweeper(app, store, settings).start()

    def heartbeat(hostname: str, info: dict[str, object]) -> None:
        every_s = settings.worker_heartbeat_s
        while not stopped.is_set():
            try:
                jobs_done = runner.jobs_done if runner is not None else None
                # The refiners a worker serves change while it runs (REFINERY_REFINER=registry:...).
                serving = runner.registry.refiners.describe() if runner is not None else {}
                store.register_worker(hostname, {**info, **serving, "jobs_done": jobs_done}, ttl_s=3 * every_s)
            except Exception:  # Redis away for a moment: the next beat tries again
                logger.warning("worker heartbeat failed", exc_info=True)
            changed.wait(every_s)
            changed.clear()

    def retire(sender: Any, **_: object) -> None:
        stopped.set()
        changed.set()
        if runner is not None:
            runner.registry.refiners.stop()
        store.unregister_worker(sender.hostname)
        if runner is not None and runner.batcher.abandoned:
            # Leave now: torch still running on a thread at interpreter exit aborts the process.
            logging.shutdown()
            os._exit(0)

    def drain(how: str, **_: object) -> None:
        """Runs in the signal handler, on the main thread, where the consumer lives."""
        if runner is None or how != "Warm" or not consumers or runner.draining.is_set():
            return
        consumer = consumers[0]
        if consumer.task_consumer is not None:
            consumer.task_consumer.cancel()  # fetch no more, so a handed-back message goes elsewhere
        threading.Thread(target=finish_drain, name="drain", daemon=True).start()

    def finish_drain() -> None:
        assert runner is not None
        if not runner.drain(settings.drain_timeout_s):
            logger.warning("drain: the batch on the model outlived %s s; handed back", settings.drain_timeout_s)

    worker_ready.connect(announce, weak=False)
    worker_shutting_down.connect(drain, weak=False)
    worker_shutdown.connect(retire, weak=False)
    return app
