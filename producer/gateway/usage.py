"""Per-tenant usage: jobs and images by kind and state, and model seconds; what a bill is made of.

Finished jobs are folded into one Redis hash per tenant, once each (a marker that expires
with the record makes a second fold a no-op, whichever replica tries it); jobs not yet
finished are counted from their records as they stand. Folding happens when usage is read
(``GET /v1/usage``, a Prometheus scrape), so it costs nothing on the submit path and only
ever reads the tenant's unfinished jobs.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import cast

import redis
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector
from pydantic import BaseModel, Field

from shared import keys
from shared.contract import JobRecord, JobState

# The stages that hold a model (the others encode, upload or wait): what a GPU bills.
MODEL_STAGES = ("generate", "refine", "student", "teacher")

_FOLD = """
if redis.call('SET', KEYS[3], '1', 'NX', 'EX', ARGV[1]) then
  for i = 3, #ARGV, 2 do
    redis.call('HINCRBYFLOAT', KEYS[2], ARGV[i], ARGV[i + 1])
  end
end
redis.call('SREM', KEYS[1], ARGV[2])
return 1
"""


class Usage(BaseModel):
    tenant: str
    # kind -> state -> count
    jobs: dict[str, dict[str, int]] = Field(default_factory=dict)
    images: dict[str, dict[str, int]] = Field(default_factory=dict)
    # kind -> seconds of model time, finished jobs only
    model_seconds: dict[str, float] = Field(default_factory=dict)


def images_of(record: JobRecord) -> int:
    """The images a job makes: a pair's two, or the refined image plus the raw one if kept."""
    if record.kind == "pair":
        return 2
    return 1 + int(bool(getattr(record.spec, "keep_raw", False)))


def model_ms_of(record: JobRecord) -> float:
    """The job's share of model time: its batch's model stages over the jobs in the batch
    (the record's generate and refine timings are those of the whole batch)."""
    return sum(record.timings_ms.get(stage, 0.0) for stage in MODEL_STAGES) / (record.batch_size or 1)


def _add(table: dict[str, dict[str, int]], kind: str, state: str, n: int) -> None:
    row = table.setdefault(kind, {})
    row[state] = row.get(state, 0) + n


class UsageBook:
    def __init__(self, client: redis.Redis, ttl_s: int) -> None:
        self.redis = client
        self.ttl_s = ttl_s  # the records' own, so a marker outlives its record
        self._fold = client.register_script(_FOLD)

    def tenants(self) -> list[str]:
        return sorted(member.decode() for member in cast(set[bytes], self.redis.smembers(keys.TENANTS)))

    def report(self, tenant: str) -> Usage:
        usage = Usage(tenant=tenant)
        open_ids = sorted(member.decode() for member in cast(set[bytes], self.redis.smembers(keys.tenant_open(tenant))))
        raws = cast(list[bytes | None], self.redis.mget([keys.job_key(i) for i in open_ids])) if open_ids else []
        with self.redis.pipeline(transaction=False) as pipe:
            for job_id, raw in zip(open_ids, raws, strict=True):
                record = JobRecord.model_validate_json(raw) if raw is not None else None
                if record is not None and not record.state.terminal:
                    _add(usage.jobs, record.kind, record.state.value, 1)
                    _add(usage.images, record.kind, record.state.value, images_of(record))
                    continue
                # Finished (or expired unseen, which leaves nothing to count): fold it once.
                fields: list[str | float] = []
                if record is not None:
                    state = record.state.value
                    fields = [f"jobs:{record.kind}:{state}", 1, f"images:{record.kind}:{state}", images_of(record)]
                    if record.state is JobState.succeeded:
                        fields += [f"model_ms:{record.kind}", model_ms_of(record)]
                self._fold(
                    keys=[keys.tenant_open(tenant), keys.tenant_usage(tenant), keys.tenant_counted(tenant, job_id)],
                    args=[self.ttl_s, job_id, *fields],
                    client=pipe,
                )
            pipe.hgetall(keys.tenant_usage(tenant))
            folded = cast(dict[bytes, bytes], pipe.execute()[-1])
        for name, value in folded.items():
            what, kind, *rest = name.decode().split(":")
            if what == "model_ms":
                usage.model_seconds[kind] = round(float(value) / 1000, 6)
            else:
                _add(usage.jobs if what == "jobs" else usage.images, kind, rest[0], int(float(value)))
        return usage


class UsageCollector(Collector):
    """Every tenant's usage at each scrape, read from Redis: the same on every replica."""

    def __init__(self, book: UsageBook) -> None:
        self.book = book

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        jobs = GaugeMetricFamily(
            "refinery_tenant_jobs", "Jobs by tenant, kind and state", labels=["tenant", "kind", "state"]
        )
        images = GaugeMetricFamily(
            "refinery_tenant_images", "Images by tenant, kind and state", labels=["tenant", "kind", "state"]
        )
        seconds = CounterMetricFamily(
            "refinery_tenant_model_seconds",
            "Model seconds of finished jobs by tenant and kind",
            labels=["tenant", "kind"],
        )
        for tenant in self.book.tenants():
            usage = self.book.report(tenant)
            for table, family in ((usage.jobs, jobs), (usage.images, images)):
                for kind, states in table.items():
                    for state, n in states.items():
                        family.add_metric([tenant, kind, state], n)
            for kind, total in usage.model_seconds.items():
                seconds.add_metric([tenant, kind], total)
        yield from (jobs, images, seconds)
