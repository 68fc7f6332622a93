"""Every Redis key and Celery task name the system uses, in one place."""

PREFIX = "refinery"


def job_key(job_id: str) -> str:
    return f"{PREFIX}:job:{job_id}"


def idempotency_key(key: str) -> str:
    return f"{PREFIX}:idem:{key}"


def worker_key(hostname: str) -> str:
    return f"{PREFIX}:worker:{hostname}"


def job_events_channel(job_id: str) -> str:
    return f"{PREFIX}:events:{job_id}"


DEAD_LETTER = f"{PREFIX}:dead-letter"  # ids of jobs that failed for reasons of the system
QUEUED = f"{PREFIX}:queued"  # ids of queued jobs, scored by when they were queued (orphan sweep)
# Callback task ids (callback_task_id) sent and not settled, scored by when last sent (orphan sweep)
CALLBACKS_PENDING = f"{PREFIX}:callbacks:pending"
DEAD_LETTER_MAX = 10_000

TASK_CALLBACK = "refinery.deliver_callback"


def callback_task_id(job_id: str, event: str) -> str:
    """One id for every message of a job's callback for ``event``: a worker holding any of
    them holds "the" callback (held_task_ids), and Flower shows its retries as one task."""
    return f"callback:{job_id}:{event}"


def parse_callback_task_id(task_id: str) -> tuple[str, str]:
    """``(job_id, event)`` of a ``callback_task_id``."""
    _, job_id, event = task_id.split(":")
    return job_id, event


def task_name(kind: str) -> str:
    """A job kind's Celery task (``refinery.generate_and_refine``): the wire contract."""
    return f"{PREFIX}.{kind}"


def refiner_channels_key(name: str) -> str:
    return f"{PREFIX}:refiner:{name}"


def refiner_revision_key(name: str) -> str:
    """The channels' revision alone, which workers read for every job (a few bytes)."""
    return f"{PREFIX}:refiner:{name}:revision"


def refiner_tally_key(name: str, epoch: int) -> str:
    return f"{PREFIX}:refiner:{name}:tally:{epoch}"


# The HTTP gateway's tenants (producer/gateway): API keys, quotas and usage.
API_KEYS = f"{PREFIX}:apikeys"  # ids of every key ever created (revoked ones stay, marked)
TENANTS = f"{PREFIX}:tenants"  # names of every tenant that has had a key


def api_key(key_id: str) -> str:
    return f"{PREFIX}:apikey:{key_id}"


def tenant_rate(tenant: str) -> str:
    """The tenant's token bucket (rate limit)."""
    return f"{PREFIX}:tenant:{tenant}:rate"


def tenant_queued(tenant: str) -> str:
    """The tenant's jobs that may still be queued."""
    return f"{PREFIX}:tenant:{tenant}:queued"


def tenant_open(tenant: str) -> str:
    """The tenant's jobs not yet counted in its usage (not terminal when last looked at)."""
    return f"{PREFIX}:tenant:{tenant}:open"


def tenant_usage(tenant: str) -> str:
    """The tenant's usage of finished jobs: ``jobs:<kind>:<state>``, ``images:...``, ``model_ms:<kind>``."""
    return f"{PREFIX}:tenant:{tenant}:usage"


def tenant_counted(tenant: str, job_id: str) -> str:
    """Present once the job's terminal state is in the tenant's usage: it is never counted twice."""
    return f"{PREFIX}:tenant:{tenant}:counted:{job_id}"
