"""The baseline every refiner must beat: the best global per-channel colour correction.

A refiner that only shifts colours is worth no more than ``teacher ~ a * student + b``;
training reports it and evaluation scores it beside the refiner.
"""

from __future__ import annotations

import numpy as np
import torch

from refiner.data import PairDataset


def fit_affine(dataset: PairDataset, count: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel least squares `teacher ~ a * student + b` over up to `count` pairs (evenly
    spaced through the split). Returns `a`, `b` as `(3,)` tensors."""
    indices = np.linspace(0, len(dataset) - 1, num=min(count, len(dataset))).round().astype(int)
    n = torch.zeros(3, dtype=torch.float64)
    sx, sy, sxx, sxy = (torch.zeros(3, dtype=torch.float64) for _ in range(4))
    for index in sorted(set(indices.tolist())):
        item = dataset[index]
        x = item["student"].double().flatten(1)  # (3, H*W)
        y = item["teacher"].double().flatten(1)
        n += x.shape[1]
        sx, sy = sx + x.sum(1), sy + y.sum(1)
        sxx, sxy = sxx + (x * x).sum(1), sxy + (x * y).sum(1)
    var = sxx / n - (sx / n) ** 2
    cov = sxy / n - (sx / n) * (sy / n)
    a = torch.where(var > 1e-12, cov / var.clamp(min=1e-12), torch.ones_like(var))
    b = sy / n - a * sx / n
    return a.float(), b.float()


def apply_affine(images: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    view = (1, -1, 1, 1)
    return (images * a.to(images).view(view) + b.to(images).view(view)).clamp(0, 1)
