"""The one routing table: which Celery task and which queue each job kind goes to.

The producer sends by it, the broker configuration routes by it and the worker registers
its tasks from it; adding a job kind adds one row here (and its queue setting).
"""

from __future__ import annotations

from dataclasses import dataclass

from celery import Celery

from shared import keys
from shared.contract import JobKind, JobRecord
from shared.settings import Settings


@dataclass(frozen=True)
class Route:
    task: str  # the Celery task name: the wire contract foreign producers rely on
    queue_setting: str  # the Settings field that names the queue

    def queue(self, settings: Settings) -> str:
        return getattr(settings, self.queue_setting)


ROUTES: dict[JobKind, Route] = {
    JobKind.generate_and_refine: Route(keys.TASK_GENERATE, "queue_generate"),
    JobKind.refine_only: Route(keys.TASK_REFINE, "queue_refine"),
    JobKind.pair: Route(keys.TASK_PAIR, "queue_pairs"),
}


def model_queues(settings: Settings) -> list[str]:
    """The queues whose jobs need models (every queue but the callbacks one)."""
    return [route.queue(settings) for route in ROUTES.values()]


def kinds_served(settings: Settings, queues: list[str]) -> list[JobKind]:
    return [kind for kind, route in ROUTES.items() if route.queue(settings) in queues]


def task_routes(settings: Settings) -> dict[str, dict[str, str]]:
    """Celery's ``task_routes``: task name -> queue, callbacks included."""
    routes = {route.task: {"queue": route.queue(settings)} for route in ROUTES.values()}
    routes[keys.TASK_CALLBACK] = {"queue": settings.queue_callbacks}
    return routes


def send_job(app: Celery, record: JobRecord, settings: Settings) -> None:
    """One message per job, carrying only its id: the record in Redis is the payload."""
    route = ROUTES[record.kind]
    app.send_task(
        route.task,
        args=[record.job_id],
        task_id=record.job_id,
        queue=route.queue(settings),
        priority=record.spec.priority.rank,
    )


def send_callback(app: Celery, job_id: str, event: str) -> None:
    app.send_task(keys.TASK_CALLBACK, args=[job_id, event])
