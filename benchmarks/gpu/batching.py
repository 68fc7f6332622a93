"""How far an image made in a batch differs from the same job run alone, in 8-bit levels, at
the worker's default (not batch-invariant on CUDA: docs/operations.md, "Batching and
scheduling")."""

from __future__ import annotations

import torch
from diffusers import FluxPipeline

from benchmarks.gpu.models import Scale
from benchmarks.gpu.record import Budget
from benchmarks.gpu.timing import images, ok_rows
from refiner import Refiner
from shared.presets import get_preset


def levels_apart(a: torch.Tensor, b: torch.Tensor) -> dict:
    """How far two image batches in [0, 1] differ once written as 8-bit images."""
    nonfinite = int((~torch.isfinite(a)).sum() + (~torch.isfinite(b)).sum())
    diff = ((a.nan_to_num() * 255).round() - (b.nan_to_num() * 255).round()).abs()
    return {
        "max_levels": float(diff.max()),
        "mean_levels": round(float(diff.mean()), 4),
        "differing_values": round(float((diff > 0).float().mean()), 4),
        "nonfinite_values": nonfinite,
    }


def batching(pipe: FluxPipeline, refiner: Refiner, scale: Scale, budget: Budget, sweep: list[dict]) -> dict:
    """One batch of seeds 0..B-1 against each seed's job run alone."""
    preset, size, seeds = get_preset("flux-schnell"), scale.big_size, list(range(scale.batching_batch))
    # The batch, then each image alone: about twice the batch's images at batch-1 cost.
    per_image = max((r["s_per_image"] for r in ok_rows(sweep, size)), default=0.0)
    lacks = budget.lacks(2 * len(seeds) * per_image)
    if lacks:
        return {"status": "skipped", "reason": lacks}
    together = images(pipe, preset, size, seeds)
    alone = torch.cat([images(pipe, preset, size, [seed]) for seed in seeds])
    return {
        "size": size,
        "batch": len(seeds),
        "generator": levels_apart(together, alone),
        "generator_and_refiner": levels_apart(refiner(together), torch.cat([refiner(x) for x in alone.split(1)])),
    }
