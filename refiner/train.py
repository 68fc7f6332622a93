"""Train a refiner on student/teacher pairs: paired (`unet-cbam`) or unpaired (`cyclegan`,
`esa-cyclegan`). One loop, top to bottom, in the manner of nanoGPT's train.py; what the
modes do differently is in `refiner.modes`, one class each.

    refinery train --data s3://...|DIR --arch unet-cbam --out runs/r1 [--steps 2000 --batch-size 16 ...]
    accelerate launch --multi_gpu --num_processes 4 -m cli train --data s3://...|DIR --out runs/r1 \
        --mixed-precision bf16

Built on `accelerate`: on a CPU it just runs; under `accelerate launch` every process trains
on its own slice of each batch (DDP) and the main process validates, writes and exports.
`batch_size` is per process. The options, one per `TrainConfig` field, are `refiner.options`;
`refinery train` (`cli.training`) mirrors an s3:// dataset, then calls `main` here.

The run directory tells its own story:

    out/config.json                the resolved config
    out/metrics.csv                one row per step (losses, lr, validation when measured)
    out/samples/step_XXXXXX.png    validation pairs, one per row: student | refined | teacher
    out/checkpoint.pt              {model, optimizer, step, config, best, ...}; --resume
    out/refiner/                   the student->teacher network and its card (`refiner.export`):
                                   paired, the best validation L1; CycleGAN, the last weights

Validation, on held-out pairs at full resolution: mean L1 to the teacher of the student
(doing nothing), of the global affine colour correction fitted on training pairs (the
cheapest possible "refiner": per channel `a * x + b`, least squares) and of the refiner.
A refiner is only worth its cost if it beats both.
"""

from __future__ import annotations

import copy
import csv
import json
import logging
import math
import time
from dataclasses import asdict
from pathlib import Path
from typing import IO, Any

import torch
from accelerate import Accelerator, PartialState
from accelerate.utils import set_seed
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from refiner.baseline import apply_affine, fit_affine
from refiner.data import PairDataset, ResumableBatchSampler, batched_pairs, collate_pairs
from refiner.export import export_refiner, read_card
from refiner.modes import MODES, TrainingMode
from refiner.networks import RefinerUNet
from refiner.options import ResolvedConfig, TrainConfig, config_from_args
from refiner.report import sample_grid

logger = logging.getLogger(__name__)

CHECKPOINT = "checkpoint.pt"
METRICS = "metrics.csv"
EXPORT = "refiner"
VAL_COLUMNS = ("val_l1_student", "val_l1_affine", "val_l1_refined")


# --- helpers ---------------------------------------------------------------------------


def get_lr(step: int, config: ResolvedConfig) -> float:
    """Linear warmup, then cosine decay to `min_lr_ratio * lr` at `lr_decay_steps` (nanoGPT)."""
    if config.lr_schedule == "constant":
        return config.lr
    if step < config.warmup_steps:
        return config.lr * (step + 1) / config.warmup_steps
    min_lr = config.lr * config.min_lr_ratio
    if step >= config.lr_decay_steps:
        return min_lr
    progress = (step - config.warmup_steps) / max(config.lr_decay_steps - config.warmup_steps, 1)
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (config.lr - min_lr)


def due(every: int, step: int, config: ResolvedConfig, stopping: bool) -> bool:
    """Whether a periodic task (validation, samples, checkpoint) runs after `step`: every
    `every` steps (0: never), and always after the last one."""
    return stopping or step == config.steps or (every > 0 and step % every == 0)


def _l1_per_pair(images: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """`(B,)`: mean L1 of each image, clamped as served, to its teacher."""
    return (images.float().clamp(0, 1) - teacher).abs().mean(dim=(1, 2, 3))


@torch.no_grad()
def validation_l1(
    network: RefinerUNet,
    dataset: PairDataset,
    config: ResolvedConfig,
    accelerator: Accelerator,
    affine: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> dict[str, float]:
    """Mean per-pair L1 to the teacher of the refined val images, unquantised (`refiner.evaluate`
    scores 8-bit images); with `affine`, also of the student and of the affine baseline."""
    was_training = network.training
    network.eval()
    sums = {"val_l1_refined": 0.0, "val_l1_student": 0.0, "val_l1_affine": 0.0}
    pairs = 0
    for batch in batched_pairs(dataset, config.max_val_pairs, config.batch_size):
        student = batch["student"].to(accelerator.device)
        teacher = batch["teacher"].to(accelerator.device)
        with accelerator.autocast():
            refined = network(student)
        sums["val_l1_refined"] += _l1_per_pair(refined, teacher).sum().item()
        if affine is not None:
            sums["val_l1_student"] += _l1_per_pair(student, teacher).sum().item()
            sums["val_l1_affine"] += _l1_per_pair(apply_affine(student, *affine), teacher).sum().item()
        pairs += student.shape[0]
    network.train(was_training)
    keys = sums if affine is not None else ["val_l1_refined"]
    return {key: sums[key] / pairs for key in keys}


@torch.no_grad()
def save_sample_grid(
    network: RefinerUNet, dataset: PairDataset, config: ResolvedConfig, accelerator: Accelerator, path: Path
) -> None:
    """The first val pairs, one per row: student | refined | teacher, as evaluation draws them."""
    was_training = network.training
    network.eval()
    samples: list[tuple[str, torch.Tensor, torch.Tensor, torch.Tensor]] = []
    for batch in batched_pairs(dataset, config.sample_pairs, config.batch_size):
        student = batch["student"].to(accelerator.device)
        with accelerator.autocast():
            refined = network(student).float().clamp(0, 1)
        samples += zip(batch["pair_id"], student.cpu(), refined.cpu(), batch["teacher"])
    network.train(was_training)
    sample_grid(path, samples)


def data_card(config: ResolvedConfig, train_set: PairDataset, val_set: PairDataset) -> dict[str, Any]:
    """What the exported card records about the data the refiner was trained and chosen on."""
    return {
        "root": config.data,
        "pairs": len(train_set) + len(val_set),
        "train_pairs": len(train_set),
        "val_pairs": len(val_set),
        "val_pairs_scored": min(len(val_set), config.max_val_pairs),
        "val_fraction": config.val_fraction,
        "image_sizes": sorted(set(train_set.summary()["image_sizes"]) | set(val_set.summary()["image_sizes"])),
        "resolution": config.resolution,
    }


def _jsonable(config: ResolvedConfig) -> dict[str, Any]:
    values = asdict(config)
    values["channel_mults"] = list(values["channel_mults"])
    return values


# --- checkpoints -----------------------------------------------------------------------


def _candidate(step: int, val_l1: float, mode: TrainingMode) -> dict[str, Any]:
    """The weights to export, should nothing better come: `{step, val_l1, model}`."""
    return {"step": step, "val_l1": val_l1, "model": copy.deepcopy(mode.refiner.state_dict())}


def save_checkpoint(path: Path, mode: TrainingMode, step: int, best: dict[str, Any], elapsed: float) -> None:
    checkpoint = {
        "model": {name: mode.accelerator.unwrap_model(net).state_dict() for name, net in mode.networks.items()},
        "optimizer": {name: opt.state_dict() for name, opt in mode.optimizers.items()},
        "step": step,
        "config": _jsonable(mode.config),
        "best": best,
        "elapsed_s": elapsed,
    }
    tmp = path.with_suffix(".tmp")
    torch.save(checkpoint, tmp)
    tmp.replace(path)  # a crash mid-write never leaves half a checkpoint


def load_checkpoint(path: Path, mode: TrainingMode) -> tuple[int, float, dict[str, Any]]:
    """Restore weights and optimizer moments; returns the step, elapsed seconds and best-so-far.
    The mode's networks are prepared, so the optimizer's moments land on their device."""
    config = mode.config
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    if checkpoint["config"]["arch"] != config.arch:
        raise ValueError(f"{path} is a {checkpoint['config']['arch']} run, not {config.arch}")
    changed = {
        k: (v, getattr(config, k))
        for k, v in checkpoint["config"].items()
        if k in ("seed", "batch_size", "resolution", "data", "val_fraction", "gradient_against")
        and v != getattr(config, k)
    }
    if changed:
        logger.warning("resuming with changed settings (checkpoint, now): %s", changed)
    for name, net in mode.networks.items():
        mode.accelerator.unwrap_model(net).load_state_dict(checkpoint["model"][name])
    for name, optimizer in mode.optimizers.items():
        optimizer.load_state_dict(checkpoint["optimizer"][name])
    return checkpoint["step"], checkpoint["elapsed_s"], checkpoint["best"]


# --- the run directory -----------------------------------------------------------------


def open_metrics(path: Path, columns: list[str], step: int) -> tuple[IO[str], csv.DictWriter]:
    """`metrics.csv` for appending, line-buffered so each row is on disk once written: new for
    a new run; on resume, cut back to the checkpoint's step (later rows will be trained again)."""
    if step and path.is_file():
        with path.open(newline="") as f:
            reader = csv.DictReader(f)
            rows = [row for row in reader if int(row["step"]) <= step]
        with path.open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=reader.fieldnames or columns)
            writer.writeheader()
            writer.writerows(rows)
    elif not step:
        path.unlink(missing_ok=True)
    file = path.open("a", newline="", buffering=1)
    metrics = csv.DictWriter(file, fieldnames=columns, extrasaction="ignore")
    if file.tell() == 0:
        metrics.writeheader()
    return file, metrics


# --- training --------------------------------------------------------------------------


def train(config: TrainConfig) -> Path:
    """Train, validate, checkpoint and export; returns the exported refiner's directory."""
    run = config.resolved()
    out = Path(run.out)
    mode_class = MODES[run.arch]

    # 1. Accelerator and seed: same seed, same initial weights on every process.
    accelerator = Accelerator(mixed_precision=run.mixed_precision)
    main = accelerator.is_main_process
    set_seed(run.seed)
    checkpoint_path = out / CHECKPOINT
    if checkpoint_path.exists() and not run.resume:
        raise FileExistsError(f"{checkpoint_path} exists: pass resume to continue that run, or another out")

    # 2. Data: the training split (cropped, seeded; unpaired, teachers from other pairs), the
    #    val split at full resolution, and the affine baseline fitted on uncropped training pairs.
    train_set = PairDataset(
        run.data, "train", run.resolution, run.val_fraction, seed=run.seed, unpaired=mode_class.unpaired
    )
    val_set = PairDataset(run.data, "val", None, run.val_fraction)
    if len(train_set) == 0 or len(val_set) == 0:
        raise ValueError(
            f"{run.data}: {len(train_set)} training and {len(val_set)} validation pairs at "
            f"val_fraction={run.val_fraction}; both splits need at least one pair"
        )
    affine = fit_affine(PairDataset(run.data, "train", None, run.val_fraction), run.affine_fit_pairs)

    # 3. The mode: its networks and optimizers, prepared, and its losses.
    mode = mode_class(run, accelerator)

    # 4. Resume: weights, optimizer moments, step, best-so-far and elapsed time. The best-so-far
    #    is the main process's: the others never validate, and keep it empty.
    step, elapsed_before = 0, 0.0
    best: dict[str, Any] = {}
    if run.resume and checkpoint_path.exists():
        step, elapsed_before, best = load_checkpoint(checkpoint_path, mode)
        logger.info("resumed %s at step %d", checkpoint_path, step)
    elif run.resume:
        logger.info("no checkpoint at %s: starting a new run", checkpoint_path)

    # 5. The batch stream, from `step` on: the same batches a straight run would have seen.
    sampler = ResumableBatchSampler(
        len(train_set),
        run.batch_size,
        run.seed,
        start_step=step,
        num_replicas=accelerator.num_processes,
        rank=accelerator.process_index,
    )
    loader = DataLoader(
        train_set,
        batch_sampler=sampler,
        collate_fn=collate_pairs,
        num_workers=run.num_workers,
        pin_memory=accelerator.device.type == "cuda",
    )
    batches = iter(loader)

    # 6. The run directory, then the baselines and the starting point (identity, or --init),
    #    which is the first candidate for export.
    baselines: dict[str, float] = {}
    metrics_file, metrics = None, None
    if main:
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.json").write_text(json.dumps(_jsonable(run), indent=2))
        columns = ["step", "lr", "loss", *mode.columns, *VAL_COLUMNS, "elapsed_s"]
        metrics_file, metrics = open_metrics(out / METRICS, columns, step)
        scores = validation_l1(mode.refiner, val_set, run, accelerator, affine)
        baselines = {k: scores[k] for k in ("val_l1_student", "val_l1_affine")}
        if not best:
            best = _candidate(0, scores["val_l1_refined"], mode)
            metrics.writerow({"step": 0, **scores, "elapsed_s": 0.0})
        logger.info(
            "val L1 to teacher: student %.5f, affine %.5f, start %.5f",
            baselines["val_l1_student"],
            baselines["val_l1_affine"],
            scores["val_l1_refined"],
        )

    # 7. The training loop.
    for net in mode.networks.values():
        net.train()
    start_time = time.perf_counter()
    stopping = False  # set when the time budget is spent: the current step is the last
    progress = tqdm(total=run.steps, initial=step, disable=not main, desc=f"train {run.arch}", dynamic_ncols=True)
    last_val = best["val_l1"] if best else float("nan")
    while step < run.steps:
        # 7a. Learning rate for this step, the next batch, one optimisation step.
        lr = get_lr(step, run)
        for optimizer in mode.optimizers.values():
            for group in optimizer.param_groups:
                group["lr"] = lr
        batch = next(batches)
        student = batch["student"].to(accelerator.device, non_blocking=True)  # (B, 3, h, w)
        teacher = batch["teacher"].to(accelerator.device, non_blocking=True)
        loss, parts = mode.step(student, teacher)

        step += 1
        elapsed = elapsed_before + time.perf_counter() - start_time
        if run.max_minutes is not None and time.perf_counter() - start_time >= 60 * run.max_minutes:
            stopping = True
        loss_value = loss.item()
        if not math.isfinite(loss_value):
            raise FloatingPointError(f"loss is {loss_value} at step {step}; lower the lr or check the data")
        row = {
            "step": step,
            "lr": f"{lr:.3e}",
            "loss": f"{loss_value:.6f}",
            "elapsed_s": f"{elapsed:.2f}",
            **{k: f"{v:.6f}" for k, v in parts.items()},
        }

        # 7b. Validation, the export candidate, samples, checkpoint, the metrics row: main
        #     process only (the others have no metrics file).
        if main and due(run.val_every, step, run, stopping):
            scores = validation_l1(mode.refiner, val_set, run, accelerator)
            last_val = scores["val_l1_refined"]
            row.update({**baselines, **scores})
            if mode.keeps(last_val, best["val_l1"]):
                best = _candidate(step, last_val, mode)
        if main and due(run.sample_every, step, run, stopping):
            save_sample_grid(mode.refiner, val_set, run, accelerator, out / "samples" / f"step_{step:06d}.png")
        if main and due(run.checkpoint_every, step, run, stopping):
            save_checkpoint(checkpoint_path, mode, step, best, elapsed)
        if metrics is not None:
            metrics.writerow(row)
        accelerator.wait_for_everyone()
        progress.update(1)
        progress.set_postfix(loss=f"{loss_value:.4f}", val=f"{last_val:.4f}", refresh=False)
        if stopping:
            logger.info("time budget of %s minutes spent: stopping at step %d", run.max_minutes, step)
            break
    progress.close()
    if metrics_file is not None:
        metrics_file.close()

    # 8. Export the candidate the mode kept, with a card of what was trained and how it scored.
    export_dir = out / EXPORT
    if main:
        refiner = RefinerUNet.from_config(mode.refiner.config)
        refiner.load_state_dict(best["model"])
        export_refiner(
            export_dir,
            refiner,
            run.arch,
            {
                **mode.card(),
                "data": data_card(run, train_set, val_set),
                "config": _jsonable(run),
                "metrics": {
                    **baselines,
                    "val_l1_refined": best["val_l1"],
                    "best_step": best["step"],
                    "exported": mode.exports,
                    "refined_over_student": best["val_l1"] / baselines["val_l1_student"],
                    "refined_over_affine": best["val_l1"] / baselines["val_l1_affine"],
                    "last_val_l1_refined": last_val,
                },
                "affine_baseline": {"a": affine[0].tolist(), "b": affine[1].tolist()},
                "steps": step,
                "stopped_by_time_limit": stopping,
                "wall_time_s": round(elapsed_before + time.perf_counter() - start_time, 2),
                "device": str(accelerator.device),
                "processes": accelerator.num_processes,
                "mixed_precision": run.mixed_precision,
            },
        )
        logger.info(
            "exported %s (val L1 %.5f at step %d; student %.5f, affine %.5f)",
            export_dir,
            best["val_l1"],
            best["step"],
            baselines["val_l1_student"],
            baselines["val_l1_affine"],
        )
    accelerator.wait_for_everyone()
    return export_dir


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    export_dir = train(config_from_args(argv))
    if not PartialState().is_main_process:  # the state `train` ran under: one summary per run
        return 0
    m = read_card(export_dir)["metrics"]
    print(f"refiner: {export_dir}")
    print(
        f"val L1 to teacher: student {m['val_l1_student']:.5f}  affine {m['val_l1_affine']:.5f}  "
        f"refined {m['val_l1_refined']:.5f} (step {m['best_step']}, "
        f"{m['refined_over_student']:.3f}x student, {m['refined_over_affine']:.3f}x affine)"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
