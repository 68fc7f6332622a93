"""The default refiner's milliseconds per image on the device, eager and compiled: the
figure with the <= 15 ms goal."""

from __future__ import annotations

import copy
from collections.abc import Callable
from functools import partial
from typing import Any

import torch

from benchmarks.gpu.models import Scale
from benchmarks.gpu.record import Budget
from benchmarks.gpu.timing import guarded, release, timed
from refiner import Refiner

VARIANTS = ("eager", "channels_last", "compile", "compile+channels_last")


def time_refiner(network: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, scale: Scale) -> dict:
    with torch.inference_mode():
        # Twice: a compiled network recompiles on the second batch size it sees (for a
        # dynamic batch dimension), which may be this one's first or second call.
        network(x)
        network(x)
        row = timed(lambda: network(x), scale.refiner_repeats, scale.device)
    return {**row, "ms_per_image": round(row["s_per_call"] / len(x) * 1000, 3)}


def refiner_speed(refiner: Refiner, scale: Scale, budget: Budget, add: Callable[[dict], None]) -> dict:
    """ms per image of the refiner network alone, its input already on the device."""
    size = scale.big_size
    for variant in VARIANTS:
        network: Any = copy.deepcopy(refiner.network)
        layout = torch.channels_last if "channels_last" in variant else torch.contiguous_format
        network = network.to(memory_format=layout)
        if variant.startswith("compile"):
            network = torch.compile(network, backend=scale.compile_backend)
        failed = None
        for batch in scale.refiner_batches:
            where = {"variant": variant, "batch": batch, "size": size}
            compiles = variant.startswith("compile") and batch == scale.refiner_batches[0]
            lacks = budget.lacks(scale.compile_needs_s if compiles else 0.0)
            if failed:
                add({**where, "status": "error", "error": failed})
                continue
            if lacks:
                add({**where, "status": "skipped", "reason": lacks})
                continue
            x = torch.rand(batch, 3, size, size, device=scale.device, dtype=scale.dtype)
            x = x.contiguous(memory_format=layout)
            try:
                row = guarded(scale.device, partial(time_refiner, network, x, scale))
            except Exception as error:  # a compiler failure costs this variant, not the run
                failed = f"{type(error).__name__}: {str(error)[:300]}"
                row = {"status": "error", "error": failed}
            add({**where, **row})
        del network
        release(scale.device)
    return {}
