"""dev (28 steps, guidance 3.5) against schnell + refiner in wall time, each through the
worker's own calls, beside the FLOPs saving of benchmarks/results/refiner_cost.json."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from functools import partial
from typing import Any

import torch
from diffusers import FluxPipeline

from benchmarks.gpu.models import Scale, build_dev
from benchmarks.gpu.record import Budget
from benchmarks.gpu.timing import guarded, images, ok_rows, release, time_job
from benchmarks.refiner_cost import RESULTS as FLOPS_RESULTS
from refiner import Refiner
from shared.presets import get_preset


def saving(
    flux: dict[str, FluxPipeline],
    refiner: Refiner,
    scale: Scale,
    budget: Budget,
    sweep: list[dict],
    add: Callable[[dict], None],
) -> dict:
    size, schnell, dev = scale.big_size, get_preset("flux-schnell"), get_preset("flux-dev")
    started = time.perf_counter()
    flux["dev"] = build_dev(flux["schnell"], scale)
    built_s = round(time.perf_counter() - started, 1)
    dev_job = partial(images, flux["dev"], dev, size)

    def schnell_and_refiner(seeds: list[int], steps: int | None = None) -> torch.Tensor:
        return refiner(images(flux["schnell"], schnell, size, seeds, steps))

    # What a schnell image costs here tells what a dev call will need of the budget.
    known = [r["s_per_image"] for r in ok_rows(sweep, size)]
    dev_per_image = min(known, default=0.0) * dev.steps / schnell.steps
    for batch in scale.dev_batches:
        lacks = budget.lacks(dev_per_image * batch * (scale.repeats + 1))
        if lacks:
            add({"batch": batch, "status": "skipped", "reason": lacks})
            continue
        dev_row = guarded(scale.device, partial(time_job, dev_job, batch, scale))
        both_row = guarded(scale.device, partial(time_job, schnell_and_refiner, batch, scale))
        run: dict[str, Any] = {"batch": batch, "status": "ok", "dev": dev_row, "schnell_plus_refiner": both_row}
        if dev_row["status"] == both_row["status"] == "ok":
            run["saving_vs_dev"] = round(1 - both_row["s_per_image"] / dev_row["s_per_image"], 4)
        add(run)
    del flux["dev"], dev_job
    release(scale.device)
    flops = json.loads(FLOPS_RESULTS.read_text())["saving_vs_dev"] if FLOPS_RESULTS.is_file() else None
    return {"size": size, "dev_build_s": built_s, "flops_saving_vs_dev": flops}
