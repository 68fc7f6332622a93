"""What the queue costs: the bare model against the whole system, side by side in one run.

    python benchmarks/throughput.py [--quick]

For each preset it measures, on this machine:
  direct   in-process calls of the pipeline plus the refiner (the model's own cost), at
           batch 1 and at MAX_BATCH;
  system   the same jobs through producer -> Redis -> worker process -> S3 -> job record,
           with batching off (max_batch 1) and on (max_batch MAX_BATCH), submitted as a burst;
  system / direct with batching on, as the median of --repeats (3) pairs of runs, each
           pair back to back so both halves see the same load on a shared machine, with
           the spread (min, max);
and then the per-job service overhead (end-to-end minus model time, one job at a time)
and the direct batching gain per resolution. Presets: ``tiny-schnell`` (the test double,
milliseconds per image) and ``bench-schnell`` (random weights sized so one image costs a
few hundred ms here: the realistic regime, since real FLUX jobs cost seconds).
Writes benchmarks/results/throughput.json (a --quick run: build/benchmarks/throughput-quick.json).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from devstack.stack import LocalStack
from producer.client import Client
from shared.objects import ObjectStore
from shared.settings import Settings
from worker.handlers.generate import GenerateItem, GenerateJob, GenerateKey
from worker.registry import ModelRegistry

RESULTS = Path(__file__).parent / "results" / "throughput.json"
QUICK_RESULTS = Path(__file__).parents[1] / "build" / "benchmarks" / "throughput-quick.json"
PROMPT = "studio portrait of a woman with freckles and curly red hair"
console = Console()


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def generate_job(preset: str, tmp: Path) -> GenerateJob:
    """The generate handler over resident models, called directly: the bare model's cost."""
    settings = Settings(_env_file=None, model_preset=preset, device="cpu", model_cache_dir=tmp / "models")
    return GenerateJob(ModelRegistry(settings), ObjectStore(settings), settings)


def direct(job: GenerateJob, key: GenerateKey, jobs: int, batch: int) -> dict:
    """jobs/s of bare model calls (generate + refine), ``batch`` images per call."""
    refiner = job.models.refiners.choose("direct", pin=None)
    job.run_batch(key, [GenerateItem(PROMPT, 0, refiner, True)] * batch)  # warm this shape
    started = time.perf_counter()
    for first in range(0, jobs, batch):
        seeds = range(first, min(jobs, first + batch))
        job.run_batch(key, [GenerateItem(PROMPT, seed, refiner, True) for seed in seeds])
    seconds = time.perf_counter() - started
    return {"batch": batch, "jobs": jobs, "seconds": round(seconds, 3), "jobs_per_s": round(jobs / seconds, 3)}


def system(workdir: Path, preset: str, size: int, jobs: int, max_batch: int, max_wait_ms: float) -> dict:
    """A burst of ``jobs`` through a private stack; throughput from first submit to last finish."""
    with LocalStack(workdir, preset=preset, max_batch=max_batch, max_wait_ms=max_wait_ms) as stack:
        stack.start_worker("worker")
        return {"max_batch": max_batch, **burst(stack, size, jobs)}


def burst(stack: LocalStack, size: int, jobs: int, timeout_s: float = 600) -> dict:
    """jobs/s of ``jobs`` submitted at once to the stack's running worker, after one to warm
    it; each wait ends after ``timeout_s``."""
    client = Client(stack.settings)
    warm = client.submit_generate(PROMPT, seed=0, width=size, height=size).wait(timeout_s)
    assert warm.state == "succeeded", warm.error
    handles = [client.submit_generate(PROMPT, seed=seed, width=size, height=size) for seed in range(jobs)]
    records = [handle.wait(timeout_s) for handle in handles]
    assert all(r.state == "succeeded" for r in records), [r.error for r in records if r.error]
    span = (max(r.finished_at for r in records) - min(r.created_at for r in records)).total_seconds()
    latency = [r.timings_ms["total"] for r in records]
    return {
        "jobs": jobs,
        "seconds": round(span, 3),
        "jobs_per_s": round(jobs / span, 3),
        "latency_ms_p50": round(percentile(latency, 0.5), 1),
        "latency_ms_p95": round(percentile(latency, 0.95), 1),
        "batch_sizes": sorted({r.batch_size for r in records}),
    }


def overhead(workdir: Path, preset: str, size: int, jobs: int) -> dict:
    """One job at a time: what a job costs beyond its model time (Redis, records, encoding,
    S3 upload, callback enqueue, the producer's wait)."""
    with LocalStack(workdir, preset=preset, max_batch=1) as stack:
        stack.start_worker("worker")
        client = Client(stack.settings)
        samples, stages = [], {}
        for seed in range(jobs + 1):
            started = time.perf_counter()
            record = client.submit_generate(PROMPT, seed=seed, width=size, height=size).wait(120)
            end_to_end_ms = (time.perf_counter() - started) * 1000
            if seed == 0:
                continue  # warm-up
            model_ms = record.timings_ms["generate"] + record.timings_ms.get("refine", 0)
            samples.append(end_to_end_ms - model_ms)
            for stage in ("queue_wait", "batch_wait", "encode", "upload"):
                stages.setdefault(stage, []).append(record.timings_ms.get(stage, 0))
    return {
        "jobs": jobs,
        "overhead_ms_p50": round(statistics.median(samples), 2),
        "overhead_ms_p95": round(percentile(samples, 0.95), 2),
        "stage_ms_p50": {stage: round(statistics.median(v), 2) for stage, v in stages.items()},
    }


def run_preset(preset: str, size: int, jobs: int, max_batch: int, max_wait_ms: float, repeats: int, tmp: Path) -> dict:
    console.rule(f"{preset} at {size}x{size}, {jobs} jobs, MAX_BATCH {max_batch}")
    job = generate_job(preset, tmp)
    key = GenerateKey(size, size, job.models.preset.steps, job.models.preset.guidance)
    result: dict = {"size": size, "direct_batch_1": direct(job, key, jobs, 1)}
    result["system_batching_off"] = system(tmp / f"{preset}-off", preset, size, jobs, 1, max_wait_ms)
    pairs = []
    for i in range(repeats):
        pair = {
            "direct": direct(job, key, jobs, max_batch),
            "system": system(tmp / f"{preset}-on-{i}", preset, size, jobs, max_batch, max_wait_ms),
        }
        pair["ratio"] = round(pair["system"]["jobs_per_s"] / pair["direct"]["jobs_per_s"], 3)
        pairs.append(pair)
        console.log(f"repetition {i + 1}/{repeats}: system / direct {pair['ratio']}")
    ratios = sorted(pair["ratio"] for pair in pairs)
    # The median pair stands for the run; every pair's figures are kept.
    median = next(pair for pair in pairs if pair["ratio"] == ratios[len(ratios) // 2])
    result[f"direct_batch_{max_batch}"] = median["direct"]
    result["system_batching_on"] = on = median["system"]
    result["system_over_direct_batching_on"] = median["ratio"]
    result["system_over_direct_batching_on_spread"] = [ratios[0], ratios[-1]]
    result["repetitions"] = pairs
    off = result["system_batching_off"]
    result["system_over_direct_batching_off"] = round(off["jobs_per_s"] / result["direct_batch_1"]["jobs_per_s"], 3)
    result["batching_speedup"] = round(on["jobs_per_s"] / off["jobs_per_s"], 3)
    return result


def batching_gain_by_size(sizes: list[int], max_batch: int, jobs: int, tmp: Path) -> dict:
    job = generate_job("tiny-schnell", tmp)
    gains = {}
    for size in sizes:
        key = GenerateKey(size, size, job.models.preset.steps, job.models.preset.guidance)
        one, many = direct(job, key, jobs, 1), direct(job, key, jobs, max_batch)
        gains[f"{size}x{size}"] = round(many["jobs_per_s"] / one["jobs_per_s"], 3)
    return gains


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer jobs (a smoke run, noisier figures)")
    parser.add_argument("--max-batch", type=int, default=4)
    parser.add_argument("--max-wait-ms", type=float, default=20.0)
    parser.add_argument("--repeats", type=int, default=3, help="system / direct pairs; the median is reported")
    parser.add_argument("--out", type=Path, help=f"default: {RESULTS}, or {QUICK_RESULTS} with --quick")
    args = parser.parse_args()
    # A smoke run never replaces the committed full run that the docs cite.
    out = args.out or (QUICK_RESULTS if args.quick else RESULTS)
    tiny_jobs, bench_jobs = (16, 8) if args.quick else (48, 24)

    with tempfile.TemporaryDirectory(prefix="refinery-bench-") as tmp:
        tmp = Path(tmp)
        tiny = run_preset("tiny-schnell", 64, tiny_jobs, args.max_batch, args.max_wait_ms, args.repeats, tmp)
        bench = run_preset("bench-schnell", 256, bench_jobs, args.max_batch, args.max_wait_ms, args.repeats, tmp)
        console.rule("service overhead, one job at a time")
        service = overhead(tmp / "overhead", "tiny-schnell", 64, 10 if args.quick else 30)
        console.rule("direct batching gain by resolution (tiny-schnell)")
        gains = batching_gain_by_size([64, 128, 256], args.max_batch, tiny_jobs, tmp)

    result = {
        # Headlines: the realistic config (bench-schnell), batching on.
        "system_over_direct": bench["system_over_direct_batching_on"],
        "system_over_direct_spread": bench["system_over_direct_batching_on_spread"],
        "batching_speedup": bench["batching_speedup"],
        "overhead_ms_p50": service["overhead_ms_p50"],
        "config": {
            "max_batch": args.max_batch,
            "max_wait_ms": args.max_wait_ms,
            "repeats": args.repeats,
            "quick": args.quick,
            "device": "cpu",
            "load_average_at_end": [round(x, 2) for x in os.getloadavg()],
        },
        "presets": {"tiny-schnell": tiny, "bench-schnell": bench},
        "service_overhead": service,
        "direct_batching_gain_by_size": gains,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    console.print(_table(result))
    console.print(f"wrote {out}")


def _table(result: dict) -> Table:
    table = Table(title="throughput (jobs/s) and ratios")
    for column in (
        "preset",
        "direct b1",
        "direct bN",
        "system off",
        "system on",
        "sys/direct (on): median [min, max]",
        "batching speedup",
        "p50 / p95 ms (on)",
    ):
        table.add_column(column)
    for name, r in result["presets"].items():
        n = result["config"]["max_batch"]
        on = r["system_batching_on"]
        table.add_row(
            f"{name} {r['size']}px",
            str(r["direct_batch_1"]["jobs_per_s"]),
            str(r[f"direct_batch_{n}"]["jobs_per_s"]),
            str(r["system_batching_off"]["jobs_per_s"]),
            str(on["jobs_per_s"]),
            f"{r['system_over_direct_batching_on']} {r['system_over_direct_batching_on_spread']}",
            str(r["batching_speedup"]),
            f"{on['latency_ms_p50']} / {on['latency_ms_p95']}",
        )
    table.caption = (
        f"overhead p50 {result['overhead_ms_p50']} ms per job; "
        f"direct batching gain by size: {result['direct_batching_gain_by_size']}"
    )
    return table


if __name__ == "__main__":
    main()
