"""One handler per job kind (``generate``, ``refine``, ``pair``); ``worker/lifecycle.py``
runs any of them. Adding a kind: its spec in ``shared/contract.py``, its row in
``shared/routing.py``, and a handler module here listed in ``HANDLERS``."""

from __future__ import annotations

from typing import Any

from shared.contract import JobKind
from shared.errors import InvalidInput
from shared.objects import ObjectStore
from shared.settings import Settings
from worker.handlers.base import BatchKey, JobHandler
from worker.handlers.generate import GenerateJob
from worker.handlers.pair import PairJob
from worker.handlers.refine import RefineJob
from worker.registry import ModelRegistry

HANDLERS: dict[JobKind, type[JobHandler]] = {
    JobKind.generate_and_refine: GenerateJob,
    JobKind.refine_only: RefineJob,
    JobKind.pair: PairJob,
}


class Handlers:
    """The handlers of the kinds one worker serves, and ``run_batch`` for its batcher."""

    def __init__(self, kinds: list[JobKind], models: ModelRegistry, storage: ObjectStore, settings: Settings) -> None:
        self.by_kind: dict[JobKind, JobHandler] = {kind: HANDLERS[kind](models, storage, settings) for kind in kinds}
        self._by_key = {handler.Key: handler for handler in self.by_kind.values()}
        self.pipelines = {name for handler in self.by_kind.values() for name in handler.pipelines}

    def serving(self, kind: JobKind) -> JobHandler:
        """The handler for ``kind``; a job sent to a queue that does not serve its kind fails."""
        if kind not in self.by_kind:
            raise InvalidInput(f"this worker does not run {kind.value} jobs", field="kind")
        return self.by_kind[kind]

    def run_batch(self, key: BatchKey, items: list[Any]) -> list[Any]:
        return self._by_key[type(key)].run_batch(key, items)
