"""The dynamic batcher on its own: gathering, limits, wait bound, priorities, split on failure."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from worker.batcher import DynamicBatcher


class Recorder:
    """A run_batch that records every batch it was given and doubles each item."""

    def __init__(self, fail_above: int | None = None) -> None:
        self.batches: list[list[int]] = []
        self.fail_above = fail_above
        self.gate: threading.Event | None = None
        self.entered = threading.Event()

    def __call__(self, key, items):
        self.entered.set()
        if self.gate is not None:
            self.gate.wait()
        if self.fail_above is not None and len(items) > self.fail_above:
            raise torch.OutOfMemoryError("injected: batch too large")
        self.batches.append(list(items))
        return [item * 2 for item in items]


def _blocked(recorder: Recorder, max_batch: int) -> tuple[DynamicBatcher, threading.Event]:
    """A batcher whose first batch (a sentinel) holds the model thread until released, so
    everything submitted meanwhile is pending together when the next batch is formed."""
    gate = threading.Event()
    recorder.gate = gate

    def limit(key: str) -> int:
        return 1 if key == "sentinel" else max_batch

    batcher = DynamicBatcher(recorder, max_batch=limit, max_wait_s=0.2)
    threading.Thread(target=batcher.submit, args=("sentinel", -1), daemon=True).start()
    recorder.entered.wait(10)
    return batcher, gate


def _wait_pending(batcher: DynamicBatcher, count: int) -> None:
    while True:
        with batcher._cond:
            if len(batcher._pending) == count:
                return
        time.sleep(0.001)


def _submit_together(recorder: Recorder, max_batch: int, calls: list[tuple]) -> list:
    """Submit ``calls`` (key, item[, priority]) while the model thread is held, so all are
    pending together when the next batch forms; returns their results in call order."""
    batcher, gate = _blocked(recorder, max_batch)
    with ThreadPoolExecutor(len(calls)) as pool:
        futures = [pool.submit(batcher.submit, *call) for call in calls]
        _wait_pending(batcher, len(calls))
        gate.set()
        return [f.result() for f in futures]


def test_compatible_jobs_share_a_batch_and_each_gets_its_own_result():
    recorder = Recorder()
    results = _submit_together(recorder, 4, [("k", i) for i in range(4)])

    assert [r.result for r in results] == [0, 2, 4, 6]
    assert all(r.batch_size == 4 for r in results)
    assert sorted(recorder.batches[1]) == [0, 1, 2, 3]


def test_more_jobs_than_max_batch_are_split():
    recorder = Recorder()
    results = _submit_together(recorder, 3, [("k", i) for i in range(7)])

    assert [len(b) for b in recorder.batches[1:]] == [3, 3, 1]
    assert sorted(r.result for r in results) == [2 * i for i in range(7)]


def test_incompatible_keys_never_share_a_batch():
    recorder = Recorder()
    _submit_together(recorder, 8, [(key, i) for i, key in enumerate(["a", "b", "a", "b"])])

    assert sorted(sorted(b) for b in recorder.batches[1:]) == [[0, 2], [1, 3]]


def test_lone_job_is_not_held_for_company():
    # With a long max_batch and a short wait, a lone job runs alone; it is back before the
    # next job is even submitted, which would be impossible if it waited for a full batch.
    recorder = Recorder()
    batcher = DynamicBatcher(recorder, max_batch=lambda key: 8, max_wait_s=0.05)
    first = batcher.submit("k", 1)
    second = batcher.submit("k", 2)

    assert first.batch_size == 1 and second.batch_size == 1
    assert recorder.batches == [[1], [2]]


def test_higher_priority_runs_first():
    recorder = Recorder()
    _submit_together(recorder, 1, [("k", item, priority) for item, priority in [(1, 6), (2, 3), (3, 0)]])

    assert recorder.batches[1:] == [[3], [2], [1]]


def test_out_of_memory_splits_the_batch_and_every_job_succeeds():
    recorder = Recorder(fail_above=2)
    results = _submit_together(recorder, 8, [("k", i) for i in range(8)])

    assert sorted(r.result for r in results) == [2 * i for i in range(8)]
    assert all(len(b) <= 2 for b in recorder.batches)
    assert sum(len(b) for b in recorder.batches[1:]) == 8


def test_a_poisonous_job_fails_alone_and_its_batch_mates_succeed():
    def run_batch(key, items):
        if 13 in items:
            raise ValueError("poison")
        return [item * 2 for item in items]

    batcher = DynamicBatcher(run_batch, max_batch=lambda key: 4, max_wait_s=0.5)
    with ThreadPoolExecutor(4) as pool:
        futures = [pool.submit(batcher.submit, "k", item) for item in (1, 13, 2, 3)]
        outcomes = [f.exception() or f.result().result for f in futures]

    assert outcomes[0] == 2 and outcomes[2] == 4 and outcomes[3] == 6
    assert isinstance(outcomes[1], ValueError)


def test_a_failing_batch_fails_its_jobs_and_the_batcher_keeps_serving():
    def run_batch(key, items):
        if key == "bad":
            raise ValueError("broken model call")
        return items

    batcher = DynamicBatcher(run_batch, max_batch=lambda key: 4, max_wait_s=0.01)
    with pytest.raises(ValueError, match="broken model call"):
        batcher.submit("bad", 1)
    assert batcher.submit("good", 5).result == 5


def test_single_job_out_of_memory_is_reported():
    batcher = DynamicBatcher(Recorder(fail_above=0), max_batch=lambda key: 4, max_wait_s=0.01)
    with pytest.raises(torch.OutOfMemoryError):
        batcher.submit("k", 1)
