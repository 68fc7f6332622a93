"""Preflight checks of a deployment (`refinery doctor`, and `refinery status` for the
queues, workers and callbacks), each one a row: name, ok/warn/fail, detail.

A worker's heartbeat record (`RecordStore.workers`) says what it serves; whether it is alive
now is asked of the worker itself with Celery's ping, since the record of a worker killed
without a shutdown, or hung, outlives it by up to three heartbeats.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
import time
import uuid
from dataclasses import asdict, dataclass
from datetime import datetime
from typing import Literal

import redis
from botocore.exceptions import BotoCoreError, ClientError

from producer.client import Client
from shared import keys
from shared.broker import queue_depth, queue_lists
from shared.contract import JobRecord, JobState
from shared.errors import StorageUnavailable
from shared.objects import ObjectStore
from shared.redis_client import is_sentinel, min_replicas_ack, sentinel_topology
from shared.routing import default_queues, model_queues
from shared.settings import Settings

Status = Literal["ok", "warn", "fail"]

# Seconds a live worker has to answer a ping: its consumer thread answers even while its
# models are busy, so a miss means stopped or hung.
PING_TIMEOUT_S = 2.0
# Waiting callbacks examined from the oldest end of each list: enough to find the stale ones.
CALLBACK_SCAN = 100
# A queue this full of its REFINERY_MAX_QUEUE_DEPTH is a warning; full is a failure.
QUEUE_WARN_SHARE = 0.8


@dataclass(frozen=True)
class Check:
    name: str
    status: Status
    detail: str


def failed(checks: list[Check]) -> bool:
    return any(check.status == "fail" for check in checks)


def as_json(checks: list[Check]) -> str:
    status = "fail" if failed(checks) else "warn" if any(c.status == "warn" for c in checks) else "ok"
    return json.dumps({"status": status, "checks": [asdict(check) for check in checks]})


def required_queues(settings: Settings) -> list[str]:
    """What a serving deployment needs a worker on: the default queues (the pairs queue is
    only for datasets) and the callbacks queue."""
    return [*default_queues(settings), settings.queue_callbacks]


def run(client: Client, required: list[str]) -> list[Check]:
    """Every check: Redis, S3, then the queues, workers and callbacks (`overview`)."""
    checks = [_storage(client.settings), _retention(client.settings)]
    try:
        client.store.redis.ping()
    except redis.RedisError as exc:
        return [Check("redis", "fail", f"unreachable at {_redis_address(client)}: {exc}"), *checks]
    return [
        Check("redis", "ok", f"reachable at {_redis_address(client)}"),
        *([_sentinel(client.settings)] if is_sentinel(client.settings) else []),
        _persistence(client.store.redis),
        _eviction(client.store.redis),
        _clock_skew(client.store.redis, client.settings.max_clock_skew_s),
        *checks,
        *overview(client, required),
    ]


def overview(client: Client, required: list[str]) -> list[Check]:
    """What `refinery status` shows: live workers, queue depths, dead letters, waiting callbacks."""
    settings = client.settings
    records = client.store.workers()
    alive = live_workers(client, records)
    checks = [_worker(name, info, name in alive) for name, info in sorted(records.items())]
    served = {queue for name in alive for queue in _queues(records[name])}
    for queue in [*model_queues(settings), settings.queue_callbacks]:
        checks.append(_queue(client, queue, queue in served, queue in required))
    dead = client.store.redis.llen(keys.DEAD_LETTER)
    checks.append(
        Check("dead letters", "warn", f"{dead} jobs failed for reasons of the system (refinery dead-letters)")
        if dead
        else Check("dead letters", "ok", "none")
    )
    checks.append(_callbacks(callback_backlog(client, records, alive)))
    return checks


# --- Redis ---------------------------------------------------------------------------------


def _redis_address(client: Client) -> str:
    """REFINERY_REDIS_URL without its password (a Sentinel URL names every sentinel)."""
    return re.sub(r"//[^@/;]*@", "//", client.settings.redis_url)


def _sentinel(settings: Settings) -> Check:
    """The primary must be up with a quorum of Sentinels to fail it over; fewer healthy
    replicas than submit waits for means every submit fails with broker_unavailable."""
    try:
        topology = sentinel_topology(settings)
    except redis.RedisError as exc:
        return Check("redis sentinel", "fail", str(exc))
    healthy = [r["address"] for r in topology["replicas"] if r["ok"]]
    detail = (
        f"{topology['master_name']}: primary {topology['primary']}, replicas {healthy or 'none'}, "
        f"{topology['sentinels']} sentinels, quorum {topology['quorum']} ({topology['quorum_note']})"
    )
    if not topology["primary_ok"] or not topology["quorum_ok"]:
        return Check("redis sentinel", "fail", detail)
    if len(healthy) < min_replicas_ack(settings):
        return Check("redis sentinel", "warn", f"{detail}; submits wait for {min_replicas_ack(settings)} replica(s)")
    return Check("redis sentinel", "ok", detail)


def _config(client: redis.Redis, name: str) -> str:
    value = next(iter(client.config_get(name).values()), b"")
    return value.decode() if isinstance(value, bytes) else str(value)


def _persistence(client: redis.Redis) -> Check:
    try:
        aof, save = _config(client, "appendonly"), _config(client, "save")
    except redis.ResponseError as exc:
        # Managed Redis (ElastiCache, Memorystore, ...) often refuses CONFIG: ask its console.
        return Check("redis persistence", "warn", f"CONFIG GET refused ({exc}); check AOF/RDB with your provider")
    if aof == "yes":
        return Check("redis persistence", "ok", "AOF on")
    if save.strip():
        return Check("redis persistence", "ok", f"RDB snapshots (save {save}); writes since the last one can be lost")
    return Check("redis persistence", "fail", "AOF and RDB both off: a restart loses every queued job and job record")


def _eviction(client: redis.Redis) -> Check:
    try:
        policy, limit = _config(client, "maxmemory-policy"), _config(client, "maxmemory")
    except redis.ResponseError as exc:
        return Check("redis eviction", "warn", f"CONFIG GET refused ({exc}); maxmemory-policy must be noeviction")
    if policy == "noeviction":
        return Check("redis eviction", "ok", "noeviction: a full Redis refuses writes, so submit fails loudly")
    return Check(
        "redis eviction",
        "fail",
        f"maxmemory-policy {policy} (maxmemory {limit}): under memory pressure Redis deletes keys, queued "
        "job messages and job records among them, and those jobs are lost without an error; set noeviction",
    )


def _clock_skew(client: redis.Redis, limit_s: float) -> Check:
    before = time.time()
    seconds, micros = client.time()
    after = time.time()
    # Redis read its clock somewhere in the round trip; its middle is the best guess.
    skew = seconds + micros / 1e6 - (before + after) / 2
    detail = f"{skew:+.3f} s against Redis (round trip {1000 * (after - before):.1f} ms, limit {limit_s:g} s)"
    if abs(skew) > limit_s:
        return Check("clock skew", "fail", detail + ": leases, deadlines and queue waits compare clocks")
    return Check("clock skew", "ok", detail)


# --- S3 -----------------------------------------------------------------------------------


def _storage(settings: Settings) -> Check:
    # One attempt per call: a probe reports what it sees; a readiness probe's caller retries.
    storage = ObjectStore(settings.model_copy(update={"s3_max_attempts": 1}))
    key = f"{settings.s3_prefix}/doctor/{uuid.uuid4().hex}"
    where = f"s3://{settings.s3_bucket}/{key}"
    body = b"refinery doctor probe"
    step = "write"
    try:
        storage.client.put_object(Bucket=settings.s3_bucket, Key=key, Body=body)
        step = "read"
        if storage.client.get_object(Bucket=settings.s3_bucket, Key=key)["Body"].read() != body:
            return Check("s3 bucket", "fail", f"{where}: read back other bytes than were written")
        step = "delete"
        storage.client.delete_object(Bucket=settings.s3_bucket, Key=key)
    except (BotoCoreError, ClientError) as exc:
        return Check("s3 bucket", "fail", f"{where}: {step} failed: {exc}")
    return Check("s3 bucket", "ok", f"{where}: written, read back and deleted")


def _retention(settings: Settings) -> Check:
    storage = ObjectStore(settings.model_copy(update={"s3_max_attempts": 1}))
    wanted = storage.retention_rule()
    where = f"s3://{settings.s3_bucket}/{wanted['Filter']['Prefix']}"
    try:
        found = storage.retention_in_place()
    except StorageUnavailable as exc:
        return Check("s3 retention", "warn", f"{where}: the lifecycle rules could not be read ({exc.message})")
    if found == wanted:
        return Check("s3 retention", "ok", f"{where}: objects expire after {settings.retention_days} days")
    what = "no retention rule" if found is None else f"a rule other than the settings' ({found.get('Expiration')})"
    return Check(
        "s3 retention", "warn", f"{where}: {what}, so results are kept for ever: run `refinery retention --apply`"
    )


# --- Workers and queues -------------------------------------------------------------------


def live_workers(client: Client, records: dict[str, dict[str, object]]) -> set[str]:
    """The workers among ``records`` that answer a ping now."""
    if not records:
        return set()
    replies = client.celery.control.ping(destination=list(records), timeout=PING_TIMEOUT_S)
    return {name for reply in replies for name in reply} & set(records)


def _queues(info: dict[str, object]) -> list[str]:
    queues = info.get("queues")
    return [str(queue) for queue in queues] if isinstance(queues, list) else []


def _worker(name: str, info: dict[str, object], alive: bool) -> Check:
    check = f"worker {name}"
    serves = ",".join(_queues(info)) or "-"
    if not alive:
        return Check(check, "warn", f"{serves}: no answer to ping (stopped without deregistering, or hung)")
    if info.get("role") == "callbacks" or "preset" not in info:
        return Check(check, "ok", f"{serves}: delivers callbacks")
    facts = f"{serves}: preset {info['preset']}, refiner {info.get('refiner')}, device {info.get('device')}"
    refused = info.get("refiner_failures")
    if isinstance(refused, dict) and refused:
        # A version the channels name that this worker will not serve (altered bytes, a load error).
        why = "; ".join(f"{ref}: {reason}" for ref, reason in refused.items())
        return Check(check, "fail", f"{facts}; refuses to serve {why}")
    weights = info.get("weights")
    if not isinstance(weights, dict):
        return Check(check, "ok", f"{facts}; weights cache not reported by this worker")
    missing = [preset for preset, where in weights.items() if not where]
    if missing:
        return Check(
            check, "warn", f"{facts}; weights of {', '.join(missing)} not in a local cache: a restart downloads them"
        )
    return Check(check, "ok", f"{facts}; weights cached at {', '.join(map(str, weights.values()))}")


def _queue(client: Client, queue: str, served: bool, required: bool) -> Check:
    depth = queue_depth(client.store.redis, queue)
    limit = client.settings.max_queue_depth
    detail = f"{depth} waiting" + (f" (limit {limit})" if limit else "")
    if not served:
        if required or depth:
            return Check(f"queue {queue}", "fail", f"{detail}; no live worker consumes it")
        return Check(f"queue {queue}", "ok", f"{detail}; no worker, none required")
    if limit and depth >= limit:
        return Check(f"queue {queue}", "fail", f"{detail}: full, submit refuses with queue_full")
    if limit and depth >= QUEUE_WARN_SHARE * limit:
        return Check(f"queue {queue}", "warn", f"{detail}: nearly full")
    return Check(f"queue {queue}", "ok", detail)


# --- Callbacks ----------------------------------------------------------------------------


@dataclass(frozen=True)
class WaitingCallback:
    job_id: str
    event: str
    waited_s: float


@dataclass(frozen=True)
class CallbackBacklog:
    """The callbacks queue as a consumer would find it: how many wait, the oldest of them
    (``CALLBACK_SCAN`` per list at most), and the live workers that consume it."""

    waiting: int
    oldest: list[WaitingCallback]
    consumers: list[str]
    alarm_s: float

    @property
    def stale(self) -> list[WaitingCallback]:
        """Terminal callbacks that have waited longer than ``REFINERY_CALLBACK_WAIT_ALARM_S``."""
        terminal = {state.value for state in JobState if state.terminal}
        return [c for c in self.oldest if c.event in terminal and c.waited_s > self.alarm_s]

    @property
    def alarm(self) -> bool:
        return bool(self.stale) and not self.consumers


def consumers(queue: str, records: dict[str, dict[str, object]], alive: set[str]) -> list[str]:
    """The live workers among ``records`` that consume ``queue``."""
    return sorted(name for name in alive if queue in _queues(records[name]))


def callback_backlog(
    client: Client, records: dict[str, dict[str, object]] | None = None, alive: set[str] | None = None
) -> CallbackBacklog:
    """The one computation of waiting callbacks, for `refinery doctor` and `refinery status`."""
    if records is None:
        records = client.store.workers()
    if alive is None:
        alive = live_workers(client, records)
    queue = client.settings.queue_callbacks
    oldest: list[WaitingCallback] = []
    for name in queue_lists(queue):
        # Kombu pushes on the left and pops on the right: the right end waited longest.
        for raw in client.store.redis.lrange(name, -CALLBACK_SCAN, -1):
            waiting = _waiting_callback(client, raw)
            if waiting is not None:
                oldest.append(waiting)
    oldest.sort(key=lambda c: -c.waited_s)
    return CallbackBacklog(
        waiting=queue_depth(client.store.redis, queue),
        oldest=oldest,
        consumers=consumers(client.settings.queue_callbacks, records, alive),
        alarm_s=client.settings.callback_wait_alarm_s,
    )


def _waiting_callback(client: Client, raw: bytes | str) -> WaitingCallback | None:
    """A callback message's job and event (the task's args), and how long ago that event
    happened; None for anything else, or a job whose record has expired."""
    try:
        message = json.loads(raw)
        if message["headers"]["task"] != keys.TASK_CALLBACK:
            return None
        job_id, event = json.loads(base64.b64decode(message["body"]))[0]
        raw_record = client.store.redis.get(keys.job_key(job_id))
        # None: the record has expired; a foreign one that does not parse: ValueError.
        record = JobRecord.model_validate_json(raw_record) if raw_record is not None else None
    except (ValueError, KeyError, TypeError, binascii.Error):
        return None
    since = event_time(record, event) if record is not None else None
    return WaitingCallback(job_id, event, time.time() - since.timestamp()) if since else None


def event_time(record: JobRecord, event: str) -> datetime | None:
    """When the job entered the state its callback reports."""
    return record.started_at if event == JobState.running.value else record.finished_at


def _callbacks(backlog: CallbackBacklog) -> Check:
    consumers = ", ".join(backlog.consumers) or "no live callbacks worker"
    detail = f"{backlog.waiting} waiting; {consumers}"
    if backlog.stale:
        oldest = backlog.stale[0]
        detail += (
            f"; terminal ones waiting over {backlog.alarm_s:g} s: {len(backlog.stale)} "
            f"(oldest: job {oldest.job_id}, {oldest.event}, {oldest.waited_s:.0f} s)"
        )
        if backlog.alarm:
            return Check("callbacks", "fail", detail + ": start `refinery worker --queues callbacks`")
        return Check("callbacks", "warn", detail + ": the callbacks workers are behind")
    return Check("callbacks", "ok", detail)


def job_callback_warning(client: Client, record: JobRecord) -> str | None:
    """For `refinery status JOB`: a line when this job's callback is among the stale ones
    and no callbacks worker is alive to deliver it."""
    if not record.state.terminal or not record.spec.callback_url or (record.callback and record.callback.delivered):
        return None
    backlog = callback_backlog(client)
    mine = [c for c in backlog.stale if c.job_id == record.job_id]
    if not mine or not backlog.alarm:
        return None
    return (
        f"callback {mine[0].event} waiting {mine[0].waited_s:.0f} s: no live callbacks worker "
        "(start `refinery worker --queues callbacks`)"
    )
