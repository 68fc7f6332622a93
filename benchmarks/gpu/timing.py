"""How every part times a call: synchronised, warmed up, the median of a few, with the peak
GPU memory; and the worker's own generate call, which the FLUX parts time."""

from __future__ import annotations

import gc
import statistics
import time
from collections.abc import Callable

import torch
from diffusers import FluxPipeline

from benchmarks.gpu.models import Scale
from shared.presets import Preset
from worker.models import generate

PROMPT = "close up portrait photo of an elderly man with a grey beard, soft window light"


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def release(device: str) -> None:
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()


def timed(fn: Callable[[], object], repeats: int, device: str) -> dict:
    """Median seconds of ``fn()`` over ``repeats`` calls (warm it up first), and the peak
    GPU memory they allocated."""
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    samples = []
    for _ in range(repeats):
        sync(device)
        started = time.perf_counter()
        fn()
        sync(device)
        samples.append(time.perf_counter() - started)
    peak = round(torch.cuda.max_memory_allocated() / 2**30, 2) if device == "cuda" else None
    return {"s_per_call": round(statistics.median(samples), 4), "peak_vram_gib": peak}


def guarded(device: str, measure: Callable[[], dict]) -> dict:
    """``measure()`` as an "ok" row, or an "oom" row when the GPU ran out of memory."""
    try:
        return {"status": "ok", **measure()}
    except torch.OutOfMemoryError:
        release(device)
        return {"status": "oom"}


def images(pipe: FluxPipeline, preset: Preset, size: int, seeds: list[int], steps: int | None = None) -> torch.Tensor:
    """The worker's generate call (float32 CPU images), at the preset's steps unless given."""
    return generate(
        pipe,
        [PROMPT] * len(seeds),
        seeds,
        width=size,
        height=size,
        steps=steps or preset.steps,
        guidance=preset.guidance,
        max_sequence_length=preset.max_sequence_length,
    )


def time_job(job: Callable[..., object], batch: int, scale: Scale) -> dict:
    """Seconds per image of ``job(seeds, steps=None)`` at ``batch``, after a one-step call at
    the same shape (first calls pay for kernel selection and allocation)."""
    seeds = list(range(batch))
    job(seeds, steps=1)
    row = timed(lambda: job(seeds), scale.repeats, scale.device)
    return {**row, "s_per_image": round(row["s_per_call"] / batch, 4)}


def ok_rows(rows: list[dict], size: int) -> list[dict]:
    """The measured latency rows at ``size``: what later parts estimate their needs from."""
    return [r for r in rows if r["status"] == "ok" and r["size"] == size]
