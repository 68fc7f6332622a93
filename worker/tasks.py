"""Celery tasks: thin wrappers that take a job id and hand it to the runner.

Model tasks and the callback task share this module but not their imports: a callbacks
worker never loads torch.
"""

from __future__ import annotations

import logging
import socket
from functools import cache

from celery import Task
from celery.signals import worker_ready, worker_shutdown

from shared import keys
from shared.callbacks import CallbackFailed
from shared.settings import Settings, get_settings
from shared.store import JobStore
from worker import metrics
from worker.app import app

logger = logging.getLogger(__name__)

_runner = None  # the JobRunner of a model worker, built once per process


def configure_runner(settings: Settings, worker_name: str, *, generator: bool, teacher: bool = False) -> None:
    """Load and warm the models before the worker consumes (``refinery worker`` calls this)."""
    global _runner
    from shared.storage import Storage
    from worker.batcher import DynamicBatcher
    from worker.batches import ModelWork
    from worker.leases import LeaseKeeper
    from worker.registry import ModelRegistry
    from worker.runner import JobRunner

    registry = ModelRegistry(settings)
    registry.warm_up(generator=generator, teacher=teacher)
    batcher = DynamicBatcher(
        ModelWork(registry),
        max_batch=lambda key: settings.max_batch_for(key.width, key.height),
        max_wait_s=settings.max_wait_ms / 1000,
    )
    store = JobStore.from_settings(settings)
    _runner = JobRunner(
        settings,
        registry,
        batcher,
        LeaseKeeper(store, settings.lease_s, worker_name),
        store,
        Storage(settings),
        notify=lambda job_id, event: app.send_task(keys.TASK_CALLBACK, args=[job_id, event]),
        worker_name=worker_name,
    )


def _get_runner():
    if _runner is None:  # started as plain `celery -A worker.app worker`: load lazily
        configure_runner(get_settings(), f"celery@{socket.gethostname()}", generator=True)
    return _runner


def run_job(task: Task, job_id: str) -> None:
    """One task body for every model queue; the task name only routes the job."""
    retry_in = _get_runner().run(job_id)
    if retry_in is not None:
        # A new message for the same job, due later; this one is acknowledged.
        raise task.retry(countdown=retry_in)


# generate_and_refine, refine_only, pair: one per queue (shared.broker routes by name).
for _name in (keys.TASK_GENERATE, keys.TASK_REFINE, keys.TASK_PAIR):
    app.task(name=_name, bind=True, max_retries=None)(run_job)


@app.task(name=keys.TASK_CALLBACK, bind=True, max_retries=None)
def deliver_callback(self: Task, job_id: str, event: str) -> None:
    from worker.notify import deliver_job_callback

    settings = get_settings()
    try:
        deliver_job_callback(settings, _store(), job_id, event)
    except CallbackFailed as exc:
        if self.request.retries >= settings.callback_max_retries:
            logger.warning("job %s: callback abandoned after %d attempts: %s", job_id, self.request.retries + 1, exc)
            return
        # Exponential backoff, capped; the job's own state is already final.
        countdown = min(settings.callback_backoff_max_s, 2**self.request.retries)
        raise self.retry(countdown=countdown, exc=exc) from None


@cache
def _store() -> JobStore:
    return JobStore.from_settings(get_settings())


@worker_ready.connect
def _announce(sender, **_: object) -> None:
    """Publish what this worker serves (preset, device, dtype, refiner) for status tools."""
    info = _runner.registry.describe() if _runner is not None else {"role": "callbacks"}
    metrics.set_worker_info(info)
    _store().register_worker(sender.hostname, info)


@worker_shutdown.connect
def _retire(sender, **_: object) -> None:
    _store().unregister_worker(sender.hostname)
