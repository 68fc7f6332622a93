"""What the HTTP gateway costs on the submit path, against the Python producer on the same stack.

    python benchmarks/gateway.py [--jobs 1000] [--singles 300] [--runs 5]

On a private stack (redis-server, moto's S3 server, one `refinery gateway` process, no
workers, so every job stays queued and only admission is measured) it times, --runs times:
  batch     one POST /v1/jobs:batch of --jobs jobs (admitted in one round trip to Redis);
  http      --singles POST /v1/jobs one after another (latency p50, p99);
  client    --singles ``Client.submit_generate`` calls in this process (latency p50, p99);
and the gateway's added latency per job (http minus client, p50 and p99). Each figure is
the median of the runs' (the host is shared and noisy). Writes benchmarks/results/gateway.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import httpx

from devstack.stack import LocalStack, free_port, wait_until
from producer.client import Client

RESULTS = Path(__file__).parent / "results" / "gateway.json"
JOB = {"kind": "generate_and_refine", "prompt": "portrait", "width": 64, "height": 64, "seed": 1}


def timed(call: Callable[[], object], n: int) -> list[float]:
    """Seconds of each of ``n`` calls."""
    seconds = []
    for _ in range(n):
        started = time.perf_counter()
        call()
        seconds.append(time.perf_counter() - started)
    return seconds


def quantile_ms(seconds: list[float], q: float) -> float:
    return round(statistics.quantiles(seconds, n=100)[round(q * 100) - 1] * 1000, 3)


def median_of(runs: list[dict], *path: str) -> float:
    values = []
    for run in runs:
        value = run
        for name in path:
            value = value[name]
        values.append(value)
    return round(statistics.median(values), 3)


def main(jobs: int, singles: int, runs: int) -> dict:
    with tempfile.TemporaryDirectory() as workdir, LocalStack(Path(workdir)) as stack:
        port = free_port()
        process = stack.spawn("gateway", [sys.executable, "-m", "cli", "gateway", "--port", str(port)])
        url = f"http://127.0.0.1:{port}"
        wait_until(lambda: httpx.get(f"{url}/readyz").status_code == 200, timeout_s=60, what="gateway", process=process)
        # Limits out of the way: this measures admission, not refusal.
        made = stack.refinery("keys", "create", "--tenant", "bench", "--rate", "1e9", "--max-queued", "1000000000")
        headers = {"Authorization": f"Bearer {made.stdout.strip()}"}
        http = httpx.Client(base_url=url, timeout=300)
        client = Client(stack.settings)
        # Warm both paths (connections, imports, script loads) before timing.
        timed(lambda: http.post("/v1/jobs", json=JOB, headers=headers), 20)
        timed(lambda: client.submit_generate("portrait", width=64, height=64, seed=1), 20)

        measured = []
        for _ in range(runs):
            started = time.perf_counter()
            answer = http.post("/v1/jobs:batch", json={"jobs": [JOB] * jobs}, headers=headers)
            batch_s = time.perf_counter() - started
            items = answer.json()["jobs"]
            assert answer.status_code == 200 and all(item["job_id"] for item in items), answer.text[:300]
            over_http = timed(lambda: http.post("/v1/jobs", json=JOB, headers=headers).raise_for_status(), singles)
            direct = timed(lambda: client.submit_generate("portrait", width=64, height=64, seed=1), singles)
            measured.append(
                {
                    "batch_s": batch_s,
                    "http": {
                        "s": sum(over_http),
                        "p50": quantile_ms(over_http, 0.5),
                        "p99": quantile_ms(over_http, 0.99),
                    },
                    "client": {"s": sum(direct), "p50": quantile_ms(direct, 0.5), "p99": quantile_ms(direct, 0.99)},
                }
            )

    batch_s = median_of(measured, "batch_s")
    http_s, client_s = median_of(measured, "http", "s"), median_of(measured, "client", "s")
    result = {
        "batch": {
            "jobs": jobs,
            "seconds": batch_s,
            "jobs_per_s": round(jobs / batch_s),
            "runs_s": [round(run["batch_s"], 3) for run in measured],
        },
        "http_one_by_one": {
            "jobs_per_s": round(singles / http_s),
            "p50_ms": median_of(measured, "http", "p50"),
            "p99_ms": median_of(measured, "http", "p99"),
        },
        "client_submit": {
            "jobs_per_s": round(singles / client_s),
            "p50_ms": median_of(measured, "client", "p50"),
            "p99_ms": median_of(measured, "client", "p99"),
        },
        "gateway_added_ms": {
            "p50": round(median_of(measured, "http", "p50") - median_of(measured, "client", "p50"), 3),
            "p99": round(median_of(measured, "http", "p99") - median_of(measured, "client", "p99"), 3),
        },
        "config": {
            "singles": singles,
            "runs": runs,
            "statistic": "median of the runs",
            "cpus": os.cpu_count(),
            "load_average_at_end": list(os.getloadavg()),
        },
    }
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jobs", type=int, default=1000)
    parser.add_argument("--singles", type=int, default=300)
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    print(json.dumps(main(args.jobs, args.singles, args.runs), indent=2))
