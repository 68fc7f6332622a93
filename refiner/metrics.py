"""Image-quality scores for evaluating a refiner against its teacher.

- paired: L1, PSNR and SSIM of an image against its own teacher image, per pair;
- detail: in `refiner.spectrum` (the worker scores every served image with it, and should
  not import torchmetrics for that);
- distribution: FID and KID (torchmetrics) on features extracted beforehand by one of
  `refiner.extractors` (calibrated InceptionV3, or uncalibrated random conv features).

Images are `(B, 3, H, W)` float tensors in [0, 1].
"""

from __future__ import annotations

import warnings

import numpy as np
import torch
from torch import nn
from torchmetrics.functional.image import structural_similarity_index_measure
from torchmetrics.image.fid import FrechetInceptionDistance
from torchmetrics.image.kid import KernelInceptionDistance

# PSNR of identical images is infinite; flooring the MSE caps it at 100 dB so it stays a number.
MIN_MSE = 1e-10


# --- paired scores ---------------------------------------------------------------------


def quantize(images: torch.Tensor) -> torch.Tensor:
    """Round to 8-bit levels: refined images are scored as they are served (PNG), like the
    student and teacher images they are compared with."""
    return images.clamp(0, 1).mul(255).round().div(255)


def paired_scores(images: torch.Tensor, targets: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per-image `l1`, `psnr` (dB) and `ssim` (Gaussian 11x11, sigma 1.5) against `targets`; each `(B,)`."""
    diff = images.double() - targets.double()
    mse = diff.square().mean(dim=(1, 2, 3)).clamp(min=MIN_MSE)
    # torchmetrics annotates one return type for all its flags: a tuple only with return_full_image.
    ssim: torch.Tensor = structural_similarity_index_measure(  # type: ignore[assignment]
        images, targets, data_range=1.0, reduction="none"
    )
    return {"l1": diff.abs().mean(dim=(1, 2, 3)), "psnr": -10 * torch.log10(mse), "ssim": ssim.double()}


# --- distribution scores --------------------------------------------------------------------


class _Precomputed(nn.Module):
    """Hands torchmetrics features extracted beforehand: each image set feeds two FIDs and two
    KIDs, and running InceptionV3 once per image instead of four times is most of the cost."""

    def __init__(self, num_features: int) -> None:
        super().__init__()
        self.num_features = num_features

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return features


def _check_sizes(real: torch.Tensor, fake: torch.Tensor) -> None:
    if min(len(real), len(fake)) < 2:
        raise ValueError(f"FID and KID need at least 2 images per set, got {len(real)} and {len(fake)}")


def fid(real: torch.Tensor, fake: torch.Tensor) -> float:
    """FID between `(N, D)` feature sets, by torchmetrics (in float64; N >= 2)."""
    _check_sizes(real, fake)
    metric = FrechetInceptionDistance(feature=_Precomputed(real.shape[1]))
    metric.update(real.double().cpu(), real=True)
    metric.update(fake.double().cpu(), real=False)
    return metric.compute().item()


def kid(real: torch.Tensor, fake: torch.Tensor, seed: int = 0) -> dict[str, float]:
    """KID's mean and std over subsets (`kid`, `kid_std`) between `(N, D)` feature sets, by
    torchmetrics. Its subsets hold `min(1000, N)` features, so small sets work (N >= 2); they
    are drawn from a fixed seed, without touching the caller's random state, so reruns agree.
    Its 100 subsets are the slow half of `fid_kid`: 3.7 s against FID's 0.01 s on 10,000
    12-dimensional features (one thread)."""
    _check_sizes(real, fake)
    with warnings.catch_warnings():  # "KID keeps all features in memory": yes, that is the point
        warnings.filterwarnings("ignore", message=".*will save all extracted features.*")
        metric = KernelInceptionDistance(
            feature=_Precomputed(real.shape[1]), subset_size=min(1000, len(real), len(fake))
        )
    metric.update(real.double().cpu(), real=True)
    metric.update(fake.double().cpu(), real=False)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        kid_mean, kid_std = metric.compute()
    return {"kid": kid_mean.item(), "kid_std": kid_std.item()}


def fid_kid(real: torch.Tensor, fake: torch.Tensor, seed: int = 0) -> dict[str, float]:
    """`fid`, `kid` and `kid_std` between `(N, D)` feature sets: what evaluation reports."""
    real, fake = real.double().cpu(), fake.double().cpu()  # once: both then take them as they are
    return {"fid": fid(real, fake), **kid(real, fake, seed)}


def fid_gap(fid_student: float, fid_refined: float) -> tuple[float, float | None]:
    """`(fiddiff, gap_closed)`: FIDdiff = FID(student, teacher) - FID(refined, teacher), and the
    share of the student's gap that the refiner closed, 1 - FID(refined, teacher) / FID(student,
    teacher) (1: refined is indistinguishable from the teacher, 0: no better than the student,
    negative: worse). With no gap to close (FID(student, teacher) <= 0) the share is `None`."""
    return fid_student - fid_refined, (1 - fid_refined / fid_student if fid_student > 0 else None)


# --- bootstrap intervals --------------------------------------------------------------------

# KID's polynomial kernel, as torchmetrics computes it: k(x, y) = (x . y / D + 1) ** 3.
KID_DEGREE, KID_COEF = 3, 1.0


def _gaussian_factor(features: torch.Tensor, weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Mean `(D,)`, covariance trace and a factor `L` with `L @ L.T` the covariance (unbiased,
    1 / (n - 1)) of `features` `(N, D)` where row i counts `weights[i]` times (a bootstrap
    resample). `L` is `(D, k)` with k = min(distinct rows, D), so the FID's matrix square
    root costs an SVD of at most a k x k matrix, not an eigendecomposition of D x D."""
    n = weights.sum()
    mean = (weights[:, None] * features).sum(0) / n
    used = weights > 0
    factor = ((features[used] - mean) * weights[used].sqrt()[:, None]).T / (n - 1).sqrt()  # (D, k)
    if factor.shape[1] > factor.shape[0]:  # more distinct rows than dimensions: the covariance's own root
        eigenvalues, vectors = torch.linalg.eigh(factor @ factor.T)
        factor = vectors * eigenvalues.clamp(min=0).sqrt()
    return mean, factor.square().sum(), factor


def _frechet(a: tuple[torch.Tensor, ...], b: tuple[torch.Tensor, ...]) -> float:
    """||mu_a - mu_b||^2 + Tr(S_a) + Tr(S_b) - 2 Tr((S_a S_b)^(1/2)), with Tr((S_a S_b)^(1/2))
    the nuclear norm of L_a^T L_b: the eigenvalues of S_a S_b = L_a L_a^T L_b L_b^T are those
    of (L_a^T L_b)(L_a^T L_b)^T, the squared singular values of L_a^T L_b."""
    (mean_a, trace_a, factor_a), (mean_b, trace_b, factor_b) = a, b
    cross = torch.linalg.svdvals(factor_a.T @ factor_b).sum()
    return ((mean_a - mean_b).square().sum() + trace_a + trace_b - 2 * cross).item()


def frechet_distance(real: torch.Tensor, fake: torch.Tensor) -> float:
    """FID between `(N, D)` feature sets, the same value as `fid_kid`'s (torchmetrics') up to
    rounding, computed through the factors of `_gaussian_factor`: cheap enough to repeat per
    bootstrap resample."""
    real, fake = real.double().cpu(), fake.double().cpu()
    ones = torch.ones(len(real), dtype=torch.float64), torch.ones(len(fake), dtype=torch.float64)
    return _frechet(_gaussian_factor(real, ones[0]), _gaussian_factor(fake, ones[1]))


def _kid_kernel(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return (x @ y.T / x.shape[1] + KID_COEF) ** KID_DEGREE


def _weighted_mmd(k_xx: torch.Tensor, k_yy: torch.Tensor, k_xy: torch.Tensor, weights: torch.Tensor) -> float:
    """KID's unbiased MMD^2 on the resample that takes pair k `weights[k]` times, from the kernel
    matrices of the full sets; with unit weights, exactly `poly_mmd` on the full sets.

    Two positions i != j of the resample holding the same pair are left out of every sum:
    KID's within-set sums skip i == j (k(x, x) is no evidence about two images), and its
    cross sum counts each pair's own k(x_i, y_i) once per position, not once per position
    of a copy. Counted in, a drawn-twice image would pull every resample's KID away from
    the full sample's.
    """
    m, ties = weights.sum(), weights.square()
    off_ties = m * m - ties.sum()  # positions i != j holding different pairs

    def mean_between_pairs(kernel: torch.Tensor) -> torch.Tensor:  # over positions holding different pairs
        return (weights @ kernel @ weights - ties @ kernel.diagonal()) / off_ties

    within = mean_between_pairs(k_xx) + mean_between_pairs(k_yy)
    cross = ((m * m - m) * mean_between_pairs(k_xy) + weights @ k_xy.diagonal()) / (m * m)
    return (within - 2 * cross).item()


def bootstrap_fid_kid(
    real: torch.Tensor, fakes: dict[str, torch.Tensor], resamples: int, seed: int = 0
) -> dict[str, dict[str, np.ndarray]]:
    """FID and KID of each fake set against `real` on `resamples` bootstrap resamples of the
    *pairs*: `(N, D)` feature sets whose row i all come from pair i. Each resample draws N pair
    indices with replacement and takes those rows from every set, so the pairing (same prompt,
    same seed) survives, and identical sets stay at distance 0. Returns `{name: {"fid": (B,),
    "kid": (B,)}}` in resample order, reproducible from `seed`.

    KID here is the unbiased MMD^2 on the whole resample, which is what `fid_kid`'s KID is
    for N <= 1000 (its subsets then hold every image); above that, the same quantity with
    less noise than 1000-image subsets.
    """
    n = len(real)
    if resamples < 1:
        raise ValueError(f"resamples must be >= 1, got {resamples}")
    if n < 2 or any(len(fake) != n for fake in fakes.values()):
        raise ValueError(f"bootstrap needs paired sets of >= 2 rows, got {n} and {[len(f) for f in fakes.values()]}")
    real = real.double().cpu()
    fakes = {name: fake.double().cpu() for name, fake in fakes.items()}
    k_real = _kid_kernel(real, real)  # (N, N) each: every resample's KID indexes these
    kernels = {name: (_kid_kernel(fake, fake), _kid_kernel(real, fake)) for name, fake in fakes.items()}
    generator = np.random.default_rng(seed)
    values = {name: {"fid": np.empty(resamples), "kid": np.empty(resamples)} for name in fakes}
    for b in range(resamples):
        counts = np.bincount(generator.integers(0, n, n), minlength=n)
        weights = torch.from_numpy(counts).double()  # (N,): how often each pair was drawn
        real_factor = _gaussian_factor(real, weights)
        for name, fake in fakes.items():
            values[name]["fid"][b] = _frechet(real_factor, _gaussian_factor(fake, weights))
            values[name]["kid"][b] = _weighted_mmd(k_real, kernels[name][0], kernels[name][1], weights)
    return values


def percentile_interval(values: np.ndarray, estimate: float, confidence: float = 0.95) -> list[float]:
    """`[lo, hi]`: the central `confidence` percentile interval of bootstrap `values`, after
    shifting them so that their median is `estimate` (the full-sample value).

    The shift is there because FID is biased upwards by the number of distinct images and a
    resample with replacement holds only ~63% of them: unshifted, the whole bootstrap
    distribution of FID can lie above the full-sample FID. The shift keeps the resampled
    spread, and its asymmetry, around the value that is reported.
    """
    tail = 100 * (1 - confidence) / 2
    shifted = np.asarray(values) - (np.median(values) - estimate)
    lo, hi = np.percentile(shifted, [tail, 100 - tail])
    return [float(lo), float(hi)]
