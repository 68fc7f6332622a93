"""Image-quality scores for evaluating a refiner against its teacher.

- paired: L1, PSNR and SSIM of an image against its own teacher image, per pair;
- detail: the radially averaged power spectrum of the grayscale image and the energy above
  a cutoff frequency, which is what a distilled model loses (skin texture, hair strands);
- distribution: FID and KID (torchmetrics) on features of one of two extractors: the FID
  InceptionV3 loaded from a local `pt_inception-2015-12-05` weights file (pytorch-fid's),
  or, without one, a fixed-seed random conv net whose values are *uncalibrated*: they rank
  refiners on one dataset but are not comparable with published FIDs.

Images are `(B, 3, H, W)` float tensors in [0, 1]. torchvision is not used (it breaks
diffusers here), so the InceptionV3 is built below with the weights file's module names.
"""

from __future__ import annotations

import math
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics.functional.image import structural_similarity_index_measure
from torchmetrics.image.fid import FrechetInceptionDistance
from torchmetrics.image.kid import KernelInceptionDistance

# ITU-R BT.601 luma: the detail scores look at brightness, where texture lives.
LUMA = torch.tensor([0.299, 0.587, 0.114])
# Energy above this radial frequency (cycles per pixel; Nyquist is 0.5) counts as high
# frequency: the upper half of the radial band.
HF_CUTOFF = 0.25
# The common frequency grid every image's spectrum is resampled onto, so images of any size
# average together. An image of side n resolves steps of 1 / n: at least 64 px resolves every point.
FREQUENCIES = np.linspace(0.5 / 32, 0.5, 32)
# PSNR of identical images is infinite; flooring the MSE caps it at 100 dB so it stays a number.
MIN_MSE = 1e-10


# --- paired and detail scores ---------------------------------------------------------------


def quantize(images: torch.Tensor) -> torch.Tensor:
    """Round to 8-bit levels: refined images are scored as they are served (PNG), like the
    student and teacher images they are compared with."""
    return images.clamp(0, 1).mul(255).round().div(255)


def paired_scores(images: torch.Tensor, targets: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per-image `l1`, `psnr` (dB) and `ssim` (Gaussian 11x11, sigma 1.5) against `targets`; each `(B,)`."""
    diff = images.double() - targets.double()
    mse = diff.square().mean(dim=(1, 2, 3)).clamp(min=MIN_MSE)
    ssim = structural_similarity_index_measure(images, targets, data_range=1.0, reduction="none")
    return {"l1": diff.abs().mean(dim=(1, 2, 3)), "psnr": -10 * torch.log10(mse), "ssim": ssim.double()}


def spectral_scores(images: torch.Tensor, cutoff: float = HF_CUTOFF) -> tuple[torch.Tensor, torch.Tensor]:
    """The radially averaged power spectrum of each grayscale image on `FREQUENCIES`, `(B, 32)`,
    and its high-frequency energy, `(B,)`: the share of pixel variance above `cutoff`.

    The mean is removed and a Hann window applied first, so the image's borders (a jump
    where the FFT wraps around) do not show up as high-frequency energy.
    """
    gray = (images.double() * LUMA.to(images.device, torch.float64).view(1, 3, 1, 1)).sum(1)  # (B, H, W)
    gray = gray - gray.mean(dim=(1, 2), keepdim=True)
    height, width = gray.shape[-2:]
    window = torch.outer(torch.hann_window(height, periodic=False, dtype=torch.float64),
                         torch.hann_window(width, periodic=False, dtype=torch.float64)).to(gray.device)
    # Power per coefficient, scaled so white noise of variance v has a flat spectrum ~ v.
    power = torch.fft.fft2(gray * window).abs().square() / (height * width)  # (B, H, W)
    radius = torch.sqrt(torch.fft.fftfreq(height, dtype=torch.float64)[:, None] ** 2
                        + torch.fft.fftfreq(width, dtype=torch.float64)[None, :] ** 2).to(gray.device)
    hf_energy = (power * (radius > cutoff)).sum(dim=(1, 2)) / (height * width)  # Parseval: a variance

    # Rings one frequency step (1 / shorter side) wide, up to Nyquist; corners beyond it are left out.
    side = min(height, width)
    ring = (radius * side).round().long().flatten()  # (H * W,)
    inside = ring <= side // 2
    counts = torch.bincount(ring[inside], minlength=side // 2 + 1).double()
    sums = torch.zeros(gray.shape[0], side // 2 + 1, dtype=torch.float64, device=gray.device)
    sums.index_add_(1, ring[inside], power.flatten(1)[:, inside])
    profile = (sums / counts).cpu().numpy()  # (B, side // 2 + 1)
    ring_freqs = np.arange(side // 2 + 1) / side
    spectra = np.stack([np.interp(FREQUENCIES, ring_freqs, row) for row in profile])
    return torch.from_numpy(spectra), hf_energy.cpu()


# --- feature extractors ---------------------------------------------------------------------


class RandomConvFeatures(nn.Module):
    """An uncalibrated stand-in for InceptionV3 when no weights file is at hand.

    Four stride-2 3x3 conv + ReLU stages with He-normal weights drawn from a fixed seed; the
    features are each stage's channel means (32 + 64 + 128 + 256 = 480). Random conv
    features separate image distributions (texture, sharpness, colour) surprisingly well,
    and the fixed seed makes values comparable between runs, but not with published FIDs.
    """

    def __init__(self, channels: tuple[int, ...] = (32, 64, 128, 256), seed: int = 0) -> None:
        super().__init__()
        generator = torch.Generator().manual_seed(seed)
        self.convs = nn.ModuleList()
        fan_in = 3
        for width in channels:
            conv = nn.Conv2d(fan_in, width, 3, stride=2, padding=1)
            with torch.no_grad():  # drawn from our generator, not the global one: same net every run
                conv.weight.copy_(torch.randn(conv.weight.shape, generator=generator) * math.sqrt(2 / (9 * fan_in)))
                conv.bias.zero_()
            self.convs.append(conv)
            fan_in = width
        self.num_features = sum(channels)
        self.name = f"random-conv-{self.num_features}-seed{seed} (uncalibrated)"
        self.requires_grad_(False).eval()

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x, features = 2 * images - 1, []
        for conv in self.convs:
            x = F.relu(conv(x))
            features.append(x.mean(dim=(2, 3)))
        return torch.cat(features, dim=1)  # (B, num_features)


class _ConvBN(nn.Module):
    """Conv (no bias), batch norm (eps 1e-3, as TensorFlow's), ReLU. The attribute names
    (`conv`, `bn`) and those of the blocks below are the weights file's keys."""

    def __init__(self, cin: int, cout: int, kernel: int | tuple[int, int], stride: int = 1,
                 padding: int | tuple[int, int] = 0) -> None:
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel, stride=stride, padding=padding, bias=False)
        self.bn = nn.BatchNorm2d(cout, eps=1e-3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.bn(self.conv(x)))


def _avg_pool(x: torch.Tensor) -> torch.Tensor:
    # TensorFlow's average pool, which the FID network was exported from, ignores the padding.
    return F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)


class _MixedA(nn.Module):  # 35 x 35
    def __init__(self, cin: int, pool_features: int) -> None:
        super().__init__()
        self.branch1x1 = _ConvBN(cin, 64, 1)
        self.branch5x5_1, self.branch5x5_2 = _ConvBN(cin, 48, 1), _ConvBN(48, 64, 5, padding=2)
        self.branch3x3dbl_1 = _ConvBN(cin, 64, 1)
        self.branch3x3dbl_2, self.branch3x3dbl_3 = _ConvBN(64, 96, 3, padding=1), _ConvBN(96, 96, 3, padding=1)
        self.branch_pool = _ConvBN(cin, pool_features, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([
            self.branch1x1(x),
            self.branch5x5_2(self.branch5x5_1(x)),
            self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
            self.branch_pool(_avg_pool(x)),
        ], dim=1)


class _MixedB(nn.Module):  # 35 x 35 -> 17 x 17
    def __init__(self, cin: int) -> None:
        super().__init__()
        self.branch3x3 = _ConvBN(cin, 384, 3, stride=2)
        self.branch3x3dbl_1 = _ConvBN(cin, 64, 1)
        self.branch3x3dbl_2, self.branch3x3dbl_3 = _ConvBN(64, 96, 3, padding=1), _ConvBN(96, 96, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([
            self.branch3x3(x),
            self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
            F.max_pool2d(x, 3, stride=2),
        ], dim=1)


class _MixedC(nn.Module):  # 17 x 17, factorised 7x7 convolutions
    def __init__(self, cin: int, c7: int) -> None:
        super().__init__()
        row, col = {"kernel": (1, 7), "padding": (0, 3)}, {"kernel": (7, 1), "padding": (3, 0)}
        self.branch1x1 = _ConvBN(cin, 192, 1)
        self.branch7x7_1, self.branch7x7_2 = _ConvBN(cin, c7, 1), _ConvBN(c7, c7, **row)
        self.branch7x7_3 = _ConvBN(c7, 192, **col)
        self.branch7x7dbl_1, self.branch7x7dbl_2 = _ConvBN(cin, c7, 1), _ConvBN(c7, c7, **col)
        self.branch7x7dbl_3, self.branch7x7dbl_4 = _ConvBN(c7, c7, **row), _ConvBN(c7, c7, **col)
        self.branch7x7dbl_5 = _ConvBN(c7, 192, **row)
        self.branch_pool = _ConvBN(cin, 192, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dbl = self.branch7x7dbl_3(self.branch7x7dbl_2(self.branch7x7dbl_1(x)))
        return torch.cat([
            self.branch1x1(x),
            self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x))),
            self.branch7x7dbl_5(self.branch7x7dbl_4(dbl)),
            self.branch_pool(_avg_pool(x)),
        ], dim=1)


class _MixedD(nn.Module):  # 17 x 17 -> 8 x 8
    def __init__(self, cin: int) -> None:
        super().__init__()
        self.branch3x3_1, self.branch3x3_2 = _ConvBN(cin, 192, 1), _ConvBN(192, 320, 3, stride=2)
        self.branch7x7x3_1 = _ConvBN(cin, 192, 1)
        self.branch7x7x3_2 = _ConvBN(192, 192, (1, 7), padding=(0, 3))
        self.branch7x7x3_3 = _ConvBN(192, 192, (7, 1), padding=(3, 0))
        self.branch7x7x3_4 = _ConvBN(192, 192, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b7 = self.branch7x7x3_3(self.branch7x7x3_2(self.branch7x7x3_1(x)))
        return torch.cat([
            self.branch3x3_2(self.branch3x3_1(x)),
            self.branch7x7x3_4(b7),
            F.max_pool2d(x, 3, stride=2),
        ], dim=1)


class _MixedE(nn.Module):  # 8 x 8
    def __init__(self, cin: int, max_pool: bool) -> None:
        super().__init__()
        self.max_pool = max_pool  # the FID network's last block max-pools (a quirk of its export)
        self.branch1x1 = _ConvBN(cin, 320, 1)
        self.branch3x3_1 = _ConvBN(cin, 384, 1)
        self.branch3x3_2a = _ConvBN(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3_2b = _ConvBN(384, 384, (3, 1), padding=(1, 0))
        self.branch3x3dbl_1, self.branch3x3dbl_2 = _ConvBN(cin, 448, 1), _ConvBN(448, 384, 3, padding=1)
        self.branch3x3dbl_3a = _ConvBN(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = _ConvBN(384, 384, (3, 1), padding=(1, 0))
        self.branch_pool = _ConvBN(cin, 192, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b3 = self.branch3x3_1(x)
        dbl = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        pooled = F.max_pool2d(x, 3, stride=1, padding=1) if self.max_pool else _avg_pool(x)
        return torch.cat([
            self.branch1x1(x),
            self.branch3x3_2a(b3), self.branch3x3_2b(b3),
            self.branch3x3dbl_3a(dbl), self.branch3x3dbl_3b(dbl),
            self.branch_pool(pooled),
        ], dim=1)


class InceptionV3FID(nn.Module):
    """The InceptionV3 of the FID reference implementation (TensorFlow's 2015-12-05 graph as
    ported by pytorch-fid), up to its 2048-d average pool. Takes images in [0, 1] of any
    size: resized to 299 x 299 (bilinear) and scaled to [-1, 1], as pytorch-fid does."""

    num_features = 2048

    def __init__(self) -> None:
        super().__init__()
        self.Conv2d_1a_3x3 = _ConvBN(3, 32, 3, stride=2)
        self.Conv2d_2a_3x3 = _ConvBN(32, 32, 3)
        self.Conv2d_2b_3x3 = _ConvBN(32, 64, 3, padding=1)
        self.Conv2d_3b_1x1 = _ConvBN(64, 80, 1)
        self.Conv2d_4a_3x3 = _ConvBN(80, 192, 3)
        self.Mixed_5b, self.Mixed_5c, self.Mixed_5d = _MixedA(192, 32), _MixedA(256, 64), _MixedA(288, 64)
        self.Mixed_6a = _MixedB(288)
        self.Mixed_6b, self.Mixed_6c = _MixedC(768, 128), _MixedC(768, 160)
        self.Mixed_6d, self.Mixed_6e = _MixedC(768, 160), _MixedC(768, 192)
        self.Mixed_7a = _MixedD(768)
        self.Mixed_7b, self.Mixed_7c = _MixedE(1280, max_pool=False), _MixedE(2048, max_pool=True)
        self.name = "inception-v3-fid"

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(images, size=(299, 299), mode="bilinear", align_corners=False) * 2 - 1
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))  # (B, 64, 147, 147)
        x = F.max_pool2d(x, 3, stride=2)
        x = F.max_pool2d(self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x)), 3, stride=2)  # (B, 192, 35, 35)
        for block in (self.Mixed_5b, self.Mixed_5c, self.Mixed_5d, self.Mixed_6a, self.Mixed_6b,
                      self.Mixed_6c, self.Mixed_6d, self.Mixed_6e, self.Mixed_7a, self.Mixed_7b, self.Mixed_7c):
            x = block(x)
        return x.mean(dim=(2, 3))  # (B, 2048)


def load_inception(path: str | Path) -> InceptionV3FID:
    """The FID InceptionV3 with weights from a local `pt_inception-2015-12-05-*.pth` (a plain
    state dict, as pytorch-fid downloads it). Its classifier (`fc.*`) is not needed and
    ignored; any other missing or unexpected key raises `ValueError`: a wrong file would
    otherwise give plausible-looking, meaningless FIDs."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no InceptionV3 weights file at {path}")
    state = torch.load(path, map_location="cpu", weights_only=True)
    state = {key: value for key, value in state.items() if not key.startswith("fc.")}
    network = InceptionV3FID()
    result = network.load_state_dict(state, strict=False)
    # Older exports lack BatchNorm's `num_batches_tracked` counters, which eval never reads.
    missing = [key for key in result.missing_keys if not key.endswith("num_batches_tracked")]
    if missing or result.unexpected_keys:
        raise ValueError(
            f"{path} is not a pt_inception-2015-12-05 state dict: missing {missing[:5]} "
            f"({len(missing)} in all), unexpected {result.unexpected_keys[:5]} ({len(result.unexpected_keys)} in all)"
        )
    network.name = f"inception-v3-fid ({path.name})"
    return network.requires_grad_(False).eval()


def build_extractor(inception_weights: str | Path | None) -> nn.Module:
    """The FID InceptionV3 when a weights file is given, else the uncalibrated random conv net.
    Either has `.name` (what `fid.extractor` records) and `.num_features`."""
    return load_inception(inception_weights) if inception_weights else RandomConvFeatures()


# --- distribution scores --------------------------------------------------------------------


class _Precomputed(nn.Module):
    """Hands torchmetrics features extracted beforehand: each image set feeds two FIDs and two
    KIDs, and running InceptionV3 once per image instead of four times is most of the cost."""

    def __init__(self, num_features: int) -> None:
        super().__init__()
        self.num_features = num_features

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return features


def fid_kid(real: torch.Tensor, fake: torch.Tensor, seed: int = 0) -> dict[str, float]:
    """FID and KID (mean and std over subsets) between `(N, D)` feature sets, by torchmetrics.

    KID's subsets hold `min(1000, N)` features, so small sets work (N >= 2); they are drawn
    from a fixed seed, without touching the caller's random state, so reruns agree.
    """
    if min(len(real), len(fake)) < 2:
        raise ValueError(f"FID and KID need at least 2 images per set, got {len(real)} and {len(fake)}")
    real, fake = real.double().cpu(), fake.double().cpu()
    fid = FrechetInceptionDistance(feature=_Precomputed(real.shape[1]))
    fid.update(real, real=True)
    fid.update(fake, real=False)
    with warnings.catch_warnings():  # "KID keeps all features in memory": yes, that is the point
        warnings.filterwarnings("ignore", message=".*will save all extracted features.*")
        kid = KernelInceptionDistance(feature=_Precomputed(real.shape[1]),
                                      subset_size=min(1000, len(real), len(fake)))
    kid.update(real, real=True)
    kid.update(fake, real=False)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        kid_mean, kid_std = kid.compute()
    return {"fid": fid.compute().item(), "kid": kid_mean.item(), "kid_std": kid_std.item()}


def fid_gap(fid_student: float, fid_refined: float) -> tuple[float, float | None]:
    """`(fiddiff, gap_closed)`: FIDdiff = FID(student, teacher) - FID(refined, teacher), and the
    share of the student's gap that the refiner closed, 1 - FID(refined, teacher) / FID(student,
    teacher) (1: refined is indistinguishable from the teacher, 0: no better than the student,
    negative: worse). With no gap to close (FID(student, teacher) <= 0) the share is `None`."""
    return fid_student - fid_refined, (1 - fid_refined / fid_student if fid_student > 0 else None)
