"""The parts in their order (the README of the package: benchmarks/gpu/__init__.py), each
guarded: one part's failure must not lose the others' figures."""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import torch
from rich.console import Console

from benchmarks.gpu import system
from benchmarks.gpu.batching import batching
from benchmarks.gpu.latency import latency
from benchmarks.gpu.models import FULL, SMALL, build_refiner, build_schnell, parameters
from benchmarks.gpu.record import Budget, Record
from benchmarks.gpu.refiner_speed import refiner_speed
from benchmarks.gpu.report import goals, table
from benchmarks.gpu.saving import saving
from benchmarks.gpu.timing import release, sync

log = logging.getLogger(__name__)


def run_part(record: Record, name: str, device: str, measure: Callable[[], dict]) -> None:
    """``measure()``'s fields as the part's record; running out of GPU memory is "oom"."""
    record.begin(name)
    try:
        fields = measure()
    except torch.OutOfMemoryError:
        release(device)
        record.finish(name, status="oom")
    except Exception as error:
        log.exception("%s failed", name)
        record.finish(name, status="error", error=f"{type(error).__name__}: {str(error)[:2000]}")
    else:
        record.finish(name, **fields)


def measure_all(small: bool, budget: Budget, record: Record, out_dir: Path) -> int:
    """Every part into ``record``; 0 when none failed (skipped ones included), 2 without CUDA."""
    scale = SMALL if small else FULL
    if scale.device == "cuda" and not torch.cuda.is_available():
        reason = "no CUDA device here; run it on a GPU machine, or use --small"
        record.set(error=reason)
        print(f"benchmarks.gpu: {reason}", file=sys.stderr)
        return 2
    # Known at once, so the reason is on record from the start; the other parts need none of it.
    lacks = system.missing()
    if lacks:
        record.skip("system", f"missing: {', '.join(lacks)}")

    log.info("building the models (%s, %s)", "tiny configs" if small else "FLUX.1 at full size", scale.device)
    torch.manual_seed(0)
    started = time.perf_counter()
    # Parts take the models from `flux` and hold no reference after: the system part frees
    # the GPU for its worker's copy by emptying it.
    flux = {"schnell": build_schnell(scale)}
    refiner = build_refiner(scale)
    sync(scale.device)
    record.set(
        device=torch.cuda.get_device_name() if scale.device == "cuda" else "cpu",
        dtype=str(scale.dtype).removeprefix("torch."),
        scale={"sizes": scale.sizes, "batches": scale.batches, "big_size": scale.big_size},
        build_s=round(time.perf_counter() - started, 1),
        parameters_billions=parameters(flux["schnell"]),
    )

    def sweep() -> list[dict]:
        return record.part("latency").get("rows", [])

    run_part(record, "latency", scale.device, lambda: latency(flux["schnell"], scale, budget, rows(record, "latency")))
    # Right after latency: the refiner's figure carries the <= 15 ms goal.
    run_part(
        record,
        "refiner_speed",
        scale.device,
        lambda: refiner_speed(refiner, scale, budget, rows(record, "refiner_speed")),
    )
    run_part(record, "batching", scale.device, lambda: batching(flux["schnell"], refiner, scale, budget, sweep()))
    run_part(
        record, "saving", scale.device, lambda: saving(flux, refiner, scale, budget, sweep(), rows(record, "saving"))
    )
    if not lacks:
        run_part(record, "system", scale.device, lambda: system.system(flux, scale, budget, out_dir))
    record.set(goals=goals(record.result), elapsed_s=budget.elapsed(), finished=True)
    Console(stderr=True).print(table(record.result))
    return 1 if any(part["status"] == "error" for part in record.result["parts"].values()) else 0


def rows(record: Record, name: str) -> Callable[[dict], None]:
    return partial(record.row, name)
