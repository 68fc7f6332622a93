"""Where each job kind goes: its Celery task and its queue, read from the kinds' declarations
(``shared.contract.KINDS``) and the queue settings.

The producer sends by it, the broker configuration routes by it and the worker registers
its tasks from it.
"""

from __future__ import annotations

from celery import Celery

from shared import keys
from shared.contract import KINDS, JobRecord
from shared.settings import Settings


def model_queues(settings: Settings) -> list[str]:
    """The queues whose jobs need models (every queue but the callbacks one)."""
    return list(dict.fromkeys(settings.queue(kind) for kind in KINDS))


def default_queues(settings: Settings) -> list[str]:
    """What a model worker started without ``--queues`` serves, and what a serving
    deployment needs a worker on (the kinds declared ``served_by_default``)."""
    return list(dict.fromkeys(settings.queue(name) for name, kind in KINDS.items() if kind.served_by_default))


def kinds_served(settings: Settings, queues: list[str]) -> list[str]:
    """The names of the job kinds whose queue is one of ``queues``."""
    return [kind for kind in KINDS if settings.queue(kind) in queues]


def task_routes(settings: Settings) -> dict[str, dict[str, str]]:
    """Celery's ``task_routes``: task name -> queue, callbacks included."""
    routes = {kind.task: {"queue": settings.queue(name)} for name, kind in KINDS.items()}
    routes[keys.TASK_CALLBACK] = {"queue": settings.queue_callbacks}
    return routes


def send_job(app: Celery, record: JobRecord, settings: Settings) -> None:
    """One message per job, carrying only its id: the record in Redis is the payload."""
    app.send_task(
        KINDS[record.kind].task,
        args=[record.job_id],
        task_id=record.job_id,
        queue=settings.queue(record.kind),
        priority=record.spec.priority.rank,
    )


def send_callback(app: Celery, job_id: str, event: str) -> None:
    app.send_task(keys.TASK_CALLBACK, args=[job_id, event])
