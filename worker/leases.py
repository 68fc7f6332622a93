"""Leases: how a running job tells every other worker "I hold this one, and I am alive".

Redis redelivers a message whose worker has not acknowledged it within the visibility
timeout, also when that worker is alive and simply busy with a long job. The record's
lease, renewed here every third of its length while the job runs, lets the second
delivery see that the job is held and come back later instead of running it twice. A
worker that died stops renewing, its leases run out, and the job runs again.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from datetime import timedelta

from shared.contract import JobRecord, JobState, utcnow
from shared.records import RecordStore

logger = logging.getLogger(__name__)


class LeaseKeeper:
    def __init__(self, store: RecordStore, lease_s: float, worker_name: str) -> None:
        self.store = store
        self.lease = timedelta(seconds=lease_s)
        # Unique per process: a worker restarted under the same name must not mistake the
        # leases of its dead predecessor for its own.
        self.owner = f"{worker_name}/{uuid.uuid4().hex[:12]}"
        self._held: set[str] = set()
        self._lock = threading.Lock()
        threading.Thread(target=self._renew_forever, args=(lease_s / 3,), name="lease-renewer", daemon=True).start()

    def stamp(self, record: JobRecord) -> None:
        """Stamp a record being claimed (inside the claim's transaction, which may run again:
        so it holds nothing yet)."""
        record.lease_owner = self.owner
        record.lease_expires_at = utcnow() + self.lease

    def hold(self, job_id: str) -> None:
        """Renew the job's lease from now on: its claim is committed."""
        with self._lock:
            self._held.add(job_id)

    def holds(self, job_id: str) -> bool:
        with self._lock:
            return job_id in self._held

    def release(self, job_id: str) -> None:
        with self._lock:
            self._held.discard(job_id)

    def held(self) -> list[str]:
        with self._lock:
            return list(self._held)

    @staticmethod
    def time_left(record: JobRecord) -> float | None:
        """Seconds until the lease on this running job runs out; None if nobody holds it.

        Its holder may be this very process: a message redelivered while its job runs here
        must wait just the same."""
        if record.state is not JobState.running or record.lease_expires_at is None:
            return None
        left = (record.lease_expires_at - utcnow()).total_seconds()
        return left if left > 0 else None

    def _renew_forever(self, every_s: float) -> None:
        while True:
            time.sleep(every_s)
            for job_id in self.held():
                try:
                    self.store.update(job_id, self._renew)
                except Exception:  # Redis away for a moment: the next round tries again
                    logger.warning("job %s: lease renewal failed", job_id, exc_info=True)

    def _renew(self, record: JobRecord) -> JobRecord | None:
        if record.state is not JobState.running or record.lease_owner != self.owner:
            return None
        record.lease_expires_at = utcnow() + self.lease
        return record
