"""What a training run is: `TrainConfig`, and `refinery train`'s options generated from it.

Every field is an option (`--batch-size` for `batch_size`), typed, defaulted and described
by the field itself, so the command line cannot drift from the config. `resolved()` fills in
the defaults that depend on other fields and checks the values: the `ResolvedConfig` it
returns is what runs, and what the run directory and each checkpoint record.
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from refiner.losses import GRADIENT_REFERENCES, PERCEPTUAL_LOSSES
from refiner.modes import MODES

ARCHS = tuple(MODES)
MIXED_PRECISION = ("no", "bf16", "fp16")
LR_SCHEDULES = ("cosine", "constant")


def _option(default: Any, help: str, choices: Sequence[str] = ()) -> Any:
    """A field with a default; `help` and `choices` are its command-line option's."""
    return field(default=default, metadata={"help": help, "choices": tuple(choices)})


@dataclass(kw_only=True)
class TrainConfig:
    # data and run
    # `refinery train` mirrors an s3:// dataset first; `data` here is the local directory.
    data: str = field(metadata={"help": "pair dataset: a directory (pairs/ and manifest/), or s3://bucket/prefix"})
    out: str = field(metadata={"help": "run directory"})
    arch: str = _option("unet-cbam", "paired unet-cbam, or an unpaired CycleGAN", ARCHS)
    steps: int = _option(2000, "optimisation steps")
    batch_size: int = _option(16, "per process")
    resolution: int | None = _option(None, "training crop size; default: full images")
    seed: int = _option(0, "initial weights, batch order and crops (the split goes by pair id)")
    val_fraction: float = _option(0.1, "share of pairs held out for validation, by pair id")
    init: str | None = _option(None, "a refiner directory to fine-tune from")
    resume: bool = _option(False, "continue the run in --out from its checkpoint")
    # optimisation
    lr: float | None = _option(None, "default: the architecture's (default_lr in refiner/modes.py)")
    lr_schedule: str = _option("cosine", "cosine: warmup, then down to min_lr_ratio * lr", LR_SCHEDULES)
    warmup_steps: int | None = _option(None, "default: min(100, steps / 20)")
    lr_decay_steps: int | None = _option(None, "default: steps (set it to extend a run without changing the schedule)")
    min_lr_ratio: float = _option(0.1, "the cosine schedule's final lr, as a share of lr")
    weight_decay: float = _option(0.0, "the optimisers' weight decay")
    grad_clip: float = _option(1.0, "gradient norm clipping (0: off)")
    # network (ignored with init, which brings its own)
    base_channels: int = _option(32, "the refiner's first level's channels")
    channel_mults: tuple[int, ...] = _option((1, 2, 4), "channels per level, as multiples of base_channels")
    blocks_per_level: int = _option(1, "residual blocks per U-Net level")
    disc_channels: int = _option(32, "the PatchGAN discriminators' first layer's channels")
    # paired loss (the paper's: gradient + perceptual; plus L1)
    gradient_weight: float = _option(1.0, "unet-cbam: weight of the Sobel gradient L1")
    # "input" is the review's GRAD(input, output); to be measured, then the better made default
    gradient_against: str = _option(
        "target",
        "unet-cbam: compare the output's image gradients with the target's or the input's",
        GRADIENT_REFERENCES,
    )
    perceptual: str | None = _option(
        None, "unet-cbam: default lpips with --lpips-weights, else ms_ssim", PERCEPTUAL_LOSSES
    )
    perceptual_weight: float = _option(0.1, "unet-cbam: weight of the perceptual term")
    l1_weight: float = _option(1.0, "unet-cbam: weight of pixel L1")
    lpips_weights: str | None = _option(None, "a local LPIPS (AlexNet + heads) weights file")
    # Pixel losses alone regress unpredictable fine detail to its mean, i.e. blur; a
    # pix2pix-style discriminator asks for teacher-like texture.
    adversarial_weight: float = _option(0.0, "unet-cbam: weight of a PatchGAN term against blur (0: off)")
    # unpaired losses
    gan_weight: float = _option(1.0, "CycleGANs: weight of the adversarial terms")
    cycle_weight: float = _option(10.0, "CycleGANs: weight of the cycle-consistency terms")
    identity_weight: float = _option(5.0, "CycleGANs: weight of the identity terms (0: off)")
    # cadence, in steps
    val_every: int = _option(250, "validate every N steps (0: only at the end)")
    sample_every: int = _option(500, "write a sample grid every N steps (0: only at the end)")
    checkpoint_every: int = _option(500, "checkpoint every N steps (0: only at the end)")
    max_val_pairs: int = _option(512, "validation scores the first N val pairs by id")
    affine_fit_pairs: int = _option(1024, "the affine baseline is fitted on N training pairs")
    sample_pairs: int = _option(8, "val pairs in each sample grid")
    # The lr schedule still follows `steps` / `lr_decay_steps` when the budget stops a run.
    max_minutes: float | None = _option(
        None, "wall-clock budget for this invocation: stop (validate, checkpoint, export) once spent"
    )
    # hardware
    mixed_precision: str = _option("no", "autocast dtype", MIXED_PRECISION)
    num_workers: int = _option(0, "data loader worker processes")

    def resolved(self) -> ResolvedConfig:
        """A copy with every default that depends on others filled in, checked."""
        if self.arch not in ARCHS:
            raise ValueError(f"arch must be one of {ARCHS}, got {self.arch!r}")
        if str(self.data).startswith("s3://"):
            raise ValueError(
                f"data must be a local directory, got {self.data!r}: `refinery train` "
                "(or `accelerate launch -m cli train`) mirrors an s3:// dataset first"
            )
        for name in ("steps", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.lr_schedule not in LR_SCHEDULES:
            raise ValueError(f"lr_schedule must be one of {LR_SCHEDULES}, got {self.lr_schedule!r}")
        if self.mixed_precision not in MIXED_PRECISION:
            raise ValueError(f"mixed_precision must be one of {MIXED_PRECISION}, got {self.mixed_precision!r}")
        if self.gradient_against not in GRADIENT_REFERENCES:
            raise ValueError(f"gradient_against must be one of {GRADIENT_REFERENCES}, got {self.gradient_against!r}")
        perceptual = self.perceptual or ("lpips" if self.lpips_weights else "ms_ssim")
        if perceptual not in PERCEPTUAL_LOSSES:
            raise ValueError(f"perceptual must be one of {PERCEPTUAL_LOSSES}, got {perceptual!r}")
        values = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        return ResolvedConfig(
            **{
                **values,
                "data": str(self.data),
                "out": str(self.out),
                "perceptual": perceptual,
                "lr": self.lr if self.lr is not None else MODES[self.arch].default_lr,
                "warmup_steps": self.warmup_steps if self.warmup_steps is not None else min(100, self.steps // 20),
                "lr_decay_steps": self.lr_decay_steps or self.steps,
                "channel_mults": tuple(self.channel_mults),
            }
        )


@dataclass(kw_only=True)
class ResolvedConfig(TrainConfig):
    """A `TrainConfig` whose defaults that depend on other fields are filled in: what runs."""

    lr: float
    warmup_steps: int
    lr_decay_steps: int
    perceptual: str


def build_parser() -> argparse.ArgumentParser:
    """`refinery train`'s options: `--field-name` for each `TrainConfig` field."""
    parser = argparse.ArgumentParser(prog="refinery train", description="Train a refiner on student/teacher pairs.")
    hints = typing.get_type_hints(TrainConfig)
    for config_field in dataclasses.fields(TrainConfig):
        parser.add_argument(
            "--" + config_field.name.replace("_", "-"), **_argument(config_field, hints[config_field.name])
        )
    return parser


def _argument(config_field: dataclasses.Field, hint: Any) -> dict[str, Any]:
    """`add_argument`'s keywords for one field: its type (`X | None` parses as X; a tuple
    of ints as `1,2,4`), default or required, choices and help."""
    help = config_field.metadata["help"]
    if config_field.default is dataclasses.MISSING:
        return {"required": True, "help": help}
    if hint is bool:
        # Flags are off by default (`resume`); a True default could not be switched off.
        assert config_field.default is False, config_field.name
        return {"action": "store_true", "help": help}
    if isinstance(hint, types.UnionType):
        (hint,) = (arg for arg in typing.get_args(hint) if arg is not type(None))
    if typing.get_origin(hint) is tuple:
        default = ",".join(map(str, config_field.default))
        parse: Any = _int_tuple
    else:
        default, parse = config_field.default, hint
    if default is not None:
        help = f"{help} (default: {default})"
    kwargs = {"type": parse, "default": config_field.default, "help": help.replace("%", "%%")}
    if config_field.metadata["choices"]:
        kwargs["choices"] = config_field.metadata["choices"]
    return kwargs


def _int_tuple(text: str) -> tuple[int, ...]:
    return tuple(int(x) for x in text.split(","))


def config_from_args(argv: list[str] | None = None) -> TrainConfig:
    return TrainConfig(**vars(build_parser().parse_args(argv)))
