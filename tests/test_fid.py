"""FID against its closed form on Gaussians whose means and covariances are known.

For N(mu1, S1) and N(mu2, S2), FID = ||mu1 - mu2||^2 + Tr(S1 + S2 - 2 (S1 S2)^(1/2)). The
project computes FID from sample means and covariances of features (`refiner.metrics.fid`,
by torchmetrics; `frechet_distance`, the factorised form the bootstrap repeats), so on
10,000 samples it must land on the closed form within the estimator's sampling error.

The tolerance is derived from the sample size, not tuned: with n samples per set, the
squared-mean term is off by its bias Tr(S1)/n1 + Tr(S2)/n2 plus noise of standard deviation
about 2 sqrt(d^T (S1/n1 + S2/n2) d) (d = mu1 - mu2), and each covariance entry is off by
O(1/sqrt(n)), which moves the trace terms by about sqrt(2 (Tr(S1^2)/n1 + Tr(S2^2)/n2)). The
test allows the bias plus five of those standard deviations: under 10% of the FID here.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from refiner.metrics import fid, fid_kid, frechet_distance

D, N = 12, 10_000


def sqrt_psd(matrix: np.ndarray) -> np.ndarray:
    eigenvalues, vectors = np.linalg.eigh(matrix)
    return (vectors * np.sqrt(np.clip(eigenvalues, 0, None))) @ vectors.T


def closed_form_fid(mu1: np.ndarray, s1: np.ndarray, mu2: np.ndarray, s2: np.ndarray) -> float:
    """The closed form, with Tr((S1 S2)^(1/2)) = Tr((S1^(1/2) S2 S1^(1/2))^(1/2)) (same eigenvalues),
    a symmetric root computed here by numpy, independently of torchmetrics and `refiner.metrics`."""
    root1 = sqrt_psd(s1)
    cross = np.trace(sqrt_psd(root1 @ s2 @ root1))
    return float(np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * cross)


def tolerance(mu1: np.ndarray, s1: np.ndarray, mu2: np.ndarray, s2: np.ndarray, n1: int, n2: int) -> float:
    """The sample-size tolerance of the module docstring: bias + 5 standard deviations."""
    d = mu1 - mu2
    bias = np.trace(s1) / n1 + np.trace(s2) / n2
    mean_sd = 2 * np.sqrt(d @ (s1 / n1 + s2 / n2) @ d)
    covariance_sd = np.sqrt(2 * (np.trace(s1 @ s1) / n1 + np.trace(s2 @ s2) / n2))
    return float(bias + 5 * (mean_sd + covariance_sd))


def random_covariance(rng: np.random.Generator, scales: np.ndarray) -> np.ndarray:
    """A full covariance: the variances `scales` in a random orthonormal basis."""
    rotation, _ = np.linalg.qr(rng.normal(size=(len(scales), len(scales))))
    return (rotation * scales) @ rotation.T


def sample(rng: np.random.Generator, mu: np.ndarray, cov: np.ndarray, n: int) -> torch.Tensor:
    return torch.from_numpy(rng.multivariate_normal(mu, cov, size=n))  # (n, D) float64


@pytest.mark.parametrize("full", [False, True], ids=["diagonal", "full"])
def test_fid_matches_the_closed_form_on_known_gaussians(full: bool) -> None:
    rng = np.random.default_rng(0)
    mu1, mu2 = rng.normal(0, 1, D), rng.normal(0.5, 1, D)
    if full:
        s1 = random_covariance(rng, rng.uniform(0.2, 2.0, D))
        s2 = random_covariance(rng, rng.uniform(0.5, 3.0, D))
    else:
        s1, s2 = np.diag(rng.uniform(0.2, 2.0, D)), np.diag(rng.uniform(0.5, 3.0, D))
        # Diagonal covariances commute: the cross term is the sum of sqrt(a_i b_i), by hand.
        hand = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(np.diag(s1)) - np.sqrt(np.diag(s2))) ** 2)
        assert closed_form_fid(mu1, s1, mu2, s2) == pytest.approx(hand, rel=1e-12)
    expected = closed_form_fid(mu1, s1, mu2, s2)
    allowed = tolerance(mu1, s1, mu2, s2, N, N)
    assert allowed < 0.1 * expected  # the check is sharp, not vacuous

    real, fake = sample(rng, mu1, s1, N), sample(rng, mu2, s2, N)
    distance = fid(real, fake)
    assert distance == pytest.approx(expected, abs=allowed)
    # The bootstrap's factorised FID is the same estimator as torchmetrics', to rounding.
    assert frechet_distance(real, fake) == pytest.approx(distance, rel=1e-9)
    # float32 features (what the extractors return) give the same value: fid works in float64.
    assert fid(real.float(), fake.float()) == pytest.approx(distance, rel=1e-4)


def test_fid_of_a_distribution_against_itself_is_about_zero() -> None:
    rng = np.random.default_rng(1)
    mu = rng.normal(0, 1, D)
    cov = random_covariance(rng, rng.uniform(0.2, 2.0, D))
    first, second = sample(rng, mu, cov, N), sample(rng, mu, cov, N)
    # The same samples: exactly the same Gaussian, FID 0 up to rounding.
    assert abs(fid(first, first)) < 1e-8
    assert abs(frechet_distance(first, first)) < 1e-8
    # Two independent samples of one Gaussian: only the estimator's bias is left, about the
    # squared-mean term's Tr(S) (1/n1 + 1/n2) plus a covariance term of the same order.
    distance = fid(first, second)
    assert 0 <= distance < tolerance(mu, cov, mu, cov, N, N)
    # The distance grows with a known shift: moving one set by d adds ||d||^2.
    shift = np.full(D, 0.5)
    shifted = fid(first, second + torch.from_numpy(shift))
    assert shifted - distance == pytest.approx(np.sum(shift**2), abs=tolerance(mu, cov, mu + shift, cov, N, N))


def test_fid_and_kid_need_two_samples_per_set() -> None:
    with pytest.raises(ValueError, match="at least 2"):
        fid_kid(torch.zeros(1, D), torch.zeros(5, D))
