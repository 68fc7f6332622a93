"""The networks: the refiner U-Net, and the PatchGAN discriminators and CycleGAN generators
that train it adversarially.

The refiner follows the pairwise image-to-image head of Wąsala et al., "Enhancing AI Face
Realism" (arXiv 2505.02255): a U-Net whose blocks are residual and carry a Convolutional Block
Attention Module (Woo et al., 2018), trained to turn FLUX.1-schnell portraits into
FLUX.1-dev-looking ones. The network predicts a correction that is added to its input,
and its last convolution starts at zero, so an untrained refiner returns the image unchanged.

Unpaired training is CycleGAN (Zhu et al., 2017): two generators (student->teacher `g_st`,
teacher->student `g_ts`) and two discriminators, one per domain. Wąsala et al. compare it,
and an "ESA-CycleGAN" variant, against their paired U-Net. Choices here:
- Both generators are `RefinerUNet`s, so the exported student->teacher generator is a
  refiner like any other. Being residual and zero-initialised, each starts as the identity,
  which suits two domains as close as schnell's and dev's outputs.
- Discriminators are 70x70-style PatchGANs (Isola et al., 2017), thinner than the original
  (`base_channels=32` instead of 64) to match the small generator. The paired refiner can
  use one too, against the blur that pixel losses alone produce.
- `esa-cyclegan`, **our reading of ESA-CycleGAN**: the paper gives no architecture we could
  follow, so each discriminator gets one efficient self-attention block (Shen et al., 2021)
  after its second downsampling, gated by a learned scalar that starts at 0 (as SAGAN does),
  so it starts as the plain PatchGAN and learns how much global context to use. Attention
  goes in the discriminator, so the exported generator stays a plain `RefinerUNet`.
- No image history buffer (the original's pool of 50 generated images): every step uses
  the current generators' outputs, which keeps a resumed run identical to a straight one.

Both generators sit in one `CycleGenerators` module and both discriminators in one
`CycleDiscriminators`, each called once per optimisation step: DistributedDataParallel
(through `accelerate`) allows one forward per backward, and a parameter used several times
inside one forward is fine.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import torch
import torch.nn.functional as F
from diffusers import ConfigMixin, ModelMixin
from diffusers.configuration_utils import register_to_config
from torch import nn

CYCLEGAN_ARCHS = ("cyclegan", "esa-cyclegan")


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


# --- the refiner ----------------------------------------------------------------------------


class ChannelAttention(nn.Module):
    """Reweights channels from average- and max-pooled descriptors through one shared MLP."""

    def __init__(self, channels: int, reduction: int) -> None:
        super().__init__()
        hidden = max(channels // reduction, 1)
        self.mlp = nn.Sequential(
            nn.Conv2d(channels, hidden, 1),
            nn.ReLU(inplace=True),
            nn.Conv2d(hidden, channels, 1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # 1. Two (B, C, 1, 1) summaries of each channel: its mean and its strongest response.
        avg = self.mlp(F.adaptive_avg_pool2d(x, 1))
        peak = self.mlp(F.adaptive_max_pool2d(x, 1))
        # 2. One gate per channel, in (0, 1).
        return x * torch.sigmoid(avg + peak)


class SpatialAttention(nn.Module):
    """Reweights positions from a 7x7 conv over the channel-wise mean and max maps."""

    def __init__(self, kernel_size: int = 7) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 1, kernel_size, padding=kernel_size // 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # (B, 2, H, W): where the channels agree on average, and where any one peaks.
        maps = torch.cat([x.mean(dim=1, keepdim=True), x.amax(dim=1, keepdim=True)], dim=1)
        # One gate per pixel, shared by all channels.
        return x * torch.sigmoid(self.conv(maps))


class CBAM(nn.Module):
    """Convolutional Block Attention Module: channel attention, then spatial attention."""

    def __init__(self, channels: int, reduction: int) -> None:
        super().__init__()
        self.channel = ChannelAttention(channels, reduction)
        self.spatial = SpatialAttention()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.spatial(self.channel(x))


class ResidualBlock(nn.Module):
    """Two 3x3 convs with GroupNorm and SiLU, CBAM on the residual branch, then the skip.

    GroupNorm normalises each image on its own, so an image gives the same output alone or
    in a batch (BatchNorm would not).
    """

    def __init__(self, in_channels: int, out_channels: int, groups: int, reduction: int) -> None:
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = nn.GroupNorm(groups, out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.attention = CBAM(out_channels, reduction)
        # A 1x1 projection only where the width changes (decoder blocks that take a skip).
        self.shortcut = nn.Identity() if in_channels == out_channels else nn.Conv2d(in_channels, out_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return self.shortcut(x) + self.attention(h)


class RefinerUNet(ModelMixin, ConfigMixin):
    r"""
    A lightweight residual U-Net that refines an RGB image: `output = input + delta`.

    Each level of the encoder runs `blocks_per_level` residual CBAM blocks and then halves the
    resolution with a strided conv; the decoder mirrors it, upsampling and concatenating the
    encoder's features of the same level. The full-resolution level is the widest in pixels,
    so it is kept thin (`base_channels`) and the width grows only as the resolution drops.
    The default config's cost next to FLUX.1-schnell's is measured by
    `benchmarks/refiner_cost.py` (`benchmarks/results/refiner_cost.json`).

    Parameters:
        in_channels (`int`, defaults to 3): Channels of the image in and out.
        base_channels (`int`, defaults to 32): Width of the full-resolution level.
        channel_mults (`tuple[int, ...]`, defaults to `(1, 2, 4)`):
            Width of each level as a multiple of `base_channels`; one level per entry, each
            at half the resolution of the one before.
        blocks_per_level (`int`, defaults to 1): Residual blocks per level, on each side.
        cbam_reduction (`int`, defaults to 8): Channel reduction of the CBAM channel MLP.
        norm_num_groups (`int`, defaults to 8): Groups of every GroupNorm; must divide each width.
    """

    @register_to_config
    def __init__(
        self,
        in_channels: int = 3,
        base_channels: int = 32,
        channel_mults: tuple[int, ...] = (1, 2, 4),
        blocks_per_level: int = 1,
        cbam_reduction: int = 8,
        norm_num_groups: int = 8,
    ) -> None:
        super().__init__()
        widths = [base_channels * mult for mult in channel_mults]
        block = partial(ResidualBlock, groups=norm_num_groups, reduction=cbam_reduction)

        self.conv_in = nn.Conv2d(in_channels, widths[0], 3, padding=1)

        # Encoder: residual blocks, then a strided conv to the next (half-resolution) level.
        self.down_blocks = nn.ModuleList(
            nn.Sequential(*(block(width, width) for _ in range(blocks_per_level))) for width in widths
        )
        self.downsamplers = nn.ModuleList(
            nn.Conv2d(cin, cout, 3, stride=2, padding=1) for cin, cout in zip(widths, widths[1:])
        )

        # Decoder, deepest level first: upsample to the level above, then blocks whose first
        # one takes the concatenated skip (twice the width) back to the level's width.
        self.upsamplers = nn.ModuleList(
            nn.Conv2d(cin, cout, 3, padding=1) for cin, cout in zip(widths[:0:-1], widths[-2::-1])
        )
        self.up_blocks = nn.ModuleList(
            nn.Sequential(block(2 * width, width), *(block(width, width) for _ in range(blocks_per_level - 1)))
            for width in widths[-2::-1]
        )

        self.norm_out = nn.GroupNorm(norm_num_groups, widths[0])
        self.conv_out = nn.Conv2d(widths[0], in_channels, 3, padding=1)
        # Zero-init: delta starts at 0, so an untrained refiner is exactly the identity and
        # training starts from "change nothing" rather than from noise.
        nn.init.zeros_(self.conv_out.weight)
        nn.init.zeros_(self.conv_out.get_parameter("bias"))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        r"""
        Args:
            images (`torch.Tensor`): `(B, C, H, W)` images in [0, 1]; any H and W.

        Returns:
            `torch.Tensor`: `(B, C, H, W)`, the input plus the predicted correction. It is not
            clamped: training needs the gradient everywhere, and callers clamp at inference.
        """
        # 1. Pad H and W up to a multiple of 2**(levels - 1) so every downsampling halves evenly.
        #    Reflect continues the image's texture; replicate covers images smaller than the pad.
        height, width = images.shape[-2:]
        multiple = 2 ** (len(self.down_blocks) - 1)
        pad_h, pad_w = -height % multiple, -width % multiple
        mode = "reflect" if min(height, width) > max(pad_h, pad_w) else "replicate"
        x = F.pad(images, (0, pad_w, 0, pad_h), mode=mode)  # (B, C, H', W')

        # 2. Encode, keeping each level's features for the decoder. Centre the input on 0.
        h = self.conv_in(2 * x - 1)  # (B, base_channels, H', W')
        skips = []
        for level, blocks in enumerate(self.down_blocks):
            h = blocks(h)
            if level < len(self.downsamplers):
                skips.append(h)
                h = self.downsamplers[level](h)  # (B, next width, H / 2, W / 2)

        # 3. Decode: upsample, concatenate the same-level skip, and refine.
        for upsample, blocks, skip in zip(self.upsamplers, self.up_blocks, reversed(skips)):
            h = upsample(F.interpolate(h, scale_factor=2.0, mode="nearest"))  # (B, width, 2H, 2W)
            h = blocks(torch.cat([h, skip], dim=1))

        # 4. Predict the correction, crop the padding away and add it to the input.
        delta = self.conv_out(F.silu(self.norm_out(h)))  # (B, C, H', W')
        return images + delta[..., :height, :width]


# --- adversarial training: discriminators and CycleGAN generators ----------------------


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
    output is then at least 2x2; smaller ones leave InstanceNorm a single pixel).
    `attention=True` adds `EfficientSelfAttention` after the second downsampling.
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
