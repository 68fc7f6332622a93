"""Fairness between tenants, on the broker's priority lists.

Celery's Redis transport keeps one list per priority step (``shared.broker.PRIORITY_STEPS``:
0, 3, 6, 9) and a worker always takes from the lowest non-empty one. A job's explicit
priority picks its step (high 0, normal 3, low 6: ``Priority.rank``). The gateway adds one
step, ``DEMOTION``, to the jobs of a tenant that already has ``REFINERY_GATEWAY_FAIR_SHARE``
or more jobs queued (its own earlier jobs of the same request included; 0 turns it off): a
burst's first jobs keep their place, the rest wait behind every other tenant's jobs of the
same explicit priority, so a tenant with a few jobs is not held behind another's thousands.
Explicit priority keeps its meaning: within a tenant it orders as ever, and across tenants
a bursting tenant's high jobs still run beside a quiet tenant's normal ones (step 3, first
come first served) and its normal ones beside a quiet tenant's low ones; its low ones go
to step 9.

Only the broker message's priority changes: the record keeps the priority the tenant asked
for. The admission script (``producer.gateway.admission``) counts the tenant's queued jobs
and picks, for each job, its own step or ``broker_rank(rank, demote=True)``, in the same
round trip that writes it.
"""

from __future__ import annotations

from shared.broker import PRIORITY_STEPS

# One step of PRIORITY_STEPS.
DEMOTION = PRIORITY_STEPS[1] - PRIORITY_STEPS[0]


def broker_rank(rank: int, demote: bool) -> int:
    """The broker priority a job of explicit ``rank`` is sent with."""
    return min(rank + DEMOTION, PRIORITY_STEPS[-1]) if demote else rank
