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
DEAD_LETTER_MAX = 10_000

TASK_GENERATE = "refinery.generate_and_refine"
TASK_REFINE = "refinery.refine_only"
TASK_PAIR = "refinery.pair"
TASK_CALLBACK = "refinery.deliver_callback"
