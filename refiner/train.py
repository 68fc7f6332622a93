"""Train a refiner on student/teacher pairs: paired (`unet-cbam`) or unpaired (`cyclegan`,
`esa-cyclegan`). One loop, top to bottom, in the manner of nanoGPT's train.py.

    refinery train --data DIR --arch unet-cbam --out runs/r1 [--steps 2000 --batch-size 16 ...]
    accelerate launch -m refiner.train --data DIR --out runs/r1 --mixed-precision bf16   # GPUs

Built on `accelerate`: on a CPU it just runs; under `accelerate launch` every process trains
on its own slice of each batch (DDP) and the main process validates, writes and exports.
`batch_size` is per process.

The run directory tells its own story:

    out/metrics.csv                one row per step (losses, lr, validation when measured)
    out/samples/step_XXXXXX.png    validation pairs, one per row: student | refined | teacher
    out/checkpoint.pt              {model, optimizer, step, config, best, ...}; --resume
    out/refiner/                   the best-validation student->teacher network
                                   (RefinerUNet.save_pretrained) + refiner.json

Validation, on held-out pairs at full resolution: mean L1 to the teacher of the student
(doing nothing), of the global affine colour correction fitted on training pairs (the
cheapest possible "refiner": per channel `a * x + b`, least squares) and of the refiner.
A refiner is only worth its cost if it beats both.
"""

from __future__ import annotations

import argparse
import copy
import csv
import dataclasses
import json
import logging
import math
import platform
import time
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from refiner.baseline import apply_affine, fit_affine
from refiner.cyclegan import (
    CYCLEGAN_ARCHS,
    CycleLossWeights,
    PatchDiscriminator,
    build_cyclegan,
    count_parameters,
    discriminator_loss,
    generator_loss,
)
from refiner.data import (
    PairDataset,
    ResumableBatchSampler,
    batched_pairs,
    collate_pairs,
)
from refiner.losses import PERCEPTUAL_LOSSES, PairedLoss, lsgan_loss
from refiner.network import RefinerUNet
from refiner.report import sample_grid

logger = logging.getLogger(__name__)

ARCHS = ("unet-cbam", *CYCLEGAN_ARCHS)
CHECKPOINT = "checkpoint.pt"
METRICS = "metrics.csv"
EXPORT = "refiner"
EXPORT_JSON = "refiner.json"
VAL_COLUMNS = ("val_l1_student", "val_l1_affine", "val_l1_refined")


@dataclass
class TrainConfig:
    # data and run
    data: str
    out: str
    arch: str = "unet-cbam"
    steps: int = 2000
    batch_size: int = 16  # per process
    resolution: int | None = None  # training crop; None: full images
    seed: int = 0
    val_fraction: float = 0.1
    init: str | None = None  # a refiner directory to fine-tune from
    resume: bool = False
    # optimisation
    lr: float | None = None  # None: 1e-3 for unet-cbam, 2e-4 for the CycleGANs
    lr_schedule: str = "cosine"  # "cosine" (warmup, then down to min_lr_ratio * lr) or "constant"
    warmup_steps: int | None = None  # None: min(100, steps // 20)
    lr_decay_steps: int | None = None  # None: steps (set it to extend a run without changing the schedule)
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.0
    grad_clip: float = 1.0  # 0: off
    # network (ignored with init, which brings its own)
    base_channels: int = 32
    channel_mults: tuple[int, ...] = (1, 2, 4)
    blocks_per_level: int = 1
    disc_channels: int = 32
    # paired loss (the paper's: gradient + perceptual; plus L1)
    gradient_weight: float = 1.0
    perceptual: str | None = None  # None: "lpips" if lpips_weights is given, else "ms_ssim"
    perceptual_weight: float = 0.1
    l1_weight: float = 1.0
    lpips_weights: str | None = None
    # paired: a pix2pix-style PatchGAN term (0: off). Pixel losses alone regress unpredictable
    # fine detail to its mean, i.e. blur; the discriminator asks for teacher-like texture.
    adversarial_weight: float = 0.0
    # unpaired losses
    gan_weight: float = 1.0
    cycle_weight: float = 10.0
    identity_weight: float = 5.0
    # cadence, in steps (0: only at the end)
    val_every: int = 250
    sample_every: int = 500
    checkpoint_every: int = 500
    max_val_pairs: int = 512  # validation scores the first N val pairs by id
    affine_fit_pairs: int = 1024  # the affine baseline is fitted on N training pairs
    sample_pairs: int = 8
    # a wall-clock budget for this invocation: stop (validate, checkpoint, export) once it is
    # spent, even before `steps`; the lr schedule still follows `steps` / `lr_decay_steps`
    max_minutes: float | None = None
    # hardware
    mixed_precision: str = "no"  # "no" | "bf16" | "fp16"
    num_workers: int = 0

    def resolved(self) -> TrainConfig:
        """A copy with every default that depends on others filled in, checked."""
        if self.arch not in ARCHS:
            raise ValueError(f"arch must be one of {ARCHS}, got {self.arch!r}")
        if str(self.data).startswith("s3://"):
            raise ValueError(f"data must be a local directory, got {self.data!r}: sync the S3 dataset first")
        for name in ("steps", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.lr_schedule not in ("cosine", "constant"):
            raise ValueError(f"lr_schedule must be 'cosine' or 'constant', got {self.lr_schedule!r}")
        if self.mixed_precision not in ("no", "bf16", "fp16"):
            raise ValueError(f"mixed_precision must be 'no', 'bf16' or 'fp16', got {self.mixed_precision!r}")
        perceptual = self.perceptual or ("lpips" if self.lpips_weights else "ms_ssim")
        if perceptual not in PERCEPTUAL_LOSSES:
            raise ValueError(f"perceptual must be one of {PERCEPTUAL_LOSSES}, got {perceptual!r}")
        lr = self.lr if self.lr is not None else (1e-3 if self.arch == "unet-cbam" else 2e-4)
        return dataclasses.replace(
            self,
            data=str(self.data),
            out=str(self.out),
            perceptual=perceptual,
            lr=lr,
            warmup_steps=self.warmup_steps if self.warmup_steps is not None else min(100, self.steps // 20),
            lr_decay_steps=self.lr_decay_steps or self.steps,
            channel_mults=tuple(self.channel_mults),
        )


# --- helpers ---------------------------------------------------------------------------


def get_lr(step: int, config: TrainConfig) -> float:
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


@torch.no_grad()
def evaluate(
    network: RefinerUNet, dataset: PairDataset, config: TrainConfig, accelerator: Accelerator,
    affine: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> dict[str, float]:
    """Mean per-pair L1 to the teacher of the refined (clamped, as served) val images; with
    `affine`, also of the student and of the affine baseline."""
    was_training = network.training
    network.eval()
    sums = {"val_l1_refined": 0.0, "val_l1_student": 0.0, "val_l1_affine": 0.0}
    pairs = 0
    for batch in batched_pairs(dataset, config.max_val_pairs, config.batch_size):
        student = batch["student"].to(accelerator.device)
        teacher = batch["teacher"].to(accelerator.device)
        with accelerator.autocast():
            refined = network(student)
        per_pair = lambda x: (x.float().clamp(0, 1) - teacher).abs().mean(dim=(1, 2, 3))  # noqa: E731  (B,)
        sums["val_l1_refined"] += per_pair(refined).sum().item()
        if affine is not None:
            sums["val_l1_student"] += per_pair(student).sum().item()
            sums["val_l1_affine"] += per_pair(apply_affine(student, *affine)).sum().item()
        pairs += student.shape[0]
    network.train(was_training)
    keys = sums if affine is not None else ["val_l1_refined"]
    return {key: sums[key] / pairs for key in keys}


@torch.no_grad()
def save_sample_grid(
    network: RefinerUNet, dataset: PairDataset, config: TrainConfig, accelerator: Accelerator, path: Path
) -> None:
    """The first val pairs, one per row: student | refined | teacher, as evaluation draws them."""
    was_training = network.training
    network.eval()
    samples = []
    for batch in batched_pairs(dataset, config.sample_pairs, config.batch_size):
        student = batch["student"].to(accelerator.device)
        with accelerator.autocast():
            refined = network(student).float().clamp(0, 1)
        samples += zip(batch["pair_id"], student.cpu(), refined.cpu(), batch["teacher"])
    network.train(was_training)
    sample_grid(path, samples)


def _rewrite_metrics(path: Path, up_to_step: int) -> None:
    """On resume: drop rows after the checkpoint's step (they will be trained again)."""
    if not path.is_file():
        return
    with path.open(newline="") as f:
        reader = csv.DictReader(f)
        fieldnames, rows = reader.fieldnames, [row for row in reader if int(row["step"]) <= up_to_step]
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fieldnames)
        writer.writeheader()
        writer.writerows(rows)


def _jsonable(config: TrainConfig) -> dict[str, Any]:
    values = asdict(config)
    values["channel_mults"] = list(values["channel_mults"])
    return values


# --- training --------------------------------------------------------------------------


def train(config: TrainConfig) -> Path:
    """Train, validate, checkpoint and export; returns the exported refiner's directory."""
    config = config.resolved()
    out = Path(config.out)
    paired = config.arch == "unet-cbam"

    # 1. Accelerator and seed: same seed, same initial weights on every process.
    accelerator = Accelerator(mixed_precision=config.mixed_precision)
    main = accelerator.is_main_process
    set_seed(config.seed)
    checkpoint_path = out / CHECKPOINT
    if checkpoint_path.exists() and not config.resume:
        raise FileExistsError(f"{checkpoint_path} exists: pass resume to continue that run, or another out")

    # 2. Data: the training split (cropped, seeded), the val split at full resolution, and a
    #    crop-free view of the training split for fitting the affine baseline.
    train_set = PairDataset(config.data, "train", config.resolution, config.val_fraction,
                            seed=config.seed, unpaired=not paired)
    val_set = PairDataset(config.data, "val", None, config.val_fraction)
    if len(train_set) == 0 or len(val_set) == 0:
        raise ValueError(
            f"{config.data}: {len(train_set)} training and {len(val_set)} validation pairs at "
            f"val_fraction={config.val_fraction}; both splits need at least one pair"
        )
    affine = fit_affine(PairDataset(config.data, "train", None, config.val_fraction), config.affine_fit_pairs)

    # 3. Networks, losses and optimizers. `export` is the student -> teacher refiner.
    if config.init:
        refiner = RefinerUNet.from_pretrained(config.init, use_safetensors=True, local_files_only=True)
    else:
        refiner = RefinerUNet(base_channels=config.base_channels, channel_mults=config.channel_mults,
                              blocks_per_level=config.blocks_per_level)
    if paired:
        networks = {"refiner": refiner}
        loss_fn = PairedLoss(config.gradient_weight, config.perceptual, config.perceptual_weight,
                             config.l1_weight, config.lpips_weights).to(accelerator.device)
        optimizers = {"refiner": torch.optim.AdamW(refiner.parameters(), lr=config.lr, betas=(0.9, 0.99),
                                                   weight_decay=config.weight_decay)}
        if config.adversarial_weight > 0:
            networks["discriminator"] = PatchDiscriminator(config.disc_channels)
            optimizers["discriminator"] = torch.optim.Adam(networks["discriminator"].parameters(), lr=config.lr,
                                                           betas=(0.5, 0.999))
    else:
        generators, discriminators = build_cyclegan(config.arch, refiner, config.disc_channels)
        networks = {"generators": generators, "discriminators": discriminators}
        cycle_weights = CycleLossWeights(config.gan_weight, config.cycle_weight, config.identity_weight)
        optimizers = {
            name: torch.optim.Adam(net.parameters(), lr=config.lr, betas=(0.5, 0.999),
                                   weight_decay=config.weight_decay)
            for name, net in networks.items()
        }

    for name in networks:
        networks[name], optimizers[name] = accelerator.prepare(networks[name], optimizers[name])

    # 4. Resume: weights, optimizer moments, step, best-so-far and elapsed time. Loaded after
    #    `prepare`, so the optimizer's moments land on the device of its parameters.
    step, elapsed_before, best = 0, 0.0, None
    if config.resume and checkpoint_path.exists():
        checkpoint = torch.load(checkpoint_path, map_location="cpu", weights_only=True)
        if checkpoint["config"]["arch"] != config.arch:
            raise ValueError(f"{checkpoint_path} is a {checkpoint['config']['arch']} run, not {config.arch}")
        changed = {k: (v, getattr(config, k)) for k, v in checkpoint["config"].items()
                   if k in ("seed", "batch_size", "resolution", "data", "val_fraction")
                   and v != getattr(config, k)}
        if changed:
            logger.warning("resuming with changed settings (checkpoint, now): %s", changed)
        for name, net in networks.items():
            accelerator.unwrap_model(net).load_state_dict(checkpoint["model"][name])
        for name, optimizer in optimizers.items():
            optimizer.load_state_dict(checkpoint["optimizer"][name])
        step, elapsed_before, best = checkpoint["step"], checkpoint["elapsed_s"], checkpoint["best"]
        logger.info("resumed %s at step %d", checkpoint_path, step)
    elif config.resume:
        logger.info("no checkpoint at %s: starting a new run", checkpoint_path)

    def export_network() -> RefinerUNet:
        if paired:
            return accelerator.unwrap_model(networks["refiner"])
        return accelerator.unwrap_model(networks["generators"]).g_st

    # 5. The batch stream, from `step` on: the same batches a straight run would have seen.
    sampler = ResumableBatchSampler(len(train_set), config.batch_size, config.seed, start_step=step,
                                    num_replicas=accelerator.num_processes, rank=accelerator.process_index)
    loader = DataLoader(train_set, batch_sampler=sampler, collate_fn=collate_pairs,
                        num_workers=config.num_workers, pin_memory=accelerator.device.type == "cuda")
    batches = iter(loader)

    # 6. The run directory: config, metrics (cut back to the checkpoint on resume).
    metrics_path = out / METRICS
    columns = ["step", "lr", "loss"]
    if paired:
        columns += ["l1", "gradient", config.perceptual, "grad_norm"]
        columns += ["adversarial", "d_loss"] if config.adversarial_weight > 0 else []
    else:
        columns += ["gan", "cycle", "identity", "d_loss"]
    columns = [c for c in columns if c != "none"] + [*VAL_COLUMNS, "elapsed_s"]
    if main:
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.json").write_text(json.dumps(_jsonable(config), indent=2))
        if step:
            _rewrite_metrics(metrics_path, step)
        else:
            metrics_path.unlink(missing_ok=True)
    metrics_file = metrics_path.open("a", newline="") if main else None
    metrics = csv.DictWriter(metrics_file, fieldnames=columns, extrasaction="ignore") if main else None
    if main and metrics_file.tell() == 0:
        metrics.writeheader()

    # 7. Baselines and the starting point (identity, or --init) are the first best candidate.
    baselines: dict[str, float] = {}
    if main:
        scores = evaluate(export_network(), val_set, config, accelerator, affine)
        baselines = {k: scores[k] for k in ("val_l1_student", "val_l1_affine")}
        if best is None:
            best = {"step": 0, "val_l1": scores["val_l1_refined"],
                    "model": copy.deepcopy(export_network().state_dict())}
            metrics.writerow({"step": 0, **scores, "elapsed_s": 0.0})
        logger.info("val L1 to teacher: student %.5f, affine %.5f, start %.5f", baselines["val_l1_student"],
                    baselines["val_l1_affine"], scores["val_l1_refined"])

    def save_checkpoint(at_step: int, elapsed: float) -> None:
        if not main:
            return
        checkpoint = {
            "model": {name: accelerator.unwrap_model(net).state_dict() for name, net in networks.items()},
            "optimizer": {name: opt.state_dict() for name, opt in optimizers.items()},
            "step": at_step,
            "config": _jsonable(config),
            "best": best,
            "elapsed_s": elapsed,
        }
        tmp = checkpoint_path.with_suffix(".tmp")
        torch.save(checkpoint, tmp)
        tmp.replace(checkpoint_path)  # a crash mid-write never leaves half a checkpoint

    stopping = False  # set when the time budget is spent: the current step is the last

    def due(every: int, at_step: int) -> bool:
        return stopping or at_step == config.steps or (every > 0 and at_step % every == 0)

    # 8. The training loop.
    for net in networks.values():
        net.train()
    start_time = time.perf_counter()
    progress = tqdm(total=config.steps, initial=step, disable=not main, desc=f"train {config.arch}",
                    dynamic_ncols=True)
    last_val = best["val_l1"] if best else float("nan")
    while step < config.steps:
        # 8a. Learning rate for this step, the next batch.
        lr = get_lr(step, config)
        for optimizer in optimizers.values():
            for group in optimizer.param_groups:
                group["lr"] = lr
        batch = next(batches)
        student = batch["student"].to(accelerator.device, non_blocking=True)  # (B, 3, h, w)
        teacher = batch["teacher"].to(accelerator.device, non_blocking=True)

        if paired:
            # 8b. Paired: refine the student, compare with its own teacher.
            with accelerator.autocast():
                refined = networks["refiner"](student)
            loss, parts = loss_fn(refined, teacher)
            if "discriminator" in networks:
                with accelerator.autocast():
                    adversarial = lsgan_loss(networks["discriminator"](refined), real=True)
                loss = loss + config.adversarial_weight * adversarial
                parts["adversarial"] = adversarial.detach()
            optimizers["refiner"].zero_grad(set_to_none=True)
            accelerator.backward(loss)
            if config.grad_clip > 0:
                parts["grad_norm"] = accelerator.clip_grad_norm_(networks["refiner"].parameters(), config.grad_clip)
            optimizers["refiner"].step()
            if "discriminator" in networks:
                # The discriminator: teacher images are real, refined ones (detached) fake.
                with accelerator.autocast():
                    d_loss = 0.5 * (lsgan_loss(networks["discriminator"](teacher), real=True)
                                    + lsgan_loss(networks["discriminator"](refined.detach()), real=False))
                optimizers["discriminator"].zero_grad(set_to_none=True)
                accelerator.backward(d_loss)
                optimizers["discriminator"].step()
                parts["d_loss"] = d_loss.detach()
        else:
            # 8c. Unpaired: `teacher` belongs to another pair. Generators first: fool the
            #     discriminators, close both cycles, keep identities.
            with accelerator.autocast():
                outputs = networks["generators"](student, teacher, identity=config.identity_weight > 0)
                loss, parts = generator_loss(outputs, networks["discriminators"], student, teacher, cycle_weights)
            optimizers["generators"].zero_grad(set_to_none=True)
            accelerator.backward(loss)
            if config.grad_clip > 0:
                accelerator.clip_grad_norm_(networks["generators"].parameters(), config.grad_clip)
            optimizers["generators"].step()
            # Then the discriminators, on real images and the (detached) fakes. Their grads
            # from the generator loss above are dropped here.
            with accelerator.autocast():
                d_loss = discriminator_loss(outputs, networks["discriminators"], student, teacher)
            optimizers["discriminators"].zero_grad(set_to_none=True)
            accelerator.backward(d_loss)
            if config.grad_clip > 0:
                accelerator.clip_grad_norm_(networks["discriminators"].parameters(), config.grad_clip)
            optimizers["discriminators"].step()
            parts["d_loss"] = d_loss.detach()

        step += 1
        elapsed = elapsed_before + time.perf_counter() - start_time
        if config.max_minutes is not None and time.perf_counter() - start_time >= 60 * config.max_minutes:
            stopping = True
        loss_value = loss.item()
        if not math.isfinite(loss_value):
            raise FloatingPointError(f"loss is {loss_value} at step {step}; lower the lr or check the data")
        row = {"step": step, "lr": f"{lr:.3e}", "loss": f"{loss_value:.6f}", "elapsed_s": f"{elapsed:.2f}",
               **{k: f"{float(v):.6f}" for k, v in parts.items()}}

        # 8d. Validation, best weights, samples, checkpoint: main process only.
        if main and due(config.val_every, step):
            scores = evaluate(export_network(), val_set, config, accelerator)
            last_val = scores["val_l1_refined"]
            row.update({**baselines, **scores})
            # Paired training exports its best validation L1, the score it optimises. Unpaired
            # training optimises no paired score (and in use has no pairs to choose by), so it
            # exports its last weights, as CycleGAN does; val L1 is only reported for it.
            if last_val < best["val_l1"] or not paired:
                best = {"step": step, "val_l1": last_val, "model": copy.deepcopy(export_network().state_dict())}
        if main and due(config.sample_every, step):
            save_sample_grid(export_network(), val_set, config, accelerator,
                             out / "samples" / f"step_{step:06d}.png")
        if due(config.checkpoint_every, step):
            save_checkpoint(step, elapsed)
        if main:
            metrics.writerow(row)
            metrics_file.flush()
        accelerator.wait_for_everyone()
        progress.update(1)
        progress.set_postfix(loss=f"{loss_value:.4f}", val=f"{last_val:.4f}", refresh=False)
        if stopping:
            logger.info("time budget of %s minutes spent: stopping at step %d", config.max_minutes, step)
            break
    progress.close()
    if metrics_file:
        metrics_file.close()

    # 9. Export the chosen weights (best validation if paired, else the last) with a JSON card.
    export_dir = out / EXPORT
    if main:
        refiner = RefinerUNet.from_config(export_network().config)
        refiner.load_state_dict(best["model"])
        refiner.save_pretrained(export_dir)
        card = {
            "architecture": config.arch,
            "network": "RefinerUNet",
            "network_config": {k: v for k, v in refiner.config.items() if not k.startswith("_")},
            "parameters": count_parameters(refiner),
            "discriminator_parameters": (
                count_parameters(accelerator.unwrap_model(networks["discriminators"])) if not paired else None
            ),
            "perceptual_loss": config.perceptual if paired else None,
            "data": {
                "root": config.data,
                "pairs": len(train_set) + len(val_set),
                "train_pairs": len(train_set),
                "val_pairs": len(val_set),
                "val_pairs_scored": min(len(val_set), config.max_val_pairs),
                "val_fraction": config.val_fraction,
                "image_sizes": sorted(set(train_set.summary()["image_sizes"]) | set(val_set.summary()["image_sizes"])),
                "resolution": config.resolution,
            },
            "config": _jsonable(config),
            "metrics": {
                **baselines,
                "val_l1_refined": best["val_l1"],
                "best_step": best["step"],
                "exported": "best_val_l1" if paired else "last",
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
            "mixed_precision": config.mixed_precision,
            "torch": torch.__version__,
            "python": platform.python_version(),
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        }
        (export_dir / EXPORT_JSON).write_text(json.dumps(card, indent=2))
        logger.info("exported %s (val L1 %.5f at step %d; student %.5f, affine %.5f)", export_dir,
                    best["val_l1"], best["step"], baselines["val_l1_student"], baselines["val_l1_affine"])
    accelerator.wait_for_everyone()
    return export_dir


# --- command line ----------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    defaults = TrainConfig(data="", out="")
    p = argparse.ArgumentParser(prog="refinery train", description="Train a refiner on student/teacher pairs.")
    p.add_argument("--data", required=True, help="dataset directory (pairs/ and manifest/)")
    p.add_argument("--arch", choices=ARCHS, default=defaults.arch)
    p.add_argument("--out", required=True, help="run directory")
    p.add_argument("--steps", type=int, default=defaults.steps)
    p.add_argument("--batch-size", type=int, default=defaults.batch_size, help="per process")
    p.add_argument("--lr", type=float, default=None, help="default: 1e-3 (unet-cbam), 2e-4 (CycleGANs)")
    p.add_argument("--lr-schedule", choices=("cosine", "constant"), default=defaults.lr_schedule)
    p.add_argument("--warmup-steps", type=int, default=None, help="default: min(100, steps / 20)")
    p.add_argument("--resolution", type=int, default=None, help="training crop size (default: full images)")
    p.add_argument("--init", default=None, help="refiner directory to fine-tune from")
    p.add_argument("--seed", type=int, default=defaults.seed)
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its checkpoint")
    p.add_argument("--val-fraction", type=float, default=defaults.val_fraction)
    p.add_argument("--val-every", type=int, default=defaults.val_every)
    p.add_argument("--sample-every", type=int, default=defaults.sample_every)
    p.add_argument("--checkpoint-every", type=int, default=defaults.checkpoint_every)
    p.add_argument("--base-channels", type=int, default=defaults.base_channels)
    p.add_argument("--channel-mults", type=lambda s: tuple(int(x) for x in s.split(",")),
                   default=defaults.channel_mults, help="e.g. 1,2,4")
    p.add_argument("--blocks-per-level", type=int, default=defaults.blocks_per_level)
    p.add_argument("--perceptual", choices=PERCEPTUAL_LOSSES, default=None,
                   help="default: lpips with --lpips-weights, else ms_ssim")
    p.add_argument("--lpips-weights", default=None, help="local LPIPS (AlexNet + heads) weights file")
    p.add_argument("--gradient-weight", type=float, default=defaults.gradient_weight)
    p.add_argument("--perceptual-weight", type=float, default=defaults.perceptual_weight)
    p.add_argument("--l1-weight", type=float, default=defaults.l1_weight)
    p.add_argument("--adversarial-weight", type=float, default=defaults.adversarial_weight,
                   help="unet-cbam: weight of a PatchGAN term against blur (0: off)")
    p.add_argument("--gan-weight", type=float, default=defaults.gan_weight)
    p.add_argument("--cycle-weight", type=float, default=defaults.cycle_weight)
    p.add_argument("--identity-weight", type=float, default=defaults.identity_weight)
    p.add_argument("--max-minutes", type=float, default=None,
                   help="wall-clock budget for this invocation; stops early and exports")
    p.add_argument("--mixed-precision", choices=("no", "bf16", "fp16"), default=defaults.mixed_precision)
    p.add_argument("--num-workers", type=int, default=defaults.num_workers)
    return p


def config_from_args(argv: list[str] | None = None) -> TrainConfig:
    args = vars(build_parser().parse_args(argv))
    return TrainConfig(**args)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    config = config_from_args(argv)
    export_dir = train(config)
    card_path = export_dir / EXPORT_JSON
    if card_path.is_file():  # main process only
        card = json.loads(card_path.read_text())
        m = card["metrics"]
        print(f"refiner: {export_dir}")
        print(f"val L1 to teacher: student {m['val_l1_student']:.5f}  affine {m['val_l1_affine']:.5f}  "
              f"refined {m['val_l1_refined']:.5f} (step {m['best_step']}, "
              f"{m['refined_over_student']:.3f}x student, {m['refined_over_affine']:.3f}x affine)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
