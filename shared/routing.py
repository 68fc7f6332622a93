"""Where each job kind goes: its Celery task and its queue, read from the kinds' declarations
(``shared.contract.KINDS``) and the queue settings.

The producer sends by it, the broker configuration routes by it and the worker registers
its tasks from it.
"""

from __future__ import annotations

import base64
import uuid
from typing import Any

from celery import Celery
from kombu.utils.json import dumps

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


def job_message(app: Celery, record: JobRecord, settings: Settings) -> tuple[str, dict[str, Any]]:
    """The message Celery's ``send_task`` would send for ``record``, and its queue, for a writer
    that pushes it onto the queue's list itself, in one step with other writes (the producer's
    ``RecordStore.create``, the gateway's admission): Celery's protocol 2 (its own headers)
    in kombu's Redis envelope, as docs/deploy.md spells it for producers in other languages.
    ``properties.priority`` is left out: the writer sets it to the step of the list it pushes
    to (``shared.broker.queue_lists``), as kombu does, so a redelivered message returns there."""
    queue = settings.queue(record.kind)
    return queue, _message(app, KINDS[record.kind].task, [record.job_id], record.job_id, queue)


def callback_message(app: Celery, job_id: str, event: str, settings: Settings) -> tuple[str, dict[str, Any]]:
    """The callbacks task's message for a job's ``event`` (the state it entered), and its
    queue, for the transaction that enters the state (``RecordStore.update``'s ``notify``)."""
    queue = settings.queue_callbacks
    return queue, _message(app, keys.TASK_CALLBACK, [job_id, event], keys.callback_task_id(job_id, event), queue)


def _message(app: Celery, task: str, args: list[str], task_id: str, queue: str) -> dict[str, Any]:
    protocol = app.amqp.as_task_v2(task_id, task, args=args)
    return {
        "body": base64.b64encode(dumps(protocol.body).encode()).decode(),
        "content-encoding": "utf-8",
        "content-type": "application/json",
        "headers": protocol.headers,
        "properties": {
            **protocol.properties,
            "delivery_mode": 2,
            "delivery_info": {"exchange": "", "routing_key": queue},
            "body_encoding": "base64",
            "delivery_tag": str(uuid.uuid4()),
        },
    }
