"""The Celery configuration both sides share: producers send with it, workers consume with it.

Tasks take a job id, never a payload: the record in Redis is the source of truth, and the
broker carries JSON only (pickle is not accepted).
"""

from __future__ import annotations

import json
import ssl
from dataclasses import dataclass, replace
from typing import Any
from urllib.parse import parse_qs, urlsplit

import redis
from celery import Celery
from celery.app.events import Events
from celery.events.dispatcher import EventDispatcher
from kombu.utils.json import dumps

from shared import keys
from shared.contract import JobRecord
from shared.redis_client import is_sentinel, retry_budget_s, sentinel_kwargs, sentinel_master
from shared.routing import callback_message, default_queues, job_message, task_routes
from shared.settings import Settings

# Celery's Redis transport keeps one list per priority step: "<queue>" for 0 and
# "<queue>\x06\x16<step>" for the others, and serves lower steps first. Pinned here
# (rather than left to kombu's defaults) because queue_depth and foreign producers rely on it.
PRIORITY_STEPS = [0, 3, 6, 9]
PRIORITY_SEPARATOR = "\x06\x16"


# The hash where kombu keeps every message a worker has taken and not acknowledged yet
# (ETA retries included), keyed by delivery tag. Pinned for held_task_ids.
UNACKED = "unacked"


def queue_lists(queue: str) -> list[str]:
    return [queue if step == 0 else f"{queue}{PRIORITY_SEPARATOR}{step}" for step in PRIORITY_STEPS]


@dataclass(frozen=True)
class Push:
    """A task message as kombu would LPUSH it, for a writer that pushes it itself in one
    step with other writes (``RecordStore.create`` and ``update``)."""

    queue: str
    list: str  # the queue's list for the message's priority
    message: str
    # A callback's task id: the writer also marks it pending (keys.CALLBACKS_PENDING) until
    # a callbacks worker settles it, so that a message lost on the broker is sent again.
    callback: str | None = None


def job_push(app: Celery, record: JobRecord, settings: Settings) -> Push:
    """``record``'s job message (``shared.routing.job_message``) at its own priority."""
    return _push(*job_message(app, record, settings), record.spec.priority.rank)


def callback_push(app: Celery, job_id: str, event: str, settings: Settings) -> Push:
    """The callback message of a job's ``event`` (``shared.routing.callback_message``), at
    the priority Celery gives a task sent without one."""
    push = _push(*callback_message(app, job_id, event, settings), PRIORITY_STEPS[0])
    return replace(push, callback=keys.callback_task_id(job_id, event))


def _push(queue: str, message: dict[str, Any], priority: int) -> Push:
    message["properties"]["priority"] = priority
    return Push(queue, queue_lists(queue)[PRIORITY_STEPS.index(priority)], dumps(message))


def queue_depth(client: redis.Redis, queue: str) -> int:
    """Messages waiting in ``queue``, all priorities together."""
    with client.pipeline(transaction=False) as pipe:
        for name in queue_lists(queue):
            pipe.llen(name)
        return sum(pipe.execute())


def held_task_ids(client: redis.Redis) -> set[str]:
    """Task ids (our job ids, for job tasks) of the messages workers hold unacknowledged."""
    held = set()
    for raw in client.hvals(UNACKED):
        message, _exchange, _routing_key = json.loads(raw)
        held.add(message["headers"]["id"])
    return held


_CERT_REQS = {"none": ssl.CERT_NONE, "optional": ssl.CERT_OPTIONAL, "required": ssl.CERT_REQUIRED}


def broker_ssl_options(url: str) -> dict | None:
    """TLS options for a ``rediss://`` broker URL, verifying the server by default.

    Without them kombu falls back to accepting any certificate; with them the URL's own
    query (``ssl_cert_reqs``, ``ssl_ca_certs``, ``ssl_certfile``, ``ssl_keyfile``, in
    redis-py's spelling) decides, as it does for the job store's redis-py client.
    """
    parts = urlsplit(url)
    if parts.scheme != "rediss":
        return None
    query = {key: values[-1] for key, values in parse_qs(parts.query).items()}
    options: dict = {"ssl_cert_reqs": _CERT_REQS[query.get("ssl_cert_reqs", "required").lower()]}
    options.update({key: query[key] for key in ("ssl_ca_certs", "ssl_certfile", "ssl_keyfile") if key in query})
    return options


class SerialEventDispatcher(EventDispatcher):
    """Celery's event dispatcher with every send through its one lock, and nothing buffered.

    A worker on an event loop (ours: Redis transport) gives its dispatcher a buffer for
    task events, which Celery appends to without the lock and flushes, from the loop's
    thread, by publishing the list and then emptying it in place. With the thread pool the
    pool threads send ``task-started``/``task-succeeded`` while the loop flushes: an event
    appended during the publish is emptied away unsent (and a flush that fails empties the
    very list it kept for the retry). The flush itself is asked for across threads through
    the loop's ``_ready`` set, which the loop swaps without a lock, so a last event could
    also wait for good. Measured: 200 jobs at once, 38-69 ``task-started`` reached Redis
    (benchmarks/flower_events.py). Here each event is one PUBLISH under the lock, from the
    thread that has it; events that fail while Redis is away are kept and flushed, once,
    on reconnect (Celery's ``extend_buffer`` + ``flush``)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs["buffer_group"] = None
        kwargs["on_send_buffered"] = None
        super().__init__(*args, **kwargs)

    def flush(self, errors: bool = True, groups: bool = True) -> None:
        if not errors:
            return
        with self.mutex:
            pending = list(self._outbound_buffer)
            self._outbound_buffer.clear()
            for event, routing_key, _ in pending:
                self._publish(event, self.producer, routing_key)  # a failure is kept again

    def extend_buffer(self, other: EventDispatcher) -> None:
        with self.mutex:
            self._outbound_buffer.extend(other._outbound_buffer)


class SerialEvents(Events):
    dispatcher_cls = f"{__name__}:SerialEventDispatcher"


def make_celery(settings: Settings) -> Celery:
    app = Celery("face_refinery", broker=settings.redis_url, events=SerialEvents)
    transport: dict = {
        "visibility_timeout": settings.visibility_timeout_s,
        "priority_steps": PRIORITY_STEPS,
        "sep": PRIORITY_SEPARATOR,
        "queue_order_strategy": "priority",
        # How often a worker looks for messages whose worker vanished (then redelivers
        # those older than the visibility timeout): a quarter of it, every time.
        "unacked_restore_interval": max(1, min(10, settings.visibility_timeout_s // 4)),
        "unacked_restore_throttle": 1,
        "unacked_key": UNACKED,
    }
    use_ssl = broker_ssl_options(settings.redis_url)
    if is_sentinel(settings):
        # kombu's Sentinel transport asks the Sentinels for the primary on every connect,
        # so a worker or producer that lost its connection in a failover finds the new one.
        transport.update(master_name=sentinel_master(settings), sentinel_kwargs=sentinel_kwargs(settings))
        if settings.redis_sentinel_tls:
            use_ssl = {"ssl_cert_reqs": ssl.CERT_REQUIRED}
    app.conf.update(
        broker_use_ssl=use_ssl,
        # A message sent during a failover keeps trying as long as the job store's calls do.
        task_publish_retry_policy={
            "max_retries": max(3, round(retry_budget_s(settings))),
            "interval_start": 0,
            "interval_step": 0.5,
            "interval_max": 1,
        },
        task_serializer="json",
        result_serializer="json",
        event_serializer="json",
        accept_content=["json"],
        # Job state lives in our own records; Celery results would be a second copy.
        task_ignore_result=True,
        # Ack after the job ran, and requeue it if the worker process died: no job is lost.
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        # A GPU worker takes one job at a time; prefetching more would hide them from idle workers.
        worker_prefetch_multiplier=1,
        broker_transport_options=transport,
        broker_connection_retry_on_startup=True,
        task_default_queue=default_queues(settings)[0],
        task_routes=task_routes(settings),
        # Events let Flower follow tasks.
        worker_send_task_events=True,
        task_send_sent_event=True,
    )
    return app
