"""The ``noop`` preset's generator: correctly sized images for almost no CPU, so a benchmark
of the whole system (``benchmarks/ceiling.py``) measures the queue, the codecs and storage
alone. ``REFINERY_REFINER=noop`` is its refiner (``refiner.export.NoopRefiner``).

Jobs still take the production path: batcher, model thread, publish, encode, upload, record.
"""

from __future__ import annotations

from functools import lru_cache
from types import SimpleNamespace
from typing import Any

import torch
import torch.nn.functional as F


class NoopPipeline:
    """Called like ``FluxPipeline`` by ``worker.models.generate``.

    Each image is a window into one fixed texture per size, shifted by its seed: the same
    seed gives the same image, another seed another one, and the texture has a photo's mix
    of smooth areas and noise, so encoders do honest work on it. A call costs one copy of
    the windows into the batch.
    """

    def __call__(
        self, *, prompt: list[str], generator: list[torch.Generator], width: int, height: int, **_: Any
    ) -> SimpleNamespace:
        texture = _texture(height, width)  # (3, H, 2W)
        shifts = [g.initial_seed() % width for g in generator]
        return SimpleNamespace(images=torch.stack([texture[:, :, s : s + width] for s in shifts]))


@lru_cache(maxsize=4)
def _texture(height: int, width: int) -> torch.Tensor:
    """(3, H, 2W) in [0, 1], on 8-bit levels so that encoding loses nothing."""
    rng = torch.Generator().manual_seed(0)
    coarse = torch.rand(1, 3, max(2, height // 32), max(2, width // 16), generator=rng)
    smooth = F.interpolate(coarse, size=(height, 2 * width), mode="bicubic", align_corners=False)[0]
    grain = torch.randn(3, height, 2 * width, generator=rng) * 0.02
    return ((smooth + grain).clamp(0, 1) * 255).round() / 255
