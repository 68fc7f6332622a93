"""Server-Sent Events for one job: an event per state change until a terminal one.

Built on the channel every record change is published on (``shared.records``), as
``RecordStore.wait`` is: subscribe first, then read the record, so no change falls between
the two. Each event carries the whole record. A comment line goes out when nothing changed
for ``KEEPALIVE_S``, which keeps proxies from closing the stream and finds clients that left.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator

from shared import keys
from shared.archive import RecordArchive
from shared.contract import JobState
from shared.errors import JobNotFound

KEEPALIVE_S = 15.0


class StreamCount:
    """The streams this process is serving. Counted by the streams themselves, from their
    first step to their end, so a response that never started holds nothing; the cap
    checked against it is approximate (two requests at once may both pass), which is all
    a guard against exhausting threads needs."""

    def __init__(self) -> None:
        self.active = 0
        self._lock = threading.Lock()

    def add(self, n: int) -> None:
        with self._lock:
            self.active += n


def job_events(records: RecordArchive, job_id: str, streams: StreamCount) -> Iterator[str]:
    """The stream's text, counted in ``streams`` while it runs."""
    streams.add(1)
    pubsub = records.store.redis.pubsub(ignore_subscribe_messages=True)
    try:
        pubsub.subscribe(keys.job_events_channel(job_id))
        last: JobState | None = None
        while True:
            try:
                record = records.get(job_id)
            except JobNotFound:
                return  # expired while followed: nothing more will happen to it
            if record.state is not last:
                last = record.state
                yield f"event: {record.state.value}\ndata: {record.model_dump_json()}\n\n"
            if record.state.terminal:
                return
            if pubsub.get_message(timeout=KEEPALIVE_S) is None:
                yield ": keep-alive\n\n"
    finally:
        pubsub.close()
        streams.add(-1)
