"""Job records in Redis: one JSON document per job, changed only inside transactions.

Producers create records, workers move them through ``queued -> running -> terminal``,
and every change is published on the job's channel so ``wait`` needs no busy polling.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from typing import cast

import redis

from shared import keys
from shared.broker import Push, queue_lists
from shared.contract import JobRecord, JobState, utcnow
from shared.errors import BrokerUnavailable, JobNotFound, QueueFull
from shared.redis_client import connect, min_replicas_ack
from shared.settings import Settings

# RecordStore.create. KEYS: the record, the queued index, the message's list ('' for none),
# then the lists whose depth counts. ARGV: job id, record, TTL, time, message, depth limit
# (0: none), idempotency key ('' for none).
_CREATE = """
local idem = ARGV[7]
if idem ~= '' then
  local first = redis.call('GET', idem)
  if first then return {'dup', first} end
end
local limit = tonumber(ARGV[6])
if limit > 0 then
  local depth = 0
  for i = 4, #KEYS do depth = depth + redis.call('LLEN', KEYS[i]) end
  if depth >= limit then return {'full', tostring(depth)} end
end
if idem ~= '' then redis.call('SET', idem, ARGV[1], 'EX', ARGV[3]) end
-- The record before the message, as everywhere: a worker always finds what it is sent.
redis.call('SET', KEYS[1], ARGV[2], 'EX', ARGV[3])
redis.call('ZADD', KEYS[2], ARGV[4], ARGV[1])
if KEYS[3] ~= '' then redis.call('LPUSH', KEYS[3], ARGV[5]) end
return {'new', ARGV[1]}
"""

# As raw JSON spells them, for records that do not parse.
TERMINAL_STATES = {state.value for state in JobState if state.terminal}

# A mutation returns the new record, or None to leave the stored one as it is.
Mutation = Callable[[JobRecord], JobRecord | None]
# A change's message to push in its transaction (a callback for the state it enters), if any.
Notify = Callable[[JobRecord], Push | None]
# What an edit writes: the record's new JSON, the state it had, the state it gets, a message.
Change = tuple[str, str, str, Push | None]


def _send(pipe: redis.client.Pipeline, push: Push) -> None:
    """Queue ``push`` in ``pipe``; a callback is also marked pending until it is settled."""
    pipe.lpush(push.list, push.message)
    if push.callback:
        pipe.zadd(keys.CALLBACKS_PENDING, {push.callback: time.time()})


def _reply(value: bytes | str | None) -> bytes | None:
    # redis-py types replies as bytes | str to cover decode_responses; every client here
    # (from_settings, and the tests') is built without it, so they are bytes.
    return cast("bytes | None", value)


def _text(value: bytes | str) -> str:
    return cast(bytes, value).decode()


class RecordStore:
    def __init__(self, client: redis.Redis, ttl_s: int, replicas: int = 0, wait_ms: int = 500) -> None:
        self.redis = client
        self.ttl_s = ttl_s
        # Redis replicates asynchronously: a write the primary acknowledged is lost if the
        # primary dies before a replica has it. Submit waits for `replicas` of them (and
        # fails if they do not answer in wait_ms); every record change waits too, but
        # carries on without them, so a missing replica slows workers and never stops them.
        self.replicas = replicas
        self.wait_ms = wait_ms
        self._create = client.register_script(_CREATE)

    @classmethod
    def from_settings(cls, settings: Settings) -> RecordStore:
        return cls(connect(settings), settings.job_ttl_s, min_replicas_ack(settings), settings.redis_wait_ms)

    def replicate(self, job_id: str, state: str, *, required: bool = False) -> None:
        """Wait until the replicas hold every write made so far, by any client.

        WAIT counts only its own connection's writes, so it follows one here: the job's
        state, published again on its channel (a replicated write, and harmless to
        ``wait``). The replication stream is ordered, so that covers all earlier writes,
        the broker's message included. ``required``: raise ``BrokerUnavailable`` when too
        few replicas answer in time."""
        if not self.replicas:
            return
        with self.redis.pipeline(transaction=False) as pipe:
            pipe.publish(keys.job_events_channel(job_id), state)
            pipe.execute_command("WAIT", self.replicas, self.wait_ms)
            # An error in its place: WAIT refused (a node demoted meanwhile, or a service
            # that does not offer it) confirms nothing.
            _, acked = pipe.execute(raise_on_error=False)
        if isinstance(acked, redis.ResponseError):
            acked = 0
        if required and acked < self.replicas:
            raise BrokerUnavailable(
                f"job {job_id} reached {acked} of {self.replicas} replica(s) in {self.wait_ms} ms; it may "
                "still run: retry with the same idempotency_key",
                field="redis",
            )

    def create(
        self, record: JobRecord, idempotency_key: str | None = None, push: Push | None = None, max_depth: int = 0
    ) -> tuple[str, bool]:
        """Store a new record and its broker message (``push``); with an idempotency key,
        find the first job made with it; with ``max_depth``, refuse (``QueueFull``) a job
        whose queue holds that many messages, all priorities together.

        Returns ``(job_id, created)``: the first job's id when the key was used before (its
        record may be in the bucket by now: ``shared.archive``). The checks and every write
        are one script, so two producers racing with the same key get the same job, and a
        job found by its key always has its message: a resubmit sends no second one, which
        would count twice in the queue's depth (``queue_full``, autoscaling).
        """
        depth_of = queue_lists(push.queue) if push and max_depth else []
        outcome, value = self._create(
            keys=[keys.job_key(record.job_id), keys.QUEUED, push.list if push else "", *depth_of],
            args=[
                record.job_id,
                record.model_dump_json(),
                self.ttl_s,
                time.time(),
                push.message if push else "",
                max_depth,
                keys.idempotency_key(idempotency_key) if idempotency_key else "",
            ],
        )
        if outcome == b"full":
            assert push is not None
            raise QueueFull(
                f"queue {push.queue!r} holds {_text(value)} jobs (limit {max_depth}); retry later", field="queue"
            )
        return _text(value), outcome == b"new"

    def find_idempotent(self, idempotency_key: str) -> str | None:
        """The job id first submitted with this key, if any."""
        job_id = self.redis.get(keys.idempotency_key(idempotency_key))
        return _text(job_id) if job_id else None

    def get(self, job_id: str) -> JobRecord:
        raw = self.redis.get(keys.job_key(job_id))
        if raw is None:
            raise JobNotFound(f"no job {job_id!r} (unknown or expired)", field="job_id")
        return JobRecord.model_validate_json(raw)

    def linger(self, job_id: str, seconds: float) -> None:
        """Drop a finished record from Redis after ``seconds`` (``shared.archive`` holds it then)."""
        self.redis.expire(keys.job_key(job_id), max(1, round(seconds)))

    def update(self, job_id: str, mutate: Mutation, notify: Notify | None = None) -> JobRecord:
        """Apply ``mutate`` atomically (optimistic WATCH/MULTI); returns the stored record.
        ``notify(new)``: a message to push in the same transaction when the record changes
        (the callback of the state it enters), so no crash can separate the two."""
        stored: JobRecord | None = None

        def edit(raw: bytes | None) -> Change | None:
            nonlocal stored
            if raw is None:
                raise JobNotFound(f"no job {job_id!r} (unknown or expired)", field="job_id")
            stored = JobRecord.model_validate_json(raw)
            new = mutate(stored.model_copy(deep=True))
            if new is None:
                return None
            was = stored.state.value
            stored = new
            return new.model_dump_json(), was, new.state.value, notify(new) if notify else None

        self._edit(job_id, edit)
        # _edit returns only after edit ran and set it (a missing record raises instead).
        assert stored is not None
        return stored

    def fail_unreadable(self, job_id: str, message: str) -> None:
        """Fail a record that breaks the contract (written by a foreign producer, say), so
        it does not stay queued forever; edited as raw JSON, since it does not parse."""

        def edit(raw: bytes | None) -> Change | None:
            document = json.loads(raw) if raw else None
            if not isinstance(document, dict) or document.get("state") in TERMINAL_STATES:
                return None
            was = str(document.get("state"))
            error = {"code": "invalid_input", "message": message, "field": None}
            document.update(state="failed", finished_at=utcnow().isoformat(), error=error)
            return json.dumps(document), was, "failed", None

        self._edit(job_id, edit)

    def _edit(self, job_id: str, edit: Callable[[bytes | None], Change | None]) -> None:
        """The optimistic transaction both edits share: ``edit(raw)`` returns the new JSON,
        the state it had, the state to publish and a message to push, or None to leave the
        record as it is; it runs again whenever another client wrote the record in between."""
        key = keys.job_key(job_id)
        with self.redis.pipeline() as pipe:
            while True:
                try:
                    pipe.watch(key)
                    change = edit(_reply(pipe.get(key)))
                    if change is None:
                        pipe.reset()
                        return
                    raw, was, state, push = change
                    pipe.multi()
                    pipe.set(key, raw, keepttl=True)
                    if state == JobState.queued.value:
                        pipe.zadd(keys.QUEUED, {job_id: time.time()})
                    elif was == JobState.queued.value:
                        pipe.zrem(keys.QUEUED, job_id)
                    pipe.publish(keys.job_events_channel(job_id), state)
                    if push:
                        _send(pipe, push)
                    pipe.execute()
                    break
                except redis.WatchError:
                    continue
        self.replicate(job_id, state)

    def queued_before(self, moment: float) -> list[str]:
        """Ids of the jobs queued (or requeued) before ``moment`` (``time.time()``) and not
        claimed since; expired ones too, until ``forget_queued``."""
        return [_text(job_id) for job_id in cast(list[bytes], self.redis.zrangebyscore(keys.QUEUED, "-inf", moment))]

    def forget_queued(self, job_id: str) -> None:
        self.redis.zrem(keys.QUEUED, job_id)

    def push(self, push: Push) -> None:
        """Send a message outside a record's transaction (sent again by a sweep, say); a
        callback's is marked pending as ``update`` marks it."""
        with self.redis.pipeline() as pipe:
            _send(pipe, push)
            pipe.execute()

    def callbacks_sent_before(self, moment: float) -> list[str]:
        """Task ids (``keys.callback_task_id``) of the callbacks last sent before ``moment``
        and not settled since."""
        pending = self.redis.zrangebyscore(keys.CALLBACKS_PENDING, "-inf", moment)
        return [_text(task_id) for task_id in cast(list[bytes], pending)]

    def callback_pending(self, task_id: str) -> bool:
        """Whether a callback was sent and not settled since: its message is one to deliver."""
        return self.redis.zscore(keys.CALLBACKS_PENDING, task_id) is not None

    def callback_settled(self, task_id: str) -> None:
        """A callback was delivered or given up on: no sweep sends it again, and a message of
        it that comes back sends nothing (``callback_pending``). Waits for the replicas, as the
        transaction that sent it did: the message is acknowledged next, and a failover in
        between must not bring the callback back to pending with its message restored."""
        with self.redis.pipeline(transaction=False) as pipe:
            pipe.zrem(keys.CALLBACKS_PENDING, task_id)
            if self.replicas:
                pipe.execute_command("WAIT", self.replicas, self.wait_ms)
            removed, *_ = pipe.execute(raise_on_error=False)  # a WAIT refused confirms nothing, as in replicate
        if isinstance(removed, Exception):
            raise removed

    def cancel(self, job_id: str, notify: Notify | None = None) -> tuple[JobRecord, bool]:
        """Cancel a job that has not finished; returns the record and whether this call
        cancelled it. ``notify``: as ``update``'s."""
        cancelled = False

        def mutate(record: JobRecord) -> JobRecord | None:
            nonlocal cancelled
            if record.state.terminal:
                return None
            record.state = JobState.cancelled
            record.finished_at = utcnow()
            cancelled = True
            return record

        return self.update(job_id, mutate, notify), cancelled

    def wait(self, job_id: str, timeout_s: float | None = None) -> JobRecord:
        """Block until the job is terminal; raises TimeoutError with the last record seen.

        The record is read after subscribing, so a change between the two is not missed,
        and then again only when the job's channel names a terminal state, or after a quiet
        second (a message lost with a broken connection)."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        pubsub = self.redis.pubsub()
        pubsub.subscribe(keys.job_events_channel(job_id))
        try:
            while True:
                record = self.get(job_id)
                if record.state.terminal:
                    return record
                while True:
                    left = 1.0 if deadline is None else deadline - time.monotonic()
                    if left <= 0:
                        raise TimeoutError(f"job {job_id} still {record.state.value} after {timeout_s} s")
                    message = pubsub.get_message(timeout=min(left, 1.0))
                    if message is None or (message["type"] == "message" and _text(message["data"]) in TERMINAL_STATES):
                        break
        finally:
            pubsub.close()

    def dead_letter(self, job_id: str) -> None:
        with self.redis.pipeline() as pipe:
            # Separate calls: redis-py types a pipeline's commands as the client's (an int here),
            # not as the pipeline they return.
            pipe.lpush(keys.DEAD_LETTER, job_id)
            pipe.ltrim(keys.DEAD_LETTER, 0, keys.DEAD_LETTER_MAX - 1)
            pipe.execute()

    def dead_letters(self, limit: int = 100) -> list[str]:
        """Newest first."""
        return [_text(job_id) for job_id in self.redis.lrange(keys.DEAD_LETTER, 0, limit - 1)]

    def register_worker(self, hostname: str, info: dict[str, object], ttl_s: float) -> None:
        """Announce a worker that is ready to consume (its models are loaded and warm); it
        counts as live until ``ttl_s`` passes without another announcement."""
        self.redis.set(keys.worker_key(hostname), json.dumps(info), px=int(ttl_s * 1000))

    def unregister_worker(self, hostname: str) -> None:
        self.redis.delete(keys.worker_key(hostname))

    def workers(self) -> dict[str, dict[str, object]]:
        found: dict[str, dict[str, object]] = {}
        for key in self.redis.scan_iter(keys.worker_key("*")):
            raw = self.redis.get(key)
            if raw is not None:
                found[key.decode().removeprefix(keys.worker_key(""))] = json.loads(raw)
        return found
