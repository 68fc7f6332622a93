"""Fairness between tenants, on the broker's priority lists.

Celery's Redis transport keeps one list per priority step (``shared.broker.PRIORITY_STEPS``:
0, 3, 6, 9) and a worker always takes from the lowest non-empty one. A job's explicit
priority picks its step (high 0, normal 3, low 6: ``Priority.rank``). The gateway adds one
step, ``DEMOTION``, to the jobs of a tenant that already has
``REFINERY_GATEWAY_FAIR_SHARE`` or more jobs queued (counted by the quota script, with
the tenant's own earlier jobs of the same batch): a burst's first jobs keep their place,
the rest wait behind every other tenant's jobs of the same explicit priority, so a tenant
with a few jobs is not held behind another's thousands. Explicit priority keeps its
meaning: within a tenant it orders as ever, and across tenants a bursting tenant's high
jobs still run before a quiet tenant's normal ones' equals (step 3, first come first
served) and its normal ones beside a quiet tenant's low ones; its low ones go to step 9.

Only the broker message's priority changes: the record keeps the priority the tenant asked
for. The producer sends each job through its Celery app (``shared.routing.send_job``), so
the gateway's client hands it an app that adds the demotion the submitting thread set.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from functools import cached_property
from typing import Any

from celery import Celery

from producer.client import Client
from shared.broker import PRIORITY_STEPS, make_celery

# One step of PRIORITY_STEPS.
DEMOTION = PRIORITY_STEPS[1] - PRIORITY_STEPS[0]

_demotion: ContextVar[int] = ContextVar("refinery_gateway_demotion", default=0)


def demoted(queued: int, threshold: int) -> bool:
    """Whether a job goes one step lower: its tenant already had ``queued`` jobs waiting
    when it was admitted (0: fairness off)."""
    return threshold > 0 and queued >= threshold


def broker_rank(rank: int, demote: bool) -> int:
    """The broker priority a job of explicit ``rank`` is sent with."""
    return min(rank + DEMOTION, PRIORITY_STEPS[-1]) if demote else rank


@contextmanager
def demotion(demote: bool) -> Iterator[None]:
    """Jobs sent by this thread in the block go one step lower when ``demote``."""
    token = _demotion.set(DEMOTION if demote else 0)
    try:
        yield
    finally:
        _demotion.reset(token)


class FairCelery:
    """A Celery app whose job messages (those sent with a priority) take the demotion set by
    ``demotion``; everything else passes through."""

    def __init__(self, app: Celery) -> None:
        self.app = app

    def send_task(self, name: str, *args: Any, priority: int | None = None, **kwargs: Any) -> Any:
        if priority is not None:
            priority = broker_rank(priority, _demotion.get() > 0)
        return self.app.send_task(name, *args, priority=priority, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.app, name)


class FairClient(Client):
    """The producer client, sending through ``FairCelery``."""

    @cached_property
    def celery(self) -> FairCelery:
        return FairCelery(make_celery(self.settings))
