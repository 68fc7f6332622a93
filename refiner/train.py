"""Train a refiner on student/teacher pairs: paired (`unet-cbam`) or unpaired (`cyclegan`,
`esa-cyclegan`). One loop, top to bottom, in the manner of nanoGPT's train.py.

    refinery train --data DIR --arch unet-cbam --out runs/r1 [--steps 2000 --batch-size 16 ...]
    accelerate launch -m refiner.train --data DIR --out runs/r1 --mixed-precision bf16   # GPUs

Built on `accelerate`: on a CPU it just runs; under `accelerate launch` every process trains
on its own slice of each batch (DDP) and the main process validates, writes and exports.
`batch_size` is per process. The options, one per `TrainConfig` field, are `refiner.options`.

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
from accelerate import Accelerator
from accelerate.utils import set_seed
from torch import nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from refiner.baseline import apply_affine, fit_affine
from refiner.data import PairDataset, ResumableBatchSampler, batched_pairs, collate_pairs
from refiner.export import export_refiner, read_card
from refiner.losses import (
    CycleLossWeights,
    PairedLoss,
    discriminator_loss,
    generator_loss,
    lsgan_loss,
    patch_discriminator_loss,
)
from refiner.networks import PatchDiscriminator, RefinerUNet, build_cyclegan, count_parameters
from refiner.options import TrainConfig, config_from_args
from refiner.report import sample_grid

logger = logging.getLogger(__name__)

CHECKPOINT = "checkpoint.pt"
METRICS = "metrics.csv"
EXPORT = "refiner"
VAL_COLUMNS = ("val_l1_student", "val_l1_affine", "val_l1_refined")

Networks = dict[str, nn.Module]
Optimizers = dict[str, torch.optim.Optimizer]


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


def due(every: int, step: int, config: TrainConfig, stopping: bool) -> bool:
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
    config: TrainConfig,
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


def data_card(config: TrainConfig, train_set: PairDataset, val_set: PairDataset) -> dict[str, Any]:
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


def _jsonable(config: TrainConfig) -> dict[str, Any]:
    values = asdict(config)
    values["channel_mults"] = list(values["channel_mults"])
    return values


# --- networks and checkpoints ----------------------------------------------------------


def build_networks(config: TrainConfig, accelerator: Accelerator) -> tuple[Networks, Optimizers]:
    """The run's networks and their optimizers by name, prepared by `accelerator`: `refiner`
    (and `discriminator` with an adversarial term) for `unet-cbam`, else `generators` and
    `discriminators`. The student -> teacher refiner is fresh, or `config.init`'s weights."""
    if config.init:
        refiner = RefinerUNet.from_pretrained(config.init, use_safetensors=True, local_files_only=True)
    else:
        refiner = RefinerUNet(
            base_channels=config.base_channels,
            channel_mults=config.channel_mults,
            blocks_per_level=config.blocks_per_level,
        )
    if config.arch == "unet-cbam":
        networks: Networks = {"refiner": refiner}
        optimizers: Optimizers = {
            "refiner": torch.optim.AdamW(
                refiner.parameters(), lr=config.lr, betas=(0.9, 0.99), weight_decay=config.weight_decay
            )
        }
        if config.adversarial_weight > 0:
            networks["discriminator"] = PatchDiscriminator(config.disc_channels)
            optimizers["discriminator"] = torch.optim.Adam(
                networks["discriminator"].parameters(), lr=config.lr, betas=(0.5, 0.999)
            )
    else:
        generators, discriminators = build_cyclegan(config.arch, refiner, config.disc_channels)
        networks = {"generators": generators, "discriminators": discriminators}
        optimizers = {
            name: torch.optim.Adam(net.parameters(), lr=config.lr, betas=(0.5, 0.999), weight_decay=config.weight_decay)
            for name, net in networks.items()
        }
    for name in networks:
        networks[name], optimizers[name] = accelerator.prepare(networks[name], optimizers[name])
    return networks, optimizers


def export_network(networks: Networks, accelerator: Accelerator) -> RefinerUNet:
    """The student -> teacher network: the paired refiner, or the CycleGAN's `g_st`."""
    if "refiner" in networks:
        return accelerator.unwrap_model(networks["refiner"])
    return accelerator.unwrap_model(networks["generators"]).g_st


def _candidate(step: int, val_l1: float, networks: Networks, accelerator: Accelerator) -> dict[str, Any]:
    """The weights to export, should nothing better come: `{step, val_l1, model}`."""
    return {"step": step, "val_l1": val_l1, "model": copy.deepcopy(export_network(networks, accelerator).state_dict())}


def save_checkpoint(
    path: Path,
    networks: Networks,
    optimizers: Optimizers,
    accelerator: Accelerator,
    config: TrainConfig,
    step: int,
    best: dict[str, Any],
    elapsed: float,
) -> None:
    checkpoint = {
        "model": {name: accelerator.unwrap_model(net).state_dict() for name, net in networks.items()},
        "optimizer": {name: opt.state_dict() for name, opt in optimizers.items()},
        "step": step,
        "config": _jsonable(config),
        "best": best,
        "elapsed_s": elapsed,
    }
    tmp = path.with_suffix(".tmp")
    torch.save(checkpoint, tmp)
    tmp.replace(path)  # a crash mid-write never leaves half a checkpoint


def load_checkpoint(
    path: Path, networks: Networks, optimizers: Optimizers, accelerator: Accelerator, config: TrainConfig
) -> tuple[int, float, dict[str, Any]]:
    """Restore weights and optimizer moments; returns the step, elapsed seconds and best-so-far.
    Call it after `prepare`, so the optimizer's moments land on the device of its parameters."""
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
    for name, net in networks.items():
        accelerator.unwrap_model(net).load_state_dict(checkpoint["model"][name])
    for name, optimizer in optimizers.items():
        optimizer.load_state_dict(checkpoint["optimizer"][name])
    return checkpoint["step"], checkpoint["elapsed_s"], checkpoint["best"]


# --- the run directory -----------------------------------------------------------------


def metric_columns(config: TrainConfig) -> list[str]:
    """`metrics.csv`'s columns: what `paired_step` or `cycle_step` logs, then validation."""
    columns = ["step", "lr", "loss"]
    if config.arch == "unet-cbam":
        columns += ["l1", "gradient", config.perceptual, "grad_norm"]
        columns += ["adversarial", "d_loss"] if config.adversarial_weight > 0 else []
    else:
        columns += ["gan", "cycle", "identity", "d_loss"]
    return [c for c in columns if c != "none"] + [*VAL_COLUMNS, "elapsed_s"]


def open_metrics(path: Path, columns: list[str], step: int) -> tuple[IO[str], csv.DictWriter]:
    """`metrics.csv` for appending: new for a new run; on resume, cut back to the checkpoint's
    step (later rows will be trained again)."""
    if step and path.is_file():
        with path.open(newline="") as f:
            reader = csv.DictReader(f)
            fieldnames, rows = reader.fieldnames, [row for row in reader if int(row["step"]) <= step]
        with path.open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=fieldnames)
            writer.writeheader()
            writer.writerows(rows)
    elif not step:
        path.unlink(missing_ok=True)
    file = path.open("a", newline="")
    metrics = csv.DictWriter(file, fieldnames=columns, extrasaction="ignore")
    if file.tell() == 0:
        metrics.writeheader()
    return file, metrics


# --- one optimisation step -------------------------------------------------------------


def paired_step(
    networks: Networks,
    optimizers: Optimizers,
    student: torch.Tensor,
    teacher: torch.Tensor,
    loss_fn: PairedLoss,
    config: TrainConfig,
    accelerator: Accelerator,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Refine the student towards its own teacher; with a discriminator, also against blur."""
    refiner, discriminator = networks["refiner"], networks.get("discriminator")
    # 1. The paired loss of the refined student against its teacher (the gradient term against
    #    the student itself with gradient_against="input"), (B, 3, h, w) each.
    with accelerator.autocast():
        refined = refiner(student)
    loss, parts = loss_fn(refined, teacher, student)
    # 2. Adversarial (pix2pix): the refined image should pass for a teacher's.
    if discriminator is not None:
        with accelerator.autocast():
            adversarial = lsgan_loss(discriminator(refined), real=True)
        loss = loss + config.adversarial_weight * adversarial
        parts["adversarial"] = adversarial.detach()
    # 3. Update the refiner.
    optimizers["refiner"].zero_grad(set_to_none=True)
    accelerator.backward(loss)
    if config.grad_clip > 0:
        parts["grad_norm"] = accelerator.clip_grad_norm_(refiner.parameters(), config.grad_clip)
    optimizers["refiner"].step()
    # 4. Update the discriminator: teacher images real, refined ones fake.
    if discriminator is not None:
        with accelerator.autocast():
            d_loss = patch_discriminator_loss(discriminator, refined, teacher)
        optimizers["discriminator"].zero_grad(set_to_none=True)
        accelerator.backward(d_loss)
        optimizers["discriminator"].step()
        parts["d_loss"] = d_loss.detach()
    return loss, {name: float(value) for name, value in parts.items()}


def cycle_step(
    networks: Networks,
    optimizers: Optimizers,
    student: torch.Tensor,
    teacher: torch.Tensor,
    config: TrainConfig,
    accelerator: Accelerator,
) -> tuple[torch.Tensor, dict[str, float]]:
    """One CycleGAN step; `teacher` belongs to another pair than `student`."""
    generators, discriminators = networks["generators"], networks["discriminators"]
    weights = CycleLossWeights(config.gan_weight, config.cycle_weight, config.identity_weight)
    # 1. Generators: fool the discriminators, close both cycles, keep identities.
    with accelerator.autocast():
        outputs = generators(student, teacher, identity=config.identity_weight > 0)
        loss, parts = generator_loss(outputs, discriminators, student, teacher, weights)
    optimizers["generators"].zero_grad(set_to_none=True)
    accelerator.backward(loss)
    if config.grad_clip > 0:
        accelerator.clip_grad_norm_(generators.parameters(), config.grad_clip)
    optimizers["generators"].step()
    # 2. Discriminators, on real images and the (detached) fakes. Their grads from the
    #    generator loss above are dropped here.
    with accelerator.autocast():
        d_loss = discriminator_loss(outputs, discriminators, student, teacher)
    optimizers["discriminators"].zero_grad(set_to_none=True)
    accelerator.backward(d_loss)
    if config.grad_clip > 0:
        accelerator.clip_grad_norm_(discriminators.parameters(), config.grad_clip)
    optimizers["discriminators"].step()
    parts["d_loss"] = d_loss.detach()
    return loss, {name: float(value) for name, value in parts.items()}


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

    # 2. Data: the training split (cropped, seeded; CycleGAN's teachers from other pairs), the
    #    val split at full resolution, and the affine baseline fitted on uncropped training pairs.
    train_set = PairDataset(
        config.data, "train", config.resolution, config.val_fraction, seed=config.seed, unpaired=not paired
    )
    val_set = PairDataset(config.data, "val", None, config.val_fraction)
    if len(train_set) == 0 or len(val_set) == 0:
        raise ValueError(
            f"{config.data}: {len(train_set)} training and {len(val_set)} validation pairs at "
            f"val_fraction={config.val_fraction}; both splits need at least one pair"
        )
    affine = fit_affine(PairDataset(config.data, "train", None, config.val_fraction), config.affine_fit_pairs)

    # 3. Networks and optimizers; the paired loss (the CycleGAN losses hold no state).
    networks, optimizers = build_networks(config, accelerator)
    loss_fn = None
    if paired:
        loss_fn = PairedLoss(
            gradient_weight=config.gradient_weight,
            perceptual=config.perceptual,
            perceptual_weight=config.perceptual_weight,
            l1_weight=config.l1_weight,
            lpips_weights=config.lpips_weights,
            gradient_against=config.gradient_against,
        ).to(accelerator.device)

    # 4. Resume: weights, optimizer moments, step, best-so-far and elapsed time.
    step, elapsed_before, best = 0, 0.0, None
    if config.resume and checkpoint_path.exists():
        step, elapsed_before, best = load_checkpoint(checkpoint_path, networks, optimizers, accelerator, config)
        logger.info("resumed %s at step %d", checkpoint_path, step)
    elif config.resume:
        logger.info("no checkpoint at %s: starting a new run", checkpoint_path)

    # 5. The batch stream, from `step` on: the same batches a straight run would have seen.
    sampler = ResumableBatchSampler(
        len(train_set),
        config.batch_size,
        config.seed,
        start_step=step,
        num_replicas=accelerator.num_processes,
        rank=accelerator.process_index,
    )
    loader = DataLoader(
        train_set,
        batch_sampler=sampler,
        collate_fn=collate_pairs,
        num_workers=config.num_workers,
        pin_memory=accelerator.device.type == "cuda",
    )
    batches = iter(loader)

    # 6. The run directory, then the baselines and the starting point (identity, or --init),
    #    which is the first candidate for export.
    baselines: dict[str, float] = {}
    metrics_file, metrics = None, None
    if main:
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.json").write_text(json.dumps(_jsonable(config), indent=2))
        metrics_file, metrics = open_metrics(out / METRICS, metric_columns(config), step)
        scores = validation_l1(export_network(networks, accelerator), val_set, config, accelerator, affine)
        baselines = {k: scores[k] for k in ("val_l1_student", "val_l1_affine")}
        if best is None:
            best = _candidate(0, scores["val_l1_refined"], networks, accelerator)
            metrics.writerow({"step": 0, **scores, "elapsed_s": 0.0})
        logger.info(
            "val L1 to teacher: student %.5f, affine %.5f, start %.5f",
            baselines["val_l1_student"],
            baselines["val_l1_affine"],
            scores["val_l1_refined"],
        )

    # 7. The training loop.
    for net in networks.values():
        net.train()
    start_time = time.perf_counter()
    stopping = False  # set when the time budget is spent: the current step is the last
    progress = tqdm(total=config.steps, initial=step, disable=not main, desc=f"train {config.arch}", dynamic_ncols=True)
    last_val = best["val_l1"] if best else float("nan")
    while step < config.steps:
        # 7a. Learning rate for this step, the next batch, one optimisation step.
        lr = get_lr(step, config)
        for optimizer in optimizers.values():
            for group in optimizer.param_groups:
                group["lr"] = lr
        batch = next(batches)
        student = batch["student"].to(accelerator.device, non_blocking=True)  # (B, 3, h, w)
        teacher = batch["teacher"].to(accelerator.device, non_blocking=True)
        if paired:
            loss, parts = paired_step(networks, optimizers, student, teacher, loss_fn, config, accelerator)
        else:
            loss, parts = cycle_step(networks, optimizers, student, teacher, config, accelerator)

        step += 1
        elapsed = elapsed_before + time.perf_counter() - start_time
        if config.max_minutes is not None and time.perf_counter() - start_time >= 60 * config.max_minutes:
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

        # 7b. Validation, the export candidate, samples, checkpoint: main process only.
        if main and due(config.val_every, step, config, stopping):
            scores = validation_l1(export_network(networks, accelerator), val_set, config, accelerator)
            last_val = scores["val_l1_refined"]
            row.update({**baselines, **scores})
            # Paired training exports its best validation L1, the score it optimises. Unpaired
            # training optimises no paired score (and in use has no pairs to choose by), so it
            # exports its last weights, as CycleGAN does; val L1 is only reported for it.
            if last_val < best["val_l1"] or not paired:
                best = _candidate(step, last_val, networks, accelerator)
        if main and due(config.sample_every, step, config, stopping):
            save_sample_grid(
                export_network(networks, accelerator),
                val_set,
                config,
                accelerator,
                out / "samples" / f"step_{step:06d}.png",
            )
        if main and due(config.checkpoint_every, step, config, stopping):
            save_checkpoint(checkpoint_path, networks, optimizers, accelerator, config, step, best, elapsed)
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

    # 8. Export the chosen weights (best validation if paired, else the last) with their card.
    export_dir = out / EXPORT
    if main:
        refiner = RefinerUNet.from_config(export_network(networks, accelerator).config)
        refiner.load_state_dict(best["model"])
        export_refiner(
            export_dir,
            refiner,
            config.arch,
            {
                "discriminator_parameters": (
                    None if paired else count_parameters(accelerator.unwrap_model(networks["discriminators"]))
                ),
                "perceptual_loss": config.perceptual if paired else None,
                "gradient_against": config.gradient_against if paired else None,
                "data": data_card(config, train_set, val_set),
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
    card = read_card(export_dir)
    if card:  # main process only
        m = card["metrics"]
        print(f"refiner: {export_dir}")
        print(
            f"val L1 to teacher: student {m['val_l1_student']:.5f}  affine {m['val_l1_affine']:.5f}  "
            f"refined {m['val_l1_refined']:.5f} (step {m['best_step']}, "
            f"{m['refined_over_student']:.3f}x student, {m['refined_over_affine']:.3f}x affine)"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
