"""Redis memory that finished jobs hold: records kept for their whole ``job_ttl_s`` (as before
``shared/archive.py``) against records that leave Redis ``record_linger_s`` after they end.

    python benchmarks/records_memory.py [--jobs 2000]

A private stack runs the free model (``noop``), 64 px, one worker with default settings.
Half the jobs carry an idempotency key, as producers that retry submit them. Once every job
has ended, Redis's own ``MEMORY USAGE`` of each job's keys gives the bytes a finished job
holds (its record, its idempotency key, if any) and the bytes it still holds once the
record has left (the key alone, kept for ``job_ttl_s``). Then the records are dropped as
their linger does, and ``used_memory`` before and after checks the per-key sum.

From those bytes, at any steady rate of jobs:
  a day of traffic   Redis memory held by one day's jobs right after that day;
  steady state       Redis memory with both designs running for longer than job_ttl_s.
Writes benchmarks/results/records_memory.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from pathlib import Path

import redis
from rich.console import Console

from devstack.stack import LocalStack
from producer.client import Client
from refiner.export import NOOP
from shared import keys
from shared.settings import Settings

RESULTS = Path(__file__).parent / "results" / "records_memory.json"
DAY_S = 24 * 3600
console = Console()


def memory_usage(client: redis.Redis, key: str) -> int:
    return int(client.memory_usage(key, samples=0) or 0)  # type: ignore[arg-type]


def measure(jobs: int, workdir: Path) -> dict:
    with LocalStack(workdir, preset="noop", refiner=NOOP) as stack:
        stack.start_worker("worker")
        client = Client(stack.settings)
        server = client.store.redis
        client.submit_generate("warm", seed=0, width=64, height=64).wait(60)
        before = int(server.info("memory")["used_memory"])
        handles = [
            client.submit_generate(
                "portrait", seed=seed, width=64, height=64, idempotency_key=f"order-{seed}" if seed % 2 else None
            )
            for seed in range(jobs)
        ]
        console.print(f"{jobs} jobs submitted; waiting")
        records = [handle.wait(120) for handle in handles]
        assert all(record.state == "succeeded" for record in records), [r.error for r in records if r.error]
        record_bytes = [memory_usage(server, keys.job_key(r.job_id)) for r in records]
        key_bytes = [
            memory_usage(server, keys.idempotency_key(r.spec.idempotency_key))
            for r in records
            if r.spec.idempotency_key
        ]
        ttls = [server.ttl(keys.job_key(r.job_id)) for r in records]
        with_records = int(server.info("memory")["used_memory"])
        server.delete(*(keys.job_key(r.job_id) for r in records))  # what their linger does
        without_records = int(server.info("memory")["used_memory"])
        archived = sum(
            1
            for r in records
            if client.storage.client.head_object(
                Bucket=stack.settings.s3_bucket, Key=f"{stack.settings.s3_prefix}/jobs/{r.job_id}/job.json"
            )
        )
        found = sum(client.status(r.job_id).state == "succeeded" for r in records[:100])

    per_job_end = (sum(record_bytes) + sum(key_bytes)) / jobs
    per_job_after = sum(key_bytes) / jobs
    return {
        "jobs": jobs,
        "with_idempotency_key": len(key_bytes),
        "record_bytes_median": statistics.median(record_bytes),
        "idempotency_key_bytes_median": statistics.median(key_bytes),
        "per_job_bytes_at_end": round(per_job_end, 1),
        "per_job_bytes_after_linger": round(per_job_after, 1),
        "record_ttl_s_at_end_max": max(ttls),
        "used_memory_delta_per_job_with_records": round((with_records - before) / jobs, 1),
        "used_memory_delta_per_job_without_records": round((without_records - before) / jobs, 1),
        "archived_records": archived,
        "status_found_in_bucket_of_100": found,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jobs", type=int, default=2000)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="refinery-records-") as tmp:
        run = measure(args.jobs, Path(tmp))
    defaults = Settings(_env_file=None)
    ttl, linger = defaults.job_ttl_s, defaults.record_linger_s
    end, after = run["per_job_bytes_at_end"], run["per_job_bytes_after_linger"]
    # Bytes held per job per second of traffic, in each design.
    day_before = DAY_S * end
    day_after = min(linger, DAY_S) * end + DAY_S * after
    steady_before = ttl * end
    steady_after = linger * end + ttl * after
    result = {
        **run,
        "job_ttl_s": ttl,
        "record_linger_s": linger,
        "day_of_traffic_bytes_per_job_per_s": {"before": day_before, "after": round(day_after)},
        "day_of_traffic_reduction": round(day_before / day_after, 2),
        "steady_state_bytes_per_job_per_s": {"before": steady_before, "after": round(steady_after)},
        "steady_state_reduction": round(steady_before / steady_after, 2),
        "at_1m_jobs_per_day_gib": {
            "before": round(steady_before * 1e6 / DAY_S / 2**30, 2),
            "after": round(steady_after * 1e6 / DAY_S / 2**30, 2),
        },
    }
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    console.print_json(json.dumps(result))
    console.print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
