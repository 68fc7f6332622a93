"""Unpaired refiners: CycleGAN and our reading of ESA-CycleGAN.

CycleGAN (Zhu et al., 2017) learns student -> teacher without pairs: two generators
(student->teacher `g_st`, teacher->student `g_ts`), two discriminators (one per domain),
adversarial + cycle-consistency + identity losses. Wąsala et al. (arXiv 2505.02255) compare
it, and an "ESA-CycleGAN" variant, against their paired U-Net.

Choices here:
- Both generators are `RefinerUNet`s, so the exported student->teacher generator is a
  refiner like any other (`save_pretrained`, `refiner.load_refiner`, served by the worker).
  Being residual and zero-initialised, each starts as the identity, which suits two domains
  as close as schnell's and dev's outputs.
- Discriminators are 70x70-style PatchGANs (Isola et al., 2017): strided 4x4 convs with
  InstanceNorm and LeakyReLU, ending in one logit per overlapping patch, thinner than the
  original (`base_channels=32` instead of 64) to match the small generator.
- `esa-cyclegan`, **our reading of ESA-CycleGAN**: the paper gives no architecture we could
  follow, so we add one efficient self-attention block (Shen et al., "Efficient Attention:
  Attention with Linear Complexities", 2021) to each discriminator after its second
  downsampling, gated by a learned scalar that starts at 0 (as SAGAN does), so the
  discriminator starts as the plain PatchGAN and learns how much global context to use.
  Attention goes in the discriminator, not the generator, so the exported generator stays
  a plain `RefinerUNet`.
- No image history buffer (the original's pool of 50 generated images): every step uses
  the current generators' outputs, which keeps a resumed run identical to a straight one.

Both generators sit in one `CycleGenerators` module and both discriminators in one
`CycleDiscriminators`, each called once per optimisation step: DistributedDataParallel
(through `accelerate`) allows one forward per backward, and a parameter used several times
inside one forward is fine.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from refiner.losses import cycle_loss, identity_loss, lsgan_loss
from refiner.network import RefinerUNet

CYCLEGAN_ARCHS = ("cyclegan", "esa-cyclegan")


class EfficientSelfAttention(nn.Module):
    """Efficient attention (Shen et al., 2021): softmax over keys' positions and over queries'
    channels, so the (C, C) context is formed first and the cost is linear in H*W.

    `output = x + gamma * proj(attention(x))`, `gamma` starting at 0.
    """

    def __init__(self, channels: int, key_channels: int | None = None, heads: int = 1) -> None:
        super().__init__()
        key_channels = key_channels or max(channels // 2, heads)
        if key_channels % heads or channels % heads:
            raise ValueError(f"heads={heads} must divide channels={channels} and key_channels={key_channels}")
        self.heads = heads
        self.query = nn.Conv2d(channels, key_channels, 1)
        self.key = nn.Conv2d(channels, key_channels, 1)
        self.value = nn.Conv2d(channels, channels, 1)
        self.proj = nn.Conv2d(channels, channels, 1)
        self.gamma = nn.Parameter(torch.zeros(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        n = self.heads
        q = self.query(x).reshape(b, n, -1, h * w).softmax(dim=2)  # (B, n, dk, HW): over channels
        k = self.key(x).reshape(b, n, -1, h * w).softmax(dim=3)  # (B, n, dk, HW): over positions
        v = self.value(x).reshape(b, n, -1, h * w)  # (B, n, dv, HW)
        context = k @ v.transpose(2, 3)  # (B, n, dk, dv): a global summary per key channel
        attended = (context.transpose(2, 3) @ q).reshape(b, c, h, w)  # (B, C, H, W)
        return x + self.gamma * self.proj(attended)


class PatchDiscriminator(nn.Module):
    """PatchGAN: `(B, 3, H, W)` images in [0, 1] -> `(B, 1, H', W')` real/fake logits per patch.

    With `layers=3` each output sees a 70x70 receptive field; inputs need H, W >= 32 (the
    output is then at least 2x2; smaller ones leave InstanceNorm a single pixel). `attention=True` adds `EfficientSelfAttention` after the second downsampling.
    """

    def __init__(self, base_channels: int = 32, layers: int = 3, attention: bool = False) -> None:
        super().__init__()
        blocks: list[nn.Module] = [
            nn.Conv2d(3, base_channels, 4, stride=2, padding=1),  # first layer: no norm
            nn.LeakyReLU(0.2, inplace=True),
        ]
        width = base_channels
        for i in range(1, layers + 1):
            stride = 2 if i < layers else 1  # the last one keeps the resolution (70x70 field)
            out = base_channels * min(2**i, 8)
            blocks += [
                nn.Conv2d(width, out, 4, stride=stride, padding=1, bias=False),
                nn.InstanceNorm2d(out, affine=True),
                nn.LeakyReLU(0.2, inplace=True),
            ]
            width = out
            if attention and i == 1:
                blocks.append(EfficientSelfAttention(width))
        blocks.append(nn.Conv2d(width, 1, 4, stride=1, padding=1))
        self.net = nn.Sequential(*blocks)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.net(2 * images - 1)


@dataclass
class CycleOutputs:
    """What one pass of both generators produces, all `(B, 3, H, W)`."""

    fake_teacher: torch.Tensor  # g_st(student)
    fake_student: torch.Tensor  # g_ts(teacher)
    cycled_student: torch.Tensor  # g_ts(g_st(student))
    cycled_teacher: torch.Tensor  # g_st(g_ts(teacher))
    identity_teacher: torch.Tensor | None  # g_st(teacher); None without the identity loss
    identity_student: torch.Tensor | None  # g_ts(student)


class CycleGenerators(nn.Module):
    """The two generators; `g_st` (student -> teacher) is the refiner that gets exported."""

    def __init__(self, g_st: RefinerUNet, g_ts: RefinerUNet) -> None:
        super().__init__()
        self.g_st = g_st
        self.g_ts = g_ts

    def forward(self, student: torch.Tensor, teacher: torch.Tensor, identity: bool = True) -> CycleOutputs:
        # Each generator maps its own domain and, for the identity loss, the target domain,
        # in one batched call: (2B, 3, H, W).
        batch = student.shape[0]
        if identity:
            fake_teacher, identity_teacher = self.g_st(torch.cat([student, teacher])).split(batch)
            fake_student, identity_student = self.g_ts(torch.cat([teacher, student])).split(batch)
        else:
            fake_teacher, fake_student = self.g_st(student), self.g_ts(teacher)
            identity_teacher = identity_student = None
        return CycleOutputs(
            fake_teacher=fake_teacher,
            fake_student=fake_student,
            cycled_student=self.g_ts(fake_teacher),
            cycled_teacher=self.g_st(fake_student),
            identity_teacher=identity_teacher,
            identity_student=identity_student,
        )


class CycleDiscriminators(nn.Module):
    """One PatchGAN per domain; `forward(teacher_like, student_like)` scores both."""

    def __init__(self, base_channels: int = 32, attention: bool = False) -> None:
        super().__init__()
        self.d_teacher = PatchDiscriminator(base_channels, attention=attention)
        self.d_student = PatchDiscriminator(base_channels, attention=attention)

    def forward(self, teacher_like: torch.Tensor, student_like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.d_teacher(teacher_like), self.d_student(student_like)


def build_cyclegan(
    arch: str, generator: RefinerUNet, disc_channels: int = 32
) -> tuple[CycleGenerators, CycleDiscriminators]:
    """Generators and discriminators for `arch`; `generator` is the student->teacher refiner
    (fresh or fine-tuned from `--init`), and the reverse generator gets the same config."""
    if arch not in CYCLEGAN_ARCHS:
        raise ValueError(f"arch must be one of {CYCLEGAN_ARCHS}, got {arch!r}")
    g_ts = RefinerUNet.from_config(generator.config)
    generators = CycleGenerators(generator, g_ts)
    discriminators = CycleDiscriminators(disc_channels, attention=arch == "esa-cyclegan")
    return generators, discriminators


@dataclass
class CycleLossWeights:
    gan: float = 1.0
    cycle: float = 10.0
    identity: float = 5.0  # the original's 0.5 x cycle weight


def generator_loss(
    out: CycleOutputs,
    discriminators: nn.Module,
    student: torch.Tensor,
    teacher: torch.Tensor,
    weights: CycleLossWeights,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The generators' objective: fool both discriminators, close both cycles, keep identities."""
    # 1. Adversarial: both fakes should be scored real.
    pred_teacher, pred_student = discriminators(out.fake_teacher, out.fake_student)
    gan = lsgan_loss(pred_teacher, True) + lsgan_loss(pred_student, True)
    # 2. Cycle: student -> teacher -> student returns the student, and vice versa.
    cycle = cycle_loss(out.cycled_student, student) + cycle_loss(out.cycled_teacher, teacher)
    total = weights.gan * gan + weights.cycle * cycle
    parts = {"gan": gan.detach(), "cycle": cycle.detach()}
    # 3. Identity: a generator given an image already in its target domain leaves it alone.
    if out.identity_teacher is not None:
        identity = identity_loss(out.identity_teacher, teacher) + identity_loss(out.identity_student, student)
        total = total + weights.identity * identity
        parts["identity"] = identity.detach()
    return total, parts


def discriminator_loss(
    out: CycleOutputs, discriminators: nn.Module, student: torch.Tensor, teacher: torch.Tensor
) -> torch.Tensor:
    """The discriminators' objective: real images real, (detached) fakes fake; halved as in
    the original so D learns at half G's rate. Real and fake go through in one batch."""
    batch = student.shape[0]
    pred_teacher, pred_student = discriminators(
        torch.cat([teacher, out.fake_teacher.detach()]), torch.cat([student, out.fake_student.detach()])
    )
    real_t, fake_t = pred_teacher.split(batch)
    real_s, fake_s = pred_student.split(batch)
    loss_t = lsgan_loss(real_t, True) + lsgan_loss(fake_t, False)
    loss_s = lsgan_loss(real_s, True) + lsgan_loss(fake_s, False)
    return 0.5 * (loss_t + loss_s)


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


__all__ = [
    "CYCLEGAN_ARCHS",
    "CycleDiscriminators",
    "CycleGenerators",
    "CycleLossWeights",
    "CycleOutputs",
    "EfficientSelfAttention",
    "PatchDiscriminator",
    "build_cyclegan",
    "count_parameters",
    "discriminator_loss",
    "generator_loss",
]
