"""One handler per job kind (``generate``, ``refine``, ``pair``), named by the kind's
declaration in ``shared/contract.py``; ``worker/lifecycle.py`` runs any of them."""

from __future__ import annotations

import importlib
from typing import Any

from shared.contract import KINDS, JobKind
from shared.errors import InvalidInput
from shared.objects import ObjectStore
from shared.settings import Settings
from worker.handlers.base import BatchKey, JobHandler
from worker.registry import ModelRegistry


def handler_class(kind: JobKind) -> type[JobHandler[Any]]:
    """Import the handler a kind's declaration names ("module:Class")."""
    module, _, name = kind.handler.partition(":")
    handler = getattr(importlib.import_module(module), name)
    if not (isinstance(handler, type) and issubclass(handler, JobHandler)):
        raise TypeError(f"{kind.name}'s handler {kind.handler} is not a JobHandler")
    return handler


class Handlers:
    """The handlers of the kinds one worker serves, and ``run_batch`` for its batcher."""

    def __init__(self, kinds: list[str], models: ModelRegistry, storage: ObjectStore, settings: Settings) -> None:
        self.by_kind: dict[str, JobHandler[Any]] = {
            kind: handler_class(KINDS[kind])(models, storage, settings) for kind in kinds
        }
        self._by_key = {handler.Key: handler for handler in self.by_kind.values()}
        self.pipelines = {name for handler in self.by_kind.values() for name in handler.pipelines}

    def serving(self, kind: str) -> JobHandler[Any]:
        """The handler for ``kind``; a job sent to a queue that does not serve its kind fails."""
        if kind not in self.by_kind:
            raise InvalidInput(f"this worker does not run {kind} jobs", field="kind")
        return self.by_kind[kind]

    def run_batch(self, key: BatchKey, items: list[Any]) -> list[Any]:
        return self._by_key[type(key)].run_batch(key, items)
