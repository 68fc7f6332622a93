"""Dynamic batching across concurrently delivered jobs, as Triton's dynamic batcher does.

A model worker runs Celery's thread pool: each delivered job runs in its own thread up to
the point where it needs the model, then calls ``submit`` and blocks. One model thread
gathers compatible requests (same key: preset, size, steps, guidance) until the batch is
full or the oldest request has waited ``max_wait_s``, runs them as one call, and hands each
thread its own result. Acknowledgement stays per job and late: every job's message is
acked by its own thread after its result is stored, so a crash mid-batch loses nothing.
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

import torch

logger = logging.getLogger(__name__)

Key = TypeVar("Key", bound=Hashable)


@dataclass(order=True)
class _Request(Generic[Key]):
    priority: int  # lower runs first
    sequence: int  # then first come, first served
    key: Key = field(compare=False)
    item: Any = field(compare=False)
    enqueued: float = field(compare=False)
    done: threading.Event = field(default_factory=threading.Event, compare=False)
    result: Any = field(default=None, compare=False)
    error: Exception | None = field(default=None, compare=False)
    batch_size: int = field(default=0, compare=False)
    waited_s: float = field(default=0.0, compare=False)


@dataclass(frozen=True)
class Batched:
    """What ``submit`` returns: the item's result and how it was batched."""

    result: Any
    batch_size: int
    waited_s: float  # time between submit and the start of its batch


class BatcherClosed(Exception):
    """The worker is draining: this request never reached the model."""


class DynamicBatcher(Generic[Key]):
    def __init__(
        self,
        run_batch: Callable[[Key, list[Any]], Sequence[Any]],  # one result per item, in order
        *,
        max_batch: Callable[[Key], int],
        max_wait_s: float,
    ) -> None:
        self.run_batch = run_batch
        self.max_batch = max_batch
        self.max_wait_s = max_wait_s
        self._pending: list[_Request[Key]] = []
        self._cond = threading.Condition()
        self._sequence = itertools.count()
        self._closed = False
        self.abandoned = False
        self._running: list[_Request[Key]] = []  # the batch on the model
        self._thread = threading.Thread(target=self._loop, name="model-batcher", daemon=True)
        self._thread.start()

    def submit(self, key: Key, item: Any, priority: int = 0) -> Batched:
        """Block until the item has run in some batch; re-raises that batch's error."""
        request = _Request(priority, next(self._sequence), key, item, time.monotonic())
        with self._cond:
            if self._closed:
                raise BatcherClosed
            self._pending.append(request)
            self._cond.notify()
        request.done.wait()
        if request.error is not None:
            raise request.error
        return Batched(request.result, request.batch_size, request.waited_s)

    def close(self) -> None:
        """Start no new batch, and hand every waiting request back to its caller with
        ``BatcherClosed``. The batch on the model, if any, runs to its end."""
        with self._cond:
            self._closed = True
            withdrawn, self._pending = self._pending, []
            self._cond.notify_all()
        for request in withdrawn:
            request.error = BatcherClosed()
            request.done.set()

    def abandon(self) -> None:
        """Hand the batch on the model back to its callers with ``BatcherClosed`` too. The
        model call itself cannot be interrupted: its results, when they come, are dropped."""
        with self._cond:
            self.abandoned = bool(self._running)
            for request in self._running:
                request.error = BatcherClosed()
                request.done.set()

    def _next_batch(self) -> list[_Request[Key]]:
        """The next batch to run, or an empty list once closed."""
        with self._cond:
            while not self._pending and not self._closed:
                self._cond.wait()
            if self._closed:
                return []
            # The most urgent request decides the key; it waits at most max_wait_s for company.
            first = min(self._pending)
            limit = max(1, self.max_batch(first.key))
            deadline = first.enqueued + self.max_wait_s
            while (left := deadline - time.monotonic()) > 0 and self._count(first.key) < limit and not self._closed:
                self._cond.wait(left)
            if self._closed:
                return []
            batch = sorted(r for r in self._pending if r.key == first.key)[:limit]
            for request in batch:
                self._pending.remove(request)
            self._running = batch
            return batch

    def _count(self, key: Key) -> int:
        return sum(1 for r in self._pending if r.key == key)

    def _loop(self) -> None:
        while batch := self._next_batch():
            started = time.monotonic()
            outcomes = self._run(batch[0].key, [r.item for r in batch])
            with self._cond:
                self._running = []
                for request, outcome in zip(batch, outcomes, strict=True):
                    if request.done.is_set():
                        continue  # abandoned meanwhile
                    if isinstance(outcome, _Failed):
                        request.error = outcome.error
                    else:
                        request.result = outcome
                    request.batch_size = len(batch)
                    request.waited_s = started - request.enqueued
                    request.done.set()

    def _run(self, key: Key, items: list[Any]) -> list[Any]:
        """One result per item, or ``_Failed`` for the items whose call raised."""
        try:
            return list(self.run_batch(key, items))
        except Exception as exc:
            if len(items) == 1:
                logger.exception("model call failed")
                return [_Failed(exc)]
            # Halve and retry: a batch that did not fit in memory fits in halves, and one
            # poisonous job takes down only itself, not the jobs that shared its batch.
            logger.warning("batch of %d failed (%s); retrying in halves", len(items), type(exc).__name__)
            if isinstance(exc, torch.OutOfMemoryError) and torch.cuda.is_available():
                torch.cuda.empty_cache()
            half = len(items) // 2
            return self._run(key, items[:half]) + self._run(key, items[half:])


@dataclass(frozen=True)
class _Failed:
    error: Exception
