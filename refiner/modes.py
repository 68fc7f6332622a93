"""Training modes: what paired and unpaired training do differently, one class each, as
pix2pix keeps `Pix2PixModel` and `CycleGANModel` behind one `optimize_parameters()`.

`train()` asks every mode the same questions, so its loop has no branch on the mode:

    mode = MODES[config.arch](config, accelerator)   # networks and optimisers, prepared
    loss, parts = mode.step(student, teacher)         # one optimisation step; parts: mode.columns
    mode.refiner                                      # the student -> teacher network, unwrapped
    mode.keeps(val_l1, best_val_l1)                   # which validated weights to export
    mode.card()                                       # what the exported card says was trained

Networks and optimisers are kept by name (`mode.networks`, `mode.optimizers`): checkpoints
store them under those names.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from accelerate import Accelerator
from torch import nn

from refiner.building import BUILDING
from refiner.losses import (
    CycleLossWeights,
    PairedLoss,
    discriminator_loss,
    generator_loss,
    lsgan_loss,
    patch_discriminator_loss,
)
from refiner.networks import PatchDiscriminator, RefinerUNet, build_cyclegan, count_parameters

if TYPE_CHECKING:  # refiner.options derives its architectures from MODES
    from refiner.options import ResolvedConfig


class TrainingMode(ABC):
    """One way to train the student -> teacher refiner on a `ResolvedConfig`.

    The refiner is fresh, or `config.init`'s weights; `build` puts the networks around it.
    Every network is prepared by `accelerator` with its optimiser (DDP across processes):
    `step` runs the prepared ones, everything else reads the unwrapped ones.
    """

    unpaired: ClassVar[bool]  # whether a training student comes with another pair's teacher
    default_lr: ClassVar[float]
    exports: ClassVar[str]  # the card's name for what `keeps` chooses

    def __init__(self, config: ResolvedConfig, accelerator: Accelerator) -> None:
        self.config, self.accelerator = config, accelerator
        if config.init:
            with BUILDING:
                refiner = RefinerUNet.from_pretrained(config.init, use_safetensors=True, local_files_only=True)
        else:
            refiner = RefinerUNet(
                base_channels=config.base_channels,
                channel_mults=config.channel_mults,
                blocks_per_level=config.blocks_per_level,
            )
        # The student -> teacher network itself, which validation scores and export writes;
        # `step` trains it through the prepared (under DDP: wrapped) `networks`.
        self.refiner = refiner
        networks, optimizers = self.build(refiner)
        self.networks: dict[str, nn.Module] = {}
        self.optimizers: dict[str, torch.optim.Optimizer] = {}
        for name in networks:
            self.networks[name], self.optimizers[name] = accelerator.prepare(networks[name], optimizers[name])

    @abstractmethod
    def build(self, refiner: RefinerUNet) -> tuple[dict[str, nn.Module], dict[str, torch.optim.Optimizer]]:
        """The networks to train around `refiner`, and an optimiser for each, by name."""

    @property
    @abstractmethod
    def columns(self) -> list[str]:
        """The parts of the loss `step` returns, in `metrics.csv`'s order."""

    @abstractmethod
    def step(self, student: torch.Tensor, teacher: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        """One optimisation step on `(B, 3, h, w)` batches: the loss and its parts."""

    @abstractmethod
    def keeps(self, val_l1: float, best_val_l1: float) -> bool:
        """Whether the weights scoring `val_l1` replace the export candidate scoring `best_val_l1`."""

    @abstractmethod
    def card(self) -> dict[str, Any]:
        """What the exported card records about this mode's training."""


class PairedTraining(TrainingMode):
    """`unet-cbam`: the refiner learns from each student's own teacher (gradient, perceptual
    and L1 terms), with an optional pix2pix PatchGAN term against blur."""

    unpaired = False
    default_lr = 1e-3
    # The score it optimises, so the best validation L1 is the refiner to export.
    exports = "best_val_l1"

    def __init__(self, config: ResolvedConfig, accelerator: Accelerator) -> None:
        super().__init__(config, accelerator)
        self.loss = PairedLoss(
            gradient_weight=config.gradient_weight,
            perceptual=config.perceptual,
            perceptual_weight=config.perceptual_weight,
            l1_weight=config.l1_weight,
            lpips_weights=config.lpips_weights,
            gradient_against=config.gradient_against,
        ).to(accelerator.device)

    def build(self, refiner: RefinerUNet) -> tuple[dict[str, nn.Module], dict[str, torch.optim.Optimizer]]:
        config = self.config
        networks: dict[str, nn.Module] = {"refiner": refiner}
        optimizers: dict[str, torch.optim.Optimizer] = {
            "refiner": torch.optim.AdamW(
                refiner.parameters(), lr=config.lr, betas=(0.9, 0.99), weight_decay=config.weight_decay
            )
        }
        if config.adversarial_weight > 0:
            networks["discriminator"] = PatchDiscriminator(config.disc_channels)
            optimizers["discriminator"] = torch.optim.Adam(
                networks["discriminator"].parameters(), lr=config.lr, betas=(0.5, 0.999)
            )
        return networks, optimizers

    @property
    def columns(self) -> list[str]:
        perceptual = [] if self.config.perceptual == "none" else [self.config.perceptual]
        adversarial = ["adversarial", "d_loss"] if "discriminator" in self.networks else []
        return ["l1", "gradient", *perceptual, "grad_norm", *adversarial]

    def step(self, student: torch.Tensor, teacher: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        """Refine the student towards its own teacher; with a discriminator, also against blur."""
        config, accelerator = self.config, self.accelerator
        refiner, discriminator = self.networks["refiner"], self.networks.get("discriminator")
        # 1. The paired loss of the refined student against its teacher (the gradient term against
        #    the student itself with gradient_against="input"), (B, 3, h, w) each.
        with accelerator.autocast():
            refined = refiner(student)
        loss, parts = self.loss(refined, teacher, student)
        # 2. Adversarial (pix2pix): the refined image should pass for a teacher's.
        if discriminator is not None:
            with accelerator.autocast():
                adversarial = lsgan_loss(discriminator(refined), real=True)
            loss = loss + config.adversarial_weight * adversarial
            parts["adversarial"] = adversarial.detach()
        # 3. Update the refiner.
        self.optimizers["refiner"].zero_grad(set_to_none=True)
        accelerator.backward(loss)
        if config.grad_clip > 0:
            parts["grad_norm"] = accelerator.clip_grad_norm_(refiner.parameters(), config.grad_clip)
        self.optimizers["refiner"].step()
        # 4. Update the discriminator: teacher images real, refined ones fake.
        if discriminator is not None:
            with accelerator.autocast():
                d_loss = patch_discriminator_loss(discriminator, refined, teacher)
            self.optimizers["discriminator"].zero_grad(set_to_none=True)
            accelerator.backward(d_loss)
            self.optimizers["discriminator"].step()
            parts["d_loss"] = d_loss.detach()
        return loss, {name: float(value) for name, value in parts.items()}

    def keeps(self, val_l1: float, best_val_l1: float) -> bool:
        return val_l1 < best_val_l1

    def card(self) -> dict[str, Any]:
        return {
            "discriminator_parameters": (
                count_parameters(self.networks["discriminator"]) if "discriminator" in self.networks else None
            ),
            "perceptual_loss": self.config.perceptual,
            "gradient_against": self.config.gradient_against,
        }


class UnpairedTraining(TrainingMode):
    """`cyclegan` and `esa-cyclegan`: two generators (the refiner is student -> teacher) and
    two PatchGAN discriminators, trained on students and teachers of different pairs."""

    unpaired = True
    default_lr = 2e-4  # CycleGAN's
    # It optimises no paired score, and in use has no pairs to choose by: like CycleGAN, it
    # exports its last weights (val L1 is only reported).
    exports = "last"

    def __init__(self, config: ResolvedConfig, accelerator: Accelerator) -> None:
        super().__init__(config, accelerator)
        self.weights = CycleLossWeights(config.gan_weight, config.cycle_weight, config.identity_weight)

    def build(self, refiner: RefinerUNet) -> tuple[dict[str, nn.Module], dict[str, torch.optim.Optimizer]]:
        config = self.config
        generators, discriminators = build_cyclegan(config.arch, refiner, config.disc_channels)
        networks: dict[str, nn.Module] = {"generators": generators, "discriminators": discriminators}
        optimizers: dict[str, torch.optim.Optimizer] = {
            name: torch.optim.Adam(net.parameters(), lr=config.lr, betas=(0.5, 0.999), weight_decay=config.weight_decay)
            for name, net in networks.items()
        }
        return networks, optimizers

    @property
    def columns(self) -> list[str]:
        return ["gan", "cycle", "identity", "d_loss"]

    def step(self, student: torch.Tensor, teacher: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        """One CycleGAN step; `teacher` belongs to another pair than `student`."""
        config, accelerator = self.config, self.accelerator
        generators, discriminators = self.networks["generators"], self.networks["discriminators"]
        # 1. Generators: fool the discriminators, close both cycles, keep identities.
        with accelerator.autocast():
            outputs = generators(student, teacher, identity=config.identity_weight > 0)
            loss, parts = generator_loss(outputs, discriminators, student, teacher, self.weights)
        self.optimizers["generators"].zero_grad(set_to_none=True)
        accelerator.backward(loss)
        if config.grad_clip > 0:
            accelerator.clip_grad_norm_(generators.parameters(), config.grad_clip)
        self.optimizers["generators"].step()
        # 2. Discriminators, on real images and the (detached) fakes. Their grads from the
        #    generator loss above are dropped here.
        with accelerator.autocast():
            d_loss = discriminator_loss(outputs, discriminators, student, teacher)
        self.optimizers["discriminators"].zero_grad(set_to_none=True)
        accelerator.backward(d_loss)
        if config.grad_clip > 0:
            accelerator.clip_grad_norm_(discriminators.parameters(), config.grad_clip)
        self.optimizers["discriminators"].step()
        parts["d_loss"] = d_loss.detach()
        return loss, {name: float(value) for name, value in parts.items()}

    def keeps(self, val_l1: float, best_val_l1: float) -> bool:
        return True

    def card(self) -> dict[str, Any]:
        return {
            "discriminator_parameters": count_parameters(self.networks["discriminators"]),
            "perceptual_loss": None,
            "gradient_against": None,
        }


MODES: dict[str, type[TrainingMode]] = {
    "unet-cbam": PairedTraining,
    "cyclegan": UnpairedTraining,
    "esa-cyclegan": UnpairedTraining,
}
