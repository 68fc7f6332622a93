"""Queued jobs whose broker message was lost, sent again.

kombu takes a message off its queue (BRPOP) and only then records it as unacknowledged. A
Redis primary lost between the two (a crash, a failover) loses the message, while the
job's record, written before it and confirmed by a replica, stays queued with nothing left
to run it. An idle model worker looks for such jobs every ``orphan_check_s``: queued for
longer than that, their queue empty, their message held by no worker. A second message
for a job is harmless: the first delivery to claim it runs it, the others find it running
or finished.
"""

from __future__ import annotations

import logging
import threading
import time

from celery import Celery

from shared.broker import held_task_ids, job_push, queue_depth
from shared.contract import JobState
from shared.errors import JobNotFound
from shared.records import RecordStore
from shared.settings import Settings

logger = logging.getLogger(__name__)


class OrphanSweeper:
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
                push = job_push(self.app, record, self.settings)
                self.store.redis.lpush(push.list, push.message)
                sent.append(job_id)
        return sent

    def start(self) -> None:
        threading.Thread(target=self._sweep_forever, name="orphan-sweeper", daemon=True).start()

    def _sweep_forever(self) -> None:
        while True:
            time.sleep(self.settings.orphan_check_s)
            try:
                self.sweep()
            except Exception:  # Redis away for a moment: the next round tries again
                logger.warning("orphan sweep failed", exc_info=True)
