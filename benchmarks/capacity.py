"""What one job costs the shared parts (Redis, S3), and how many jobs one Redis primary serves.

    python benchmarks/capacity.py [--jobs 400]

A private stack runs the free model (``noop``), 64 px, one worker with default settings; S3
requests pass through a counting proxy in front of moto's server. For each kind that a
producer submits at volume (generate-and-refine; refine-only with the image sent inline):

  redis_commands_per_job   Redis's own ``INFO commandstats`` over a burst (the producer's
                           submits and waits included), per job, by command;
  bytes                    ``MEMORY USAGE`` of a record while queued, once ended, and what a
                           job keeps after its record left Redis (shared/archive.py);
  s3_requests_per_job      requests the producer and the worker make, by method.

Then ``redis-benchmark`` gives this host's Redis ceiling for the commands a job uses most
(one connection per client, no pipelining, 50 clients), and from it the jobs per second one
primary sustains at half its ceiling and the GPUs that feeds (docs/deploy.md, "Capacity").
Writes benchmarks/results/capacity.json.
"""

from __future__ import annotations

import argparse
import io
import json
import subprocess
import tempfile
import time
from collections import Counter
from pathlib import Path

import redis
from PIL import Image
from rich.console import Console

from devstack.s3_proxy import S3Proxy
from devstack.stack import LocalStack
from producer.client import Client
from refiner.export import NOOP
from shared import keys

RESULTS = Path(__file__).parent / "results" / "capacity.json"
IDLE_S = 10.0
HEADROOM = 0.5
# Published FLUX timings per image on one H100-class GPU (the figures; no GPU run here yet).
GPU_SECONDS_PER_IMAGE = {"flux-schnell": 0.7, "flux-dev": 3.0}
console = Console()


def commandstats(server: redis.Redis) -> Counter[str]:
    return Counter(
        {name.removeprefix("cmdstat_"): int(stats["calls"]) for name, stats in server.info("commandstats").items()}
    )


def png(side: int = 64) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (side, side), (120, 90, 60)).save(buffer, "PNG")
    return buffer.getvalue()


def measure(jobs: int, workdir: Path) -> dict:
    proxy = S3Proxy()
    stack = LocalStack(workdir, preset="noop", refiner=NOOP, s3_endpoint_url=f"http://127.0.0.1:{proxy.port}")
    proxy.upstream_port = stack.s3_port
    with stack:
        client = Client(stack.settings)
        server = client.store.redis
        image = png()
        # Queued bytes: records written before any worker runs.
        queued = [client.submit_generate("portrait", seed=s, width=64, height=64) for s in range(20)]
        queued_bytes = sorted(int(server.memory_usage(keys.job_key(h.job_id)) or 0) for h in queued)  # type: ignore[arg-type]
        stack.start_worker("worker")
        for handle in queued:
            handle.wait(60)

        time.sleep(2.0)  # the warm-up jobs' ends (archive, callbacks) are done
        server.config_resetstat()
        time.sleep(IDLE_S)  # the idle system's own traffic (heartbeats, Celery's polling)
        idle = commandstats(server)

        kinds: dict[str, dict] = {}
        for kind, submit in (
            ("generate_and_refine", lambda s: client.submit_generate("portrait", seed=s, width=64, height=64)),
            ("refine_only", lambda s: client.submit_refine(image=image)),
        ):
            proxy.take()
            server.config_resetstat()
            started = time.monotonic()
            handles = [submit(seed) for seed in range(jobs)]
            records = [handle.wait(120) for handle in handles]
            assert all(r.state == "succeeded" for r in records), [r.error for r in records if r.error]
            # Let the ends finish (archive, input deletion, callbacks) before counting.
            time.sleep(1.0)
            seconds = time.monotonic() - started
            # Everything Redis served meanwhile, per job: the idle system's own traffic (a few
            # commands a second per worker, "idle_commands_per_s") is counted in, not subtracted.
            counted = commandstats(server)
            commands = {name: round(n / jobs, 2) for name, n in counted.items() if n / jobs >= 0.05}
            s3 = proxy.take()
            ended = [int(server.memory_usage(keys.job_key(r.job_id)) or 0) for r in records[:50]]  # type: ignore[arg-type]
            kinds[kind] = {
                "jobs": jobs,
                "seconds": round(seconds, 2),
                "redis_commands_per_job": round(sum(commands.values()), 1),
                "redis_commands_by_name": dict(sorted(commands.items(), key=lambda kv: -kv[1])),
                "transactions_per_job": commands.get("exec", 0.0),
                "s3_requests_per_job": round(sum(s3.values()) / jobs, 2),
                "s3_requests_by_method": {method: round(n / jobs, 2) for method, n in sorted(s3.items())},
                "record_bytes_ended_median": sorted(ended)[len(ended) // 2],
            }
        kinds["generate_and_refine"]["record_bytes_queued_median"] = queued_bytes[len(queued_bytes) // 2]
        ceiling = redis_ceiling(stack.redis_port)
    return {
        "kinds": kinds,
        "redis_ceiling_ops_per_s": ceiling,
        "idle_commands_per_s": {name: round(n / IDLE_S, 2) for name, n in idle.most_common()},
    }


def redis_ceiling(port: int) -> dict[str, float]:
    """Operations per second of this host's redis-server for a job's commonest commands."""
    done = subprocess.run(
        [
            "redis-benchmark",
            "-p",
            str(port),
            "-q",
            "--csv",
            "-n",
            "100000",
            "-c",
            "50",
            "-t",
            "set,get,lpush,rpop,incr",
        ],
        capture_output=True,
        text=True,
        check=True,
        timeout=300,
    )
    rows = [line.split(",") for line in done.stdout.splitlines()[1:] if line.strip()]
    return {row[0].strip('"'): float(row[1].strip('"')) for row in rows}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jobs", type=int, default=400)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="refinery-capacity-") as tmp:
        run = measure(args.jobs, Path(tmp))
    ops = min(run["redis_ceiling_ops_per_s"].values())
    model = {}
    for kind, costs in run["kinds"].items():
        jobs_per_s = HEADROOM * ops / costs["redis_commands_per_job"]
        model[kind] = {
            "jobs_per_s_at_half_ceiling": round(jobs_per_s),
            "gpus_fed": {preset: round(jobs_per_s * seconds) for preset, seconds in GPU_SECONDS_PER_IMAGE.items()},
        }
    result = {**run, "headroom": HEADROOM, "gpu_seconds_per_image": GPU_SECONDS_PER_IMAGE, "model": model}
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    console.print_json(json.dumps(result))
    console.print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
