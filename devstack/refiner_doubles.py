"""Refiners made to order for tests and benchmarks of the rollout: one that blurs (a canary
the system must roll back) and a negligibly perturbed copy (a canary as good as stable)."""

from __future__ import annotations

import shutil
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from refiner.export import WEIGHTS_NAME
from refiner.networks import RefinerUNet


def blur(images: torch.Tensor, sigma: float = 1.5) -> torch.Tensor:
    """Separable Gaussian blur, (B, 3, H, W) -> same."""
    radius = 4
    taps = torch.arange(-radius, radius + 1.0).div(sigma).pow(2).mul(-0.5).exp()
    kernel = (taps / taps.sum()).repeat(3, 1, 1, 1)  # (3, 1, 1, 2r + 1)
    x = F.pad(images, (radius,) * 4, mode="reflect")
    x = F.conv2d(x, kernel, groups=3)
    return F.conv2d(x, kernel.transpose(2, 3), groups=3)


def blurring_refiner_network(steps: int = 150) -> RefinerUNet:
    """A deliberately broken refiner: a small U-Net trained to blur its input (a few seconds)."""
    torch.manual_seed(0)
    network = RefinerUNet(base_channels=8, channel_mults=(1, 2), norm_num_groups=4)
    optimizer = torch.optim.Adam(network.parameters(), 2e-3)
    for _ in range(steps):
        x = torch.rand(8, 3, 32, 32)
        loss = (network(x) - blur(x)).abs().mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return network.eval()


def perturbed_copy(source: Path, target: Path, scale: float = 1e-6, seed: int = 0) -> Path:
    """A copy of the exported refiner in ``source`` whose weights carry noise ``scale`` times
    their own size: other bytes, so another version, with the same behaviour."""
    shutil.copytree(source, target)
    generator = torch.Generator().manual_seed(seed)
    weights = load_file(source / WEIGHTS_NAME)
    noisy = {
        name: tensor + scale * tensor.abs().mean() * torch.randn(tensor.shape, generator=generator, dtype=tensor.dtype)
        if tensor.is_floating_point()
        else tensor
        for name, tensor in weights.items()
    }
    save_file(noisy, target / WEIGHTS_NAME, metadata={"format": "pt"})
    return target
