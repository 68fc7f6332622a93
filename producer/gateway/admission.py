"""Admission: a tenant's jobs checked against its quotas, given their place in the queue and
written, all in one round trip to Redis, however many jobs a request carries.

One Lua script does, for a whole request and atomically (two replicas admitting the same
tenant's jobs at the same moment cannot both squeeze under a limit), what the producer
library does in a few calls per job:

1. Idempotency: a job whose key was used before (or earlier in the same request) is that
   first job; it takes no quota. So is a job whose record exists already (the same request
   replayed by the Redis client's retry).
2. Rate: a token bucket of the key's ``rate`` jobs per second holding one second's worth
   (and at least one job). A request is admitted while the bucket holds a whole token, and
   then takes one per job, into debt if it must: a batch larger than the burst goes through
   once, and the tenant's next request waits until the debt is paid off at its rate.
3. Queued cap: the tenant's job ids (a sorted set) still in the job store's own index of
   queued jobs (``keys.QUEUED``, kept by every state change), counted by ZINTERCARD in
   Redis's C code. Each admission of n jobs looks at 2n of the tenant's ids in turn and
   forgets those that left the queue, so the set stays near what is really queued. A
   request that would pass the cap is refused whole.
4. Queue depth (``REFINERY_MAX_QUEUE_DEPTH``, the producer library's own refusal): a job
   that finds its queue full is refused on its own (``queue_full``); the others go.
5. Fairness: a tenant's jobs beyond its first ``REFINERY_GATEWAY_FAIR_SHARE`` queued ones
   go to the broker one priority step lower than they asked for
   (``producer.gateway.fairness``; docs/gateway.md, "Fairness").
6. Writes, per job: the idempotency key, the record, the queued index, the Celery message on
   its list (``shared.routing.job_message``: what Celery would send), and the tenant's own
   sets (queued, and open for its usage).

With ``write=False`` it answers what it would do (duplicates, quota, depth) and writes
nothing: an upload checks that before it stores the image.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import cast

from kombu.utils.json import dumps

from producer.client import Client
from producer.gateway.auth import ApiKey
from producer.gateway.fairness import broker_rank
from producer.gateway.problems import QueuedCapReached, RateLimited
from shared import keys
from shared.broker import PRIORITY_STEPS, queue_lists
from shared.contract import JobRecord
from shared.errors import QueueFull
from shared.routing import job_message

_ADMIT = """
local clock = redis.call('TIME')
local now = tonumber(clock[1]) + tonumber(clock[2]) / 1000000
local write = ARGV[1] == '1'
local rate, cap, max_depth = tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4])
local share, ttl, job_prefix = tonumber(ARGV[5]), tonumber(ARGV[6]), ARGV[7]
local nsteps = tonumber(ARGV[8])
local steps = {}
for s = 1, nsteps do steps[s] = ARGV[8 + s] end
-- Each queue's lists, one per priority step.
local lists = {}
local at = 10 + nsteps
for _ = 1, tonumber(ARGV[9 + nsteps]) do
  local names = {}
  for s = 1, nsteps do names[s] = ARGV[at + s] end
  lists[ARGV[at]] = names
  at = at + 1 + nsteps
end

-- 1. Duplicates. Jobs come 7 arguments each: id, idempotency key ('' for none), queue,
-- its own priority step and its demoted one (1-based), record, message up to its priority.
local out = {'ok', ''}
local fresh, claimed = {}, {}
for i = at, #ARGV, 7 do
  local id, idem = ARGV[i], ARGV[i + 1]
  local first = false
  if idem ~= '' then first = claimed[idem] or redis.call('GET', idem) end
  if not first and redis.call('EXISTS', job_prefix .. id) == 1 then first = id end
  if first then
    out[#out + 1] = 'dup'
    out[#out + 1] = first
  else
    if idem ~= '' then claimed[idem] = id end
    out[#out + 1] = 'new'
    out[#out + 1] = ''
    fresh[#fresh + 1] = {i, #out}
  end
end
local n = #fresh
if n == 0 then return out end

-- 2, 3. The tenant's quotas, for the new jobs. Look at 2n of its ids: forget those gone
-- from the queue, send those still there to the back, so the look goes round the set.
for _, job_id in ipairs(redis.call('ZRANGE', KEYS[2], 0, 2 * n - 1)) do
  if redis.call('ZSCORE', KEYS[3], job_id) then
    redis.call('ZADD', KEYS[2], now, job_id)
  else
    redis.call('ZREM', KEYS[2], job_id)
  end
end
local queued = redis.call('ZINTERCARD', 2, KEYS[2], KEYS[3], 'LIMIT', cap)
if queued + n > cap then
  return {'max_queued', tostring(queued)}
end
local burst = math.max(rate, 1)
local bucket = redis.call('HMGET', KEYS[1], 'tokens', 'at')
local tokens = tonumber(bucket[1]) or burst
local last = tonumber(bucket[2]) or now
tokens = math.min(burst, tokens + (now - last) * rate)
if tokens < 1 then
  return {'rate', tostring((1 - tokens) / rate)}
end

-- 4, 5, 6. Each new job: its queue's depth, its step, its writes.
local depth = {}
local admitted = 0
for _, job in ipairs(fresh) do
  local i, slot = job[1], job[2]
  local queue = ARGV[i + 2]
  local names = lists[queue]
  if max_depth > 0 and depth[queue] == nil then
    local d = 0
    for s = 1, nsteps do d = d + redis.call('LLEN', names[s]) end
    depth[queue] = d
  end
  if max_depth > 0 and depth[queue] >= max_depth then
    out[slot - 1] = 'queue_full'
    out[slot] = tostring(depth[queue])
  else
    local s = tonumber(ARGV[i + 3])
    if share > 0 and queued + admitted >= share then s = tonumber(ARGV[i + 4]) end
    out[slot] = steps[s]
    if write then
      local id, idem = ARGV[i], ARGV[i + 1]
      if idem ~= '' then redis.call('SET', idem, id, 'EX', ttl) end
      -- The record before the message, as everywhere: a worker always finds what it is sent.
      redis.call('SET', job_prefix .. id, ARGV[i + 5], 'EX', ttl)
      redis.call('ZADD', KEYS[3], now, id)
      redis.call('LPUSH', names[s], ARGV[i + 6] .. steps[s] .. '}}')
      redis.call('ZADD', KEYS[2], now, id)
      redis.call('SADD', KEYS[4], id)
    end
    if depth[queue] then depth[queue] = depth[queue] + 1 end
    admitted = admitted + 1
  end
end
if write and admitted > 0 then
  tokens = tokens - admitted
  redis.call('HSET', KEYS[1], 'tokens', tostring(tokens), 'at', tostring(now))
  -- Once refilled the bucket is as good as absent.
  redis.call('EXPIRE', KEYS[1], math.ceil((burst - tokens) / rate) + 1)
end
return out
"""


@dataclass(frozen=True)
class Admitted:
    """A job the script took (``created``), or the first job made with its idempotency key."""

    job_id: str
    created: bool
    step: int | None = None  # the broker priority step its message went to (created jobs)


class Admission:
    def __init__(self, client: Client) -> None:
        self.client = client
        self.settings = client.settings
        self._admit = client.store.redis.register_script(_ADMIT)

    def admit(self, key: ApiKey, records: Sequence[JobRecord], *, write: bool = True) -> list[Admitted | QueueFull]:
        """Admit ``records`` (checked, not yet written) for the key's tenant, in order: each
        one's outcome, or ``RateLimited`` / ``QueuedCapReached`` for the whole request."""
        settings = self.settings
        queues: dict[str, list[str]] = {}
        job_args: list[str | int] = []
        for record in records:
            queue, message = job_message(self.client.celery, record, settings)
            queues.setdefault(queue, queue_lists(queue))
            text = dumps(message)
            # The envelope ends with its properties, which end here: the script appends the
            # priority of the list it pushes to, and closes both.
            assert text.endswith("}}"), text[-20:]
            idem = record.spec.idempotency_key
            rank = record.spec.priority.rank
            job_args += [
                record.job_id,
                keys.idempotency_key(idem) if idem else "",
                queue,
                PRIORITY_STEPS.index(broker_rank(rank, demote=False)) + 1,
                PRIORITY_STEPS.index(broker_rank(rank, demote=True)) + 1,
                record.model_dump_json(),
                text[:-2] + ', "priority": ',
            ]
        args: list[str | int | float] = [
            int(write),
            key.rate,
            key.max_queued,
            settings.max_queue_depth,
            settings.gateway_fair_share,
            settings.job_ttl_s,
            keys.job_key(""),
            len(PRIORITY_STEPS),
            *PRIORITY_STEPS,
            len(queues),
        ]
        for queue, names in queues.items():
            args += [queue, *names]
        reply = cast(
            list[bytes],
            self._admit(
                keys=[
                    keys.tenant_rate(key.tenant),
                    keys.tenant_queued(key.tenant),
                    keys.QUEUED,
                    keys.tenant_open(key.tenant),
                ],
                args=[*args, *job_args],
            ),
        )
        verdict, detail = reply[0], reply[1].decode()
        if verdict == b"rate":
            wait_s = float(detail)
            raise RateLimited(
                f"tenant {key.tenant!r} is over its rate of {key.rate:g} jobs/s; retry in {math.ceil(wait_s)} s",
                retry_after_s=wait_s,
            )
        if verdict == b"max_queued":
            raise QueuedCapReached(
                f"tenant {key.tenant!r} has {int(detail)} queued job(s); {len(records)} more would pass its cap "
                f"of {key.max_queued}",
                field="max_queued",
            )
        outcomes: list[Admitted | QueueFull] = []
        for record, code, value in zip(records, reply[2::2], reply[3::2], strict=True):
            if code == b"dup":
                outcomes.append(Admitted(value.decode(), created=False))
            elif code == b"queue_full":
                queue = settings.queue(record.kind)
                outcomes.append(
                    QueueFull(
                        f"queue {queue!r} holds {int(value)} jobs (limit {settings.max_queue_depth}); retry later",
                        field="queue",
                    )
                )
            else:
                outcomes.append(Admitted(record.job_id, created=True, step=int(value)))
        created = [o.job_id for o in outcomes if isinstance(o, Admitted) and o.created]
        if write and created:
            # Returns once the replicas hold the writes (when the deployment asks for that),
            # so a failover cannot lose the jobs: one WAIT covers them all.
            self.client.store.replicate(created[0], "queued", required=True)
        return outcomes
