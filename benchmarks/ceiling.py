"""The system's own ceiling: what one worker process costs per job when the model is free.

    python benchmarks/ceiling.py [--quick] [--label after] [--formats png,webp,jpeg]

A private stack (redis-server, moto's S3 server, one ``refinery worker``) runs the free
model (``REFINERY_MODEL_PRESET=noop``, ``REFINERY_REFINER=noop``), so every figure is
the production path's own cost: batcher, decode, tensor conversions, encode, S3, Redis.
All of a job's worker CPU is then outside the model.
For generate and refine-only jobs at 64, 512 and 1024 px in each output format it reports

  jobs/s       a burst of jobs, first submit to last finish;
  cpu_ms/job   the worker process's CPU time (user + system, read from the OS) over the
               burst, per job: the S3 and Redis servers' CPU on the same cores is not in it;
  stages       per-stage medians of the job records' ``timings_ms`` (wall time);
  server cores the S3 and Redis servers' CPU over the burst, in cores: on this machine they
               share the worker's cores, so they bound what a second core can give it;

then the same burst with the worker's threads pinned to one core and to two (the servers
stay unpinned, so they share those cores), and the codecs alone, in-process, in CPU time.
``--profile`` samples the worker with py-spy through one more refine-only burst: its CPU by
library.
Results go under ``--label`` in benchmarks/results/ceiling.json, beside other labels' runs
(the "before" run was made with the previous PNG encoder).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

import psutil
import torch
from rich.console import Console
from rich.table import Table

from devstack.stack import LocalStack
from producer.client import Client
from refiner.export import NOOP
from refiner.pixels import to_pil, to_tensor
from shared.contract import JobRecord, OutputFormat
from shared.images import TRAINED_ALGORITHMIC_MEDIA, Provenance, decode_image, encode_image
from worker.free_model import NoopPipeline
from worker.models import generate

RESULTS = Path(__file__).parent / "results" / "ceiling.json"
QUICK_RESULTS = Path(__file__).parents[1] / "build" / "benchmarks" / "ceiling-quick.json"
PROMPT = "studio portrait of a woman with freckles and curly red hair"
KINDS = ("generate", "refine")
SIZES = (64, 512, 1024)
JOBS = {64: 60, 512: 40, 1024: 24}  # per burst; fewer where each job moves megabytes
PNG_GOAL_MS = 10.0  # PNG encode at 1024 px, CPU ms per image
REFINE_GOAL_MS = 40.0  # refine-only at 1024 px, worker CPU ms per job outside the model
console = Console()


def texture(size: int) -> torch.Tensor:
    """(3, H, W): what the free generator makes at this size."""
    images = generate(
        NoopPipeline(), [PROMPT], [7], width=size, height=size, steps=1, guidance=0, max_sequence_length=0
    )
    return images[0]


def cpu_ms(work: Callable[[], object], repeats: int) -> float:
    """Median CPU time of ``work`` in ms, all threads of this process (torch's too)."""
    samples = []
    for _ in range(repeats):
        started = time.process_time()
        work()
        samples.append((time.process_time() - started) * 1000)
    return round(statistics.median(samples), 2)


def codecs(sizes: list[int], repeats: int) -> dict:
    """Encode (with provenance), decode and the tensor conversions, in-process, CPU ms each."""
    provenance = Provenance("job", "noop", NOOP, 7, TRAINED_ALGORITHMIC_MEDIA)
    result = {}
    for size in sizes:
        pixels = texture(size)
        image = to_pil(pixels)
        row: dict[str, float | int] = {
            "to_pil_ms": cpu_ms(lambda: to_pil(pixels), repeats),
            "to_tensor_ms": cpu_ms(lambda: to_tensor(image), repeats),
        }
        for fmt in OutputFormat:
            data = encode_image(image, fmt, provenance)
            row[f"{fmt.value}_encode_ms"] = cpu_ms(lambda: encode_image(image, fmt, provenance), repeats)
            row[f"{fmt.value}_decode_ms"] = cpu_ms(
                lambda: decode_image(data, max_bytes=1 << 30, max_pixels=1 << 30), repeats
            )
            row[f"{fmt.value}_bytes"] = len(data)
        result[f"{size}x{size}"] = row
        console.log(f"codecs {size}px: {row}")
    return result


def threads(size: int, images: int) -> dict:
    """A refine-only job's CPU work outside S3 and Redis (decode, to tensor and back, encode
    PNG), in-process on 1 and then 2 threads: whether the GIL lets the worker's job threads
    use a second core, without servers competing for it."""
    provenance = Provenance("job", None, NOOP, None, TRAINED_ALGORITHMIC_MEDIA)
    buffer = io.BytesIO()
    to_pil(texture(size)).save(buffer, "PNG")
    data = buffer.getvalue()

    def work(count: int) -> None:
        for _ in range(count):
            pixels = to_tensor(decode_image(data, max_bytes=1 << 30, max_pixels=1 << 30))
            encode_image(to_pil(pixels), OutputFormat.png, provenance)

    rates = {}
    for n in (1, 2):
        workers = [threading.Thread(target=work, args=(images // n,)) for _ in range(n)]
        started = time.perf_counter()
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join()
        rates[n] = images / (time.perf_counter() - started)
    result = {"images_per_s_1_thread": round(rates[1], 2), "images_per_s_2_threads": round(rates[2], 2)}
    result["speedup"] = round(rates[2] / rates[1], 2)
    console.log(f"decode + convert + encode at {size}px, 1 thread vs 2: {result}")
    return result


class Ceiling:
    """One stack, one worker; ``burst`` runs one row."""

    def __init__(self, stack: LocalStack) -> None:
        self.stack = stack
        self.client = Client(stack.settings)
        self.worker = psutil.Process(stack.start_worker("worker").pid)
        # On the same cores: what they take is not the worker's, but the worker cannot have it.
        self.servers = {name: psutil.Process(stack.processes[name].pid) for name in ("s3", "redis")}
        self.inputs: dict[int, str] = {}

    def input_uri(self, size: int) -> str:
        """A PNG as a caller would upload it (Pillow's default writer), stored once per size."""
        if size not in self.inputs:
            buffer = io.BytesIO()
            to_pil(texture(size)).save(buffer, "PNG")
            uri = f"s3://{self.stack.settings.s3_bucket}/inputs/{size}.png"
            self.client.storage.put(uri, buffer.getvalue(), "image/png")
            self.inputs[size] = uri
        return self.inputs[size]

    def submit(self, kind: str, size: int, fmt: str, seed: int):
        if kind == "generate":
            return self.client.submit_generate(PROMPT, seed=seed, width=size, height=size, output_format=fmt)
        return self.client.submit_refine(input_uri=self.input_uri(size), output_format=fmt)

    def pin(self, cpus: set[int]) -> None:
        """Every thread of the worker (sched_setaffinity acts on one thread at a time)."""
        for thread in self.worker.threads():
            os.sched_setaffinity(thread.id, cpus)

    def burst(self, kind: str, size: int, fmt: str, jobs: int) -> dict:
        for seed in range(2):  # warm: this size's texture, the codec, connections
            record = self.submit(kind, size, fmt, seed).wait(120)
            assert record.state == "succeeded", record.error
        before, servers_before = self.worker.cpu_times(), {n: p.cpu_times() for n, p in self.servers.items()}
        handles = [self.submit(kind, size, fmt, seed) for seed in range(jobs)]
        records: list[JobRecord] = [handle.wait(600) for handle in handles]
        after, servers_after = self.worker.cpu_times(), {n: p.cpu_times() for n, p in self.servers.items()}
        assert all(r.state == "succeeded" for r in records), [r.error for r in records if r.error]
        span = (max(r.finished_at for r in records) - min(r.created_at for r in records)).total_seconds()
        cpu_s = (after.user - before.user) + (after.system - before.system)
        stages = {stage for r in records for stage in r.timings_ms}
        return {
            "kind": kind,
            "size": size,
            "format": fmt,
            "jobs": jobs,
            "jobs_per_s": round(jobs / span, 2),
            "cpu_ms_per_job": round(cpu_s * 1000 / jobs, 1),
            # What one core of this worker could sustain if nothing else needed it.
            "cpu_limited_jobs_per_s": round(jobs / cpu_s, 2),
            "cores_used": round(cpu_s / span, 2),
            "server_cores_used": {
                name: round((sum(servers_after[name][:2]) - sum(servers_before[name][:2])) / span, 2)
                for name in self.servers
            },
            "batch_sizes": sorted({r.batch_size for r in records}),
            "stage_ms_p50": {s: round(statistics.median(r.timings_ms.get(s, 0) for r in records), 2) for s in stages},
        }


def scaling(ceiling: Ceiling, rows: list[tuple[str, int, str]], jobs: dict[int, int]) -> dict:
    """The same bursts with the worker on one core, then two. The S3 and Redis servers
    are not pinned: with two cores they compete with the worker for both, so a ratio near 1
    with ``cores_used`` near 1 says the machine, not the worker, was the limit."""
    result = {}
    for kind, size, fmt in rows:
        runs = {}
        for cpus in ({0}, {0, 1}):
            ceiling.pin(cpus)
            runs[len(cpus)] = ceiling.burst(kind, size, fmt, 3 * jobs[size])  # longer: a ratio of two rates
            console.log(f"{kind} {size}px {fmt} on {len(cpus)} core(s): {runs[len(cpus)]['jobs_per_s']} jobs/s")
        ceiling.pin(os.sched_getaffinity(0))  # back to this machine's cores
        result[f"{kind} {size}px {fmt}"] = {
            "one_core": runs[1],
            "two_cores": runs[2],
            "speedup": round(runs[2]["jobs_per_s"] / runs[1]["jobs_per_s"], 2),
        }
    return result


# Where a sample's CPU goes: the innermost frame from one of these (package or module path
# fragments, as py-spy prints file names), else "other".
LIBRARIES = {
    "S3 client (boto3)": ("botocore/", "boto3/", "s3transfer/", "urllib3/", "http/client.py"),
    "Redis": ("redis/",),
    "Celery, kombu": ("celery/", "kombu/", "billiard/", "vine/"),
    "codecs (Pillow, fpng)": ("PIL/", "fpng", "shared/images.py"),
    "tensor conversions (torch)": ("torch/", "refiner/pixels.py"),
    "records (pydantic, json)": ("pydantic", "json/"),
}


def profile(ceiling: Ceiling, kind: str, size: int, fmt: str, jobs: int) -> dict:
    """py-spy samples the worker (every thread, without pausing it) through one burst: the
    share of its CPU samples that each library's code holds, and the hottest functions."""
    with tempfile.TemporaryDirectory() as tmp:
        raw = Path(tmp) / "stacks.txt"
        argv = [
            str(Path(sys.executable).parent / "py-spy"),
            "record",
            "--pid",
            str(ceiling.worker.pid),
            "--format",
            "raw",
            "--output",
            str(raw),
        ]
        spy = subprocess.Popen([*argv, "--rate", "250", "--nonblocking"], stdout=subprocess.DEVNULL)
        time.sleep(1)  # attached
        row = ceiling.burst(kind, size, fmt, jobs)
        spy.send_signal(signal.SIGINT)  # py-spy writes what it sampled and exits
        spy.wait(60)
        stacks = [line.rpartition(" ") for line in raw.read_text().splitlines() if line.strip()]
    by_library: dict[str, int] = {}
    leaves: dict[str, int] = {}
    for stack, _, count in stacks:
        frames = stack.split(";")
        library = next(
            (name for frame in reversed(frames) for name, parts in LIBRARIES.items() if any(p in frame for p in parts)),
            "other",
        )
        by_library[library] = by_library.get(library, 0) + int(count)
        leaves[frames[-1]] = leaves.get(frames[-1], 0) + int(count)
    total = sum(by_library.values())
    result = {
        "row": row,
        "samples": total,
        "share_by_library": {k: round(v / total, 3) for k, v in sorted(by_library.items(), key=lambda kv: -kv[1])},
        "hottest_functions": {k: round(v / total, 3) for k, v in sorted(leaves.items(), key=lambda kv: -kv[1])[:15]},
    }
    console.log(f"profile of {kind} {size}px {fmt}: {result['share_by_library']}")
    return result


def goals(run: dict) -> dict:
    png = run["codecs"].get("1024x1024", {}).get("png_encode_ms")
    refine = next((r for r in run["rows"] if (r["kind"], r["size"], r["format"]) == ("refine", 1024, "png")), None)
    result: dict[str, dict] = {}
    if png is not None:
        result["png_encode_1024_cpu_ms"] = {"goal": PNG_GOAL_MS, "measured": png, "met": png <= PNG_GOAL_MS}
    if refine is not None:
        # The model is free: all of the worker's CPU is outside it.
        outside = refine["cpu_ms_per_job"]
        result["refine_1024_png_cpu_ms_outside_model"] = {
            "goal": REFINE_GOAL_MS,
            "measured": outside,
            "met": outside <= REFINE_GOAL_MS,
        }
    if "threads" in run:
        speedup = run["threads"]["speedup"]
        result["codec_work_1_to_2_threads"] = {"goal": 1.6, "measured": speedup, "met": speedup >= 1.6}
    for name, row in run.get("scaling", {}).items():
        result[f"scaling {name}"] = {"goal": 1.6, "measured": row["speedup"], "met": row["speedup"] >= 1.6}
    return result


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="64 px only, few jobs: a smoke run")
    parser.add_argument("--label", default="after", help="the key this run is stored under in the results")
    parser.add_argument("--formats", default=",".join(f.value for f in OutputFormat))
    parser.add_argument("--out", type=Path, help=f"default: {RESULTS}, or {QUICK_RESULTS} with --quick")
    parser.add_argument("--note", default="", help="what this run measured, e.g. which encoder")
    parser.add_argument(
        "--profile", action="store_true", help="sample the worker with py-spy through a refine-only burst"
    )
    args = parser.parse_args(argv)
    # A smoke run never replaces the committed full run that the docs cite.
    args.out = args.out or (QUICK_RESULTS if args.quick else RESULTS)
    formats = args.formats.split(",")
    sizes = [64] if args.quick else list(SIZES)
    jobs = {size: 6 for size in sizes} if args.quick else JOBS
    scaled = (
        [("refine", 64, formats[0])] if args.quick else [("refine", 1024, formats[0]), ("generate", 64, formats[0])]
    )
    started = time.time()

    run: dict = {
        "note": args.note,
        "config": {
            "quick": args.quick,
            "formats": formats,
            "sizes": sizes,
            "jobs": jobs,
            "torch": torch.__version__,
        },
        "machine": {
            "cpus": os.cpu_count(),
            "processor": platform.processor(),
            "load_average_at_start": [round(x, 2) for x in os.getloadavg()],
        },
    }
    console.rule("codecs in-process (CPU ms per image)")
    run["codecs"] = codecs(sizes, 3 if args.quick else 9)
    run["threads"] = threads(sizes[-1], 8 if args.quick else 40)
    with tempfile.TemporaryDirectory(prefix="refinery-ceiling-") as tmp:
        # Batch invariance off, as "auto" leaves it on a GPU: on CPU it refines one image
        # at a time and concatenates the results, copies a GPU worker does not make.
        with LocalStack(Path(tmp), preset="noop", refiner=NOOP, batch_invariant="off", private_s3=True) as stack:
            ceiling = Ceiling(stack)
            rows = [(kind, size, fmt) for size in sizes for kind in KINDS for fmt in formats]
            run["rows"] = []
            for i, (kind, size, fmt) in enumerate(rows, 1):
                row = ceiling.burst(kind, size, fmt, jobs[size])
                run["rows"].append(row)
                console.log(
                    f"[{i}/{len(rows)}] {kind} {size}px {fmt}: {row['jobs_per_s']} jobs/s, "
                    f"{row['cpu_ms_per_job']} worker CPU ms/job, stages {row['stage_ms_p50']}"
                )
            console.rule("one core against two")
            run["scaling"] = scaling(ceiling, scaled, jobs)
            if args.profile:
                console.rule("where the worker's CPU goes")
                run["profile"] = profile(ceiling, *scaled[0], 3 * jobs[scaled[0][1]])
    run["machine"]["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]
    run["seconds"] = round(time.time() - started, 1)
    run["goals"] = goals(run)

    results = json.loads(args.out.read_text()) if args.out.exists() else {}
    results.setdefault("runs", {})[args.label] = run
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    console.print(_table(run))
    for name, goal in run["goals"].items():
        console.print(f"{'met' if goal['met'] else 'MISSED'}: {name} = {goal['measured']} (goal {goal['goal']})")
    console.print(f"wrote {args.out} ({args.label}) in {run['seconds']} s")


def _table(run: dict) -> Table:
    table = Table(title="the system with a free model: one worker process")
    for column in ("kind", "size", "format", "jobs/s", "worker CPU ms/job", "cores used", "stage p50 ms"):
        table.add_column(column)
    for r in run["rows"]:
        stages = ", ".join(
            f"{s} {v:g}" for s, v in r["stage_ms_p50"].items() if s not in ("total", "queue_wait") and v >= 0.5
        )
        table.add_row(
            r["kind"],
            str(r["size"]),
            r["format"],
            str(r["jobs_per_s"]),
            str(r["cpu_ms_per_job"]),
            str(r["cores_used"]),
            stages,
        )
    return table


if __name__ == "__main__":
    main()
