"""Training losses: the paper's paired loss, and the CycleGAN losses for unpaired training.

Paired (Wąsala et al., arXiv 2505.02255): a gradient loss, L1 between the image gradients
of the output and of a reference (edges and fine texture are where the distilled model
loses most), plus a perceptual loss. The reference is the target (`gradient_against="target"`,
the gradients the refiner should produce) or, as a review of the paper writes its loss,
GRAD(input, output) + LPIPS(target, output), the refiner's input (`"input"`: the gradient
term keeps the student's structure and the perceptual term pulls towards the teacher). The paper's perceptual loss is LPIPS, which needs
pretrained AlexNet/VGG weights that cannot be downloaded here; `PairedLoss` therefore
takes `perceptual="lpips"` only with a local weights file, and otherwise uses a weight-free
substitute, `perceptual="ms_ssim"` (1 - MS-SSIM, Wang et al. 2003). The two are named
apart everywhere (config, metrics columns, the exported refiner's JSON) so a run trained
without LPIPS never passes for one trained with it.

Unpaired (Zhu et al., 2017): least-squares GAN loss (LSGAN, Mao et al. 2017), cycle
consistency L1 and identity L1, combined into the generators' and the discriminators'
objectives.

All images are `(B, C, H, W)` in [0, 1].
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from refiner.extractors import LPIPSAlex
from refiner.networks import CycleOutputs

PERCEPTUAL_LOSSES = ("ms_ssim", "lpips", "none")
GRADIENT_REFERENCES = ("target", "input")  # what the output's gradients are compared with

# --- gradient loss ---------------------------------------------------------------------

_SOBEL_X = torch.tensor([[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]]) / 8.0


def image_gradients(images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Sobel gradients of each channel: two `(B, C, H, W)` maps (d/dx, d/dy).

    Replicate padding keeps the size and gives no false edge at the border.
    """
    channels = images.shape[1]
    kx = _SOBEL_X.to(images)
    kernel = torch.stack([kx, kx.T])[:, None].repeat(channels, 1, 1, 1)  # (2C, 1, 3, 3)
    padded = F.pad(images, (1, 1, 1, 1), mode="replicate")
    grads = F.conv2d(padded, kernel, groups=channels)  # (B, 2C, H, W): x, y per channel
    return grads[:, 0::2], grads[:, 1::2]


def gradient_loss(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean L1 distance between the Sobel gradients of `output` and `target` (a scalar)."""
    out_x, out_y = image_gradients(output)
    tgt_x, tgt_y = image_gradients(target)
    return 0.5 * (F.l1_loss(out_x, tgt_x) + F.l1_loss(out_y, tgt_y))


# --- MS-SSIM ---------------------------------------------------------------------------

# Wang, Simoncelli & Bovik (2003): the weight of each scale, finest first.
MS_SSIM_WEIGHTS = (0.0448, 0.2856, 0.3001, 0.2363, 0.1333)


def _gaussian_window(size: int, sigma: float, like: torch.Tensor) -> torch.Tensor:
    coords = torch.arange(size, dtype=like.dtype, device=like.device) - (size - 1) / 2
    g = torch.exp(-(coords**2) / (2 * sigma**2))
    return g / g.sum()  # (size,)


def _ssim_terms(x: torch.Tensor, y: torch.Tensor, window: torch.Tensor, data_range: float):
    """Per-image, per-channel mean SSIM and contrast-structure terms: two `(B, C)` tensors.

    Separable Gaussian filtering without padding ("valid"), as in the reference code.
    """
    channels, size = x.shape[1], window.numel()
    wx = window.view(1, 1, 1, size).repeat(channels, 1, 1, 1)
    wy = window.view(1, 1, size, 1).repeat(channels, 1, 1, 1)

    def blur(t: torch.Tensor) -> torch.Tensor:
        return F.conv2d(F.conv2d(t, wx, groups=channels), wy, groups=channels)

    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    mu_x, mu_y = blur(x), blur(y)
    var_x = blur(x * x) - mu_x**2
    var_y = blur(y * y) - mu_y**2
    cov = blur(x * y) - mu_x * mu_y
    cs = (2 * cov + c2) / (var_x + var_y + c2)
    luminance = (2 * mu_x * mu_y + c1) / (mu_x**2 + mu_y**2 + c1)
    return (luminance * cs).mean(dim=(-2, -1)), cs.mean(dim=(-2, -1))


def ms_ssim(
    x: torch.Tensor,
    y: torch.Tensor,
    data_range: float = 1.0,
    window_size: int = 11,
    sigma: float = 1.5,
    weights: Sequence[float] = MS_SSIM_WEIGHTS,
) -> torch.Tensor:
    """Multi-scale SSIM per image: a `(B,)` tensor, 1 for identical images.

    The reference MS-SSIM needs images of at least 161 px for five scales of an 11 px
    window. To work on training crops (32-256 px) this uses as many scales as fit: scale
    `k` is used while the image at that scale is still at least `window_size` px, the
    weights of the scales used are renormalised to sum to 1, and for images smaller than
    the window the window shrinks to the image (odd size). At 256 px and above it is the
    reference definition.
    """
    if x.shape != y.shape:
        raise ValueError(f"ms_ssim needs equal shapes, got {tuple(x.shape)} and {tuple(y.shape)}")
    # 1. How many scales fit, and the window that fits the smallest of them.
    side = min(x.shape[-2:])
    scales = 1
    while scales < len(weights) and side // 2**scales >= window_size:
        scales += 1
    size = min(window_size, side // 2 ** (scales - 1))
    size = max(size - (size + 1) % 2, 1)  # odd
    window = _gaussian_window(size, sigma * size / window_size if size < window_size else sigma, x)
    w = torch.tensor(weights[:scales], dtype=x.dtype, device=x.device)
    w = w / w.sum()

    # 2. Contrast-structure at every scale but the last, full SSIM at the last, each
    #    floored just above 0 (negative correlation) so the fractional powers stay finite.
    values = []
    for scale in range(scales):
        ssim, cs = _ssim_terms(x, y, window, data_range)
        values.append(ssim if scale == scales - 1 else cs)
        if scale < scales - 1:
            x = F.avg_pool2d(x, 2, ceil_mode=True)
            y = F.avg_pool2d(y, 2, ceil_mode=True)
    stacked = torch.stack(values, dim=-1).clamp(min=1e-4)  # (B, C, scales)
    return torch.prod(stacked**w, dim=-1).mean(dim=1)  # (B,)


# --- the paired loss -------------------------------------------------------------------


class PairedLoss(nn.Module):
    """`gradient_weight * gradient + perceptual_weight * perceptual + l1_weight * L1`.

    Args:
        gradient_weight: weight of the Sobel gradient L1 (the paper's gradient loss).
        perceptual: `"ms_ssim"` (1 - MS-SSIM, weight-free), `"lpips"` (needs
            `lpips_weights`) or `"none"`.
        perceptual_weight: its weight.
        l1_weight: weight of plain pixel L1 (optional in the paper; it anchors colour,
            which neither gradients nor MS-SSIM's structure terms pin down well).
        lpips_weights: local LPIPS weights file(s), see `LPIPSAlex`.
        gradient_against: `"target"` (the output's gradients against the target's) or
            `"input"` (against the refiner's input's, the review's GRAD(input, output)).

    `forward(output, target, source)` returns `(total, parts)`, `parts` a dict of detached
    scalar tensors named `gradient`, `l1` and `ms_ssim` or `lpips` (the unweighted terms);
    `source`, the refiner's input, is needed with `gradient_against="input"`.
    """

    def __init__(
        self,
        gradient_weight: float = 1.0,
        perceptual: str = "ms_ssim",
        perceptual_weight: float = 1.0,
        l1_weight: float = 1.0,
        lpips_weights: str | Path | Sequence[str | Path] | None = None,
        gradient_against: str = "target",
    ) -> None:
        super().__init__()
        if gradient_against not in GRADIENT_REFERENCES:
            raise ValueError(f"gradient_against must be one of {GRADIENT_REFERENCES}, got {gradient_against!r}")
        if perceptual not in PERCEPTUAL_LOSSES:
            raise ValueError(f"perceptual must be one of {PERCEPTUAL_LOSSES}, got {perceptual!r}")
        self.gradient_weight = gradient_weight
        self.gradient_against = gradient_against
        self.perceptual = perceptual
        self.perceptual_weight = perceptual_weight
        self.l1_weight = l1_weight
        self.lpips: LPIPSAlex | None = None
        if perceptual == "lpips":
            if lpips_weights is None:
                raise ValueError(
                    "perceptual='lpips' needs lpips_weights (a local weights file); use perceptual='ms_ssim' without one"
                )
            self.lpips = LPIPSAlex(lpips_weights)

    def forward(
        self, output: torch.Tensor, target: torch.Tensor, source: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        # Losses in fp32 even under autocast: SSIM's variances cancel badly in half precision.
        output, target = output.float(), target.float()
        reference = target
        if self.gradient_against == "input":
            if source is None:
                raise ValueError("gradient_against='input' needs source, the refiner's input")
            reference = source.float()
        parts = {"gradient": gradient_loss(output, reference), "l1": F.l1_loss(output, target)}
        if self.perceptual == "ms_ssim":
            parts["ms_ssim"] = 1 - ms_ssim(output, target).mean()
        elif self.lpips is not None:
            parts["lpips"] = self.lpips(output, target).mean()
        total = self.gradient_weight * parts["gradient"] + self.l1_weight * parts["l1"]
        if self.perceptual != "none":
            total = total + self.perceptual_weight * parts[self.perceptual]
        return total, {name: value.detach() for name, value in parts.items()}


# --- adversarial and CycleGAN losses ---------------------------------------------------


def lsgan_loss(prediction: torch.Tensor, real: bool) -> torch.Tensor:
    """Least-squares GAN loss: mean (D(x) - 1)^2 for `real`, mean D(x)^2 otherwise."""
    target = torch.ones_like(prediction) if real else torch.zeros_like(prediction)
    return F.mse_loss(prediction.float(), target.float())


def cycle_loss(reconstructed: torch.Tensor, original: torch.Tensor) -> torch.Tensor:
    """L1 between an image and its round trip through both generators."""
    return F.l1_loss(reconstructed.float(), original.float())


def identity_loss(mapped: torch.Tensor, original: torch.Tensor) -> torch.Tensor:
    """L1 between a target-domain image and what the generator makes of it (should be itself)."""
    return F.l1_loss(mapped.float(), original.float())


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
    if out.identity_teacher is not None and out.identity_student is not None:
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


def patch_discriminator_loss(discriminator: nn.Module, refined: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """The paired refiner's discriminator objective (pix2pix): teacher images real, (detached)
    refined ones fake; halved so D learns at half the refiner's rate."""
    real = lsgan_loss(discriminator(teacher), True)
    fake = lsgan_loss(discriminator(refined.detach()), False)
    return 0.5 * (real + fake)
