"""What a training run is: `TrainConfig`, every field a `refinery train` option.

`TrainConfig.resolved()` fills in the defaults that depend on other fields and checks the
values, so the config saved in the run directory and in each checkpoint is the one that ran.
"""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass

from refiner.losses import GRADIENT_REFERENCES, PERCEPTUAL_LOSSES
from refiner.networks import CYCLEGAN_ARCHS

ARCHS = ("unet-cbam", *CYCLEGAN_ARCHS)


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
    # the gradient term's reference: "target" (the teacher's gradients) or "input" (the
    # student's, the review's GRAD(input, output)); to be measured, then the better made default
    gradient_against: str = "target"
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
        if self.gradient_against not in GRADIENT_REFERENCES:
            raise ValueError(f"gradient_against must be one of {GRADIENT_REFERENCES}, got {self.gradient_against!r}")
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
    p.add_argument(
        "--channel-mults",
        type=lambda s: tuple(int(x) for x in s.split(",")),
        default=defaults.channel_mults,
        help="e.g. 1,2,4",
    )
    p.add_argument("--blocks-per-level", type=int, default=defaults.blocks_per_level)
    p.add_argument(
        "--perceptual",
        choices=PERCEPTUAL_LOSSES,
        default=None,
        help="default: lpips with --lpips-weights, else ms_ssim",
    )
    p.add_argument("--lpips-weights", default=None, help="local LPIPS (AlexNet + heads) weights file")
    p.add_argument("--gradient-weight", type=float, default=defaults.gradient_weight)
    p.add_argument(
        "--gradient-against",
        choices=GRADIENT_REFERENCES,
        default=defaults.gradient_against,
        help="unet-cbam: compare the output's image gradients with the target's or the input's",
    )
    p.add_argument("--perceptual-weight", type=float, default=defaults.perceptual_weight)
    p.add_argument("--l1-weight", type=float, default=defaults.l1_weight)
    p.add_argument(
        "--adversarial-weight",
        type=float,
        default=defaults.adversarial_weight,
        help="unet-cbam: weight of a PatchGAN term against blur (0: off)",
    )
    p.add_argument("--gan-weight", type=float, default=defaults.gan_weight)
    p.add_argument("--cycle-weight", type=float, default=defaults.cycle_weight)
    p.add_argument("--identity-weight", type=float, default=defaults.identity_weight)
    p.add_argument(
        "--max-minutes", type=float, default=None, help="wall-clock budget for this invocation; stops early and exports"
    )
    p.add_argument("--mixed-precision", choices=("no", "bf16", "fp16"), default=defaults.mixed_precision)
    p.add_argument("--num-workers", type=int, default=defaults.num_workers)
    return p


def config_from_args(argv: list[str] | None = None) -> TrainConfig:
    args = vars(build_parser().parse_args(argv))
    return TrainConfig(**args)
