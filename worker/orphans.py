"""Messages lost on the broker, sent again: jobs' (by model workers) and callbacks' (by
callbacks workers).

kombu takes a message off its queue (BRPOP) and only then records it as unacknowledged. A
Redis primary lost between the two (a crash, a failover) loses the message, while what
sent it, written in the same transaction and confirmed by a replica, stays: a job queued
with nothing left to run it, or a callback marked pending that no receiver will get (1 of
30,000 in benchmarks/soak.py's run with 7 failovers). Every ``orphan_check_s`` an idle
worker looks for the ones older than that whose queue is empty and whose message no worker
holds. A second message for a job is harmless: the first delivery to claim it runs it,
the others find it running or finished. A second callback (a sweep that caught a message
in that gap, or two callbacks workers sweeping at once) reaches the receiver with the same
webhook-id, by which receivers drop duplicates.
"""

from __future__ import annotations

import logging
import threading
import time

from celery import Celery

from shared import keys
from shared.broker import callback_push, held_task_ids, job_push, queue_depth
from shared.contract import JobState
from shared.errors import JobNotFound
from shared.records import RecordStore
from shared.settings import Settings

logger = logging.getLogger(__name__)


class Sweeper:
    """A sweep every ``orphan_check_s`` in a thread of its own."""

    settings: Settings

    def sweep(self) -> list[str]:
        raise NotImplementedError

    def start(self) -> None:
        threading.Thread(target=self._sweep_forever, name=type(self).__name__, daemon=True).start()

    def _sweep_forever(self) -> None:
        while True:
            time.sleep(self.settings.orphan_check_s)
            try:
                self.sweep()
            except Exception:  # Redis away for a moment: the next round tries again
                logger.warning("%s failed", type(self).__name__, exc_info=True)


class OrphanSweeper(Sweeper):
    def __init__(self, app: Celery, store: RecordStore, settings: Settings, kinds: list[str]) -> None:
        self.app = app
        self.store = store
        self.settings = settings
        self.kinds = kinds

    def sweep(self) -> list[str]:
        """Send the orphans of this worker's kinds again; returns their ids."""
        idle = [k for k in self.kinds if not queue_depth(self.store.redis, self.settings.queue(k))]
        candidates = self.store.queued_before(time.time() - self.settings.orphan_check_s)
        if not idle or not candidates:
            return []
        held = held_task_ids(self.store.redis)
        sent = []
        for job_id in candidates:
            if job_id in held:
                continue
            try:
                record = self.store.get(job_id)
            except JobNotFound:  # expired
                self.store.forget_queued(job_id)
                continue
            if record.state is not JobState.queued:
                self.store.forget_queued(job_id)
            elif record.kind in idle:
                logger.warning("job %s: queued with no message left on the broker; sent again", job_id)
                self.store.push(job_push(self.app, record, self.settings))
                sent.append(job_id)
        return sent


class CallbackSweeper(Sweeper):
    def __init__(self, app: Celery, store: RecordStore, settings: Settings) -> None:
        self.app = app
        self.store = store
        self.settings = settings

    def sweep(self) -> list[str]:
        """Send the lost callbacks again; returns their task ids."""
        if queue_depth(self.store.redis, self.settings.queue_callbacks):
            return []
        candidates = self.store.callbacks_sent_before(time.time() - self.settings.orphan_check_s)
        if not candidates:
            return []
        held = held_task_ids(self.store.redis)
        sent = []
        for task_id in candidates:
            if task_id in held:  # being delivered, or waiting out a retry's backoff
                continue
            job_id, event = keys.parse_callback_task_id(task_id)
            logger.warning("job %s: its %s callback had no message left on the broker; sent again", job_id, event)
            self.store.push(callback_push(self.app, job_id, event, self.settings))
            sent.append(task_id)
        return sent
