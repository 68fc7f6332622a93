"""Per-tenant rate limit and cap on queued jobs, enforced across every gateway replica.

Redis holds the counters and one Lua script checks and takes both at once, so two replicas
admitting the same tenant's jobs at the same moment cannot both squeeze under a limit.

- Rate: a token bucket of ``rate`` jobs per second holding at most one second's worth
  (and at least one job). A submit is admitted while the bucket holds a whole token and
  then takes one per job, into debt if it must: a batch larger than the burst goes through
  once, and the tenant's next submit waits until the debt is paid off at its rate.
- Queued cap: the tenant's job ids (a sorted set) that are still in the job store's own
  index of queued jobs (``keys.QUEUED``, kept in the records' transactions): ZINTERCARD
  counts them in Redis's C code, whatever the set's size. Each admission of n jobs looks
  at 2n of the tenant's ids in turn and forgets those that left the queue, so the set
  stays near what is really queued. Admission also holds a
  reservation per job, so the cap holds while the jobs are being written;
  ``Reservation.settle`` swaps them for the job ids, and the reservations of a gateway
  that died mid-submit lapse after ``RESERVATION_S``.
"""

from __future__ import annotations

import math
import time
import uuid
from dataclasses import dataclass
from typing import cast

import redis

from producer.gateway.auth import ApiKey
from producer.gateway.problems import QueuedCapReached, RateLimited
from shared import keys

# Longer than any submit takes (a batch of the largest size included).
RESERVATION_S = 60

_ADMIT = """
local now_parts = redis.call('TIME')
local now = tonumber(now_parts[1]) + tonumber(now_parts[2]) / 1000000
local n, rate, cap = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local reservation, lapse = ARGV[4], tonumber(ARGV[5])

redis.call('ZREMRANGEBYSCORE', KEYS[3], '-inf', now - lapse)
-- Look at twice as many ids as are added: forget those gone from the queue, send those
-- still there to the back, so the look goes round the whole set.
for _, job_id in ipairs(redis.call('ZRANGE', KEYS[2], 0, 2 * n - 1)) do
  if redis.call('ZSCORE', KEYS[4], job_id) then
    redis.call('ZADD', KEYS[2], now, job_id)
  else
    redis.call('ZREM', KEYS[2], job_id)
  end
end
local queued = redis.call('ZINTERCARD', 2, KEYS[2], KEYS[4], 'LIMIT', cap) + redis.call('ZCARD', KEYS[3])
if queued + n > cap then
  return {'max_queued', tostring(queued)}
end

local burst = math.max(rate, 1)
local bucket = redis.call('HMGET', KEYS[1], 'tokens', 'at')
local tokens = tonumber(bucket[1]) or burst
local at = tonumber(bucket[2]) or now
tokens = math.min(burst, tokens + (now - at) * rate)
if tokens < 1 then
  return {'rate', tostring((1 - tokens) / rate)}
end
tokens = tokens - n
redis.call('HSET', KEYS[1], 'tokens', tostring(tokens), 'at', tostring(now))
-- Once refilled the bucket is as good as absent.
redis.call('EXPIRE', KEYS[1], math.ceil((burst - tokens) / rate) + 1)
for i = 1, n do
  redis.call('ZADD', KEYS[3], now, reservation .. ':' .. i)
end
return {'ok', tostring(queued)}
"""


@dataclass
class Reservation:
    """Room for ``count`` jobs of ``tenant``, held until ``settle``."""

    quotas: Quotas
    tenant: str
    reservation_id: str
    count: int
    # The tenant's jobs queued (or being submitted) before these: producer/gateway/fairness.py.
    queued: int = 0

    def settle(self, job_ids: list[str]) -> None:
        """Swap the reservation for the jobs actually submitted (fewer when some failed)."""
        placeholders = [f"{self.reservation_id}:{i}" for i in range(1, self.count + 1)]
        now = time.time()
        with self.quotas.redis.pipeline() as pipe:
            pipe.zrem(keys.tenant_reserved(self.tenant), *placeholders)
            if job_ids:
                pipe.zadd(keys.tenant_queued(self.tenant), {job_id: now for job_id in job_ids})
                # The usage report picks them up from here (producer/gateway/usage.py).
                pipe.sadd(keys.tenant_open(self.tenant), *job_ids)
            pipe.execute()


class Quotas:
    def __init__(self, client: redis.Redis) -> None:
        self.redis = client
        self._admit = client.register_script(_ADMIT)

    def admit(self, key: ApiKey, count: int) -> Reservation:
        """Room for ``count`` more jobs of the key's tenant, or ``RateLimited`` / ``QueuedCapReached``."""
        reservation_id = uuid.uuid4().hex
        verdict, detail = cast(
            list[bytes],
            self._admit(
                keys=[
                    keys.tenant_rate(key.tenant),
                    keys.tenant_queued(key.tenant),
                    keys.tenant_reserved(key.tenant),
                    keys.QUEUED,
                ],
                args=[count, key.rate, key.max_queued, reservation_id, RESERVATION_S],
            ),
        )
        if verdict == b"rate":
            wait_s = float(detail)
            raise RateLimited(
                f"tenant {key.tenant!r} is over its rate of {key.rate:g} jobs/s; retry in {math.ceil(wait_s)} s",
                retry_after_s=wait_s,
            )
        if verdict == b"max_queued":
            raise QueuedCapReached(
                f"tenant {key.tenant!r} has {int(detail)} queued job(s); {count} more would pass its cap of "
                f"{key.max_queued}",
                field="max_queued",
            )
        return Reservation(self, key.tenant, reservation_id, count, int(detail))
