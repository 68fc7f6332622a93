"""Server-Sent Events for one job: an event per state change until a terminal one.

Built on the channel every record change is published on (``shared.records``), as
``RecordStore.wait`` is: subscribe first, then read the record, so no change falls between
the two. Each event carries the whole record. A comment line goes out when nothing changed
for ``KEEPALIVE_S``, which keeps proxies from closing the stream and finds clients that left.

Each stream holds a thread while it waits, so a process follows at most
``REFINERY_GATEWAY_MAX_STREAMS`` at once: a stream takes a slot before its response starts
(``StreamSlots.take``, exact under a lock: a flood of requests cannot overshoot it) and its
response gives it back when it ends, however it ends (finished, the client gone, never
started). The wait returns to the event loop every ``POLL_S`` (``job_events`` yields None
when it has nothing to send), so a stream whose client left ends, and gives its thread and
slot back, within that.
"""

from __future__ import annotations

import threading
import time
from collections.abc import AsyncIterator, Generator

import anyio.to_thread
from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from shared import keys
from shared.archive import RecordArchive
from shared.contract import JobState
from shared.errors import JobNotFound

KEEPALIVE_S = 15.0
POLL_S = 1.0


class StreamSlots:
    """The event streams this process may serve at once."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.active = 0
        self._lock = threading.Lock()

    def take(self) -> bool:
        with self._lock:
            if self.active >= self.limit:
                return False
            self.active += 1
            return True

    def give_back(self) -> None:
        with self._lock:
            self.active -= 1


class EventStream(StreamingResponse):
    """A job's events as ``text/event-stream``, holding one of ``slots`` until it ends."""

    def __init__(self, records: RecordArchive, job_id: str, slots: StreamSlots) -> None:
        super().__init__(
            _in_threads(job_events(records, job_id)),
            media_type="text/event-stream",
            # Proxies (nginx) must pass each event on as it comes.
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )
        self.slots = slots

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.slots.give_back()


_END = object()
Events = Generator[str | None, None, None]


def _step(events: Events) -> object:
    return next(events, _END)


async def _in_threads(events: Events) -> AsyncIterator[str]:
    """``events`` stepped in worker threads, one short step at a time (Starlette's own
    wrapper would hold its thread for the whole wait)."""
    try:
        while (item := await anyio.to_thread.run_sync(_step, events)) is not _END:
            if isinstance(item, str):
                yield item
    finally:
        events.close()


def job_events(records: RecordArchive, job_id: str) -> Events:
    """The stream's text, and None each ``POLL_S`` that had nothing to send."""
    pubsub = records.store.redis.pubsub(ignore_subscribe_messages=True)
    try:
        pubsub.subscribe(keys.job_events_channel(job_id))
        last: JobState | None = None
        quiet_since = time.monotonic()
        while True:
            try:
                record = records.get(job_id)
            except JobNotFound:
                return  # expired while followed: nothing more will happen to it
            if record.state is not last:
                last = record.state
                quiet_since = time.monotonic()
                yield f"event: {record.state.value}\ndata: {record.model_dump_json()}\n\n"
            if record.state.terminal:
                return
            # Until the job's channel speaks; a comment after KEEPALIVE_S of silence.
            while pubsub.get_message(timeout=POLL_S) is None:
                if time.monotonic() - quiet_since >= KEEPALIVE_S:
                    quiet_since = time.monotonic()
                    yield ": keep-alive\n\n"
                else:
                    yield None
    finally:
        pubsub.close()
