"""schnell's seconds per image and peak memory across sizes and batches, through the
worker's own generate call."""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

from diffusers import FluxPipeline

from benchmarks.gpu.models import Scale
from benchmarks.gpu.record import Budget
from benchmarks.gpu.timing import guarded, images, time_job
from shared.presets import get_preset


def latency(pipe: FluxPipeline, scale: Scale, budget: Budget, add: Callable[[dict], None]) -> dict:
    preset = get_preset("flux-schnell")
    for size in scale.sizes:
        job = partial(images, pipe, preset, size)
        per_image, oom = 0.0, False
        for batch in scale.batches:
            where = {"size": size, "batch": batch}
            # The batch before tells what this one needs: a warm-up call and the timed repeats.
            lacks = budget.lacks(per_image * batch * (scale.repeats + 1))
            if oom:  # a larger batch at the same size needs more memory still
                add({**where, "status": "skipped", "reason": "oom at a smaller batch"})
            elif lacks:
                add({**where, "status": "skipped", "reason": lacks})
            else:
                row = guarded(scale.device, partial(time_job, job, batch, scale))
                add({**where, **row})
                oom = row["status"] == "oom"
                per_image = row.get("s_per_image", per_image)
    return {}
