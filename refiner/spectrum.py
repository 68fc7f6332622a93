"""Detail scores: the radially averaged power spectrum of an image's brightness, and the
energy above a cutoff frequency, which is what a distilled model loses (skin texture, hair
strands). Evaluation plots the spectra; the worker marks every served image with the
high-frequency energy, so this module needs nothing beyond torch and numpy.

Images are `(B, 3, H, W)` float tensors in [0, 1].
"""

from __future__ import annotations

import numpy as np
import torch

# ITU-R BT.601 luma: the detail scores look at brightness, where texture lives.
LUMA = torch.tensor([0.299, 0.587, 0.114])
# Energy above this radial frequency (cycles per pixel; Nyquist is 0.5) counts as high
# frequency: the upper half of the radial band.
HF_CUTOFF = 0.25
# The common frequency grid every image's spectrum is resampled onto, so images of any size
# average together. An image of side n resolves steps of 1 / n: at least 64 px resolves every point.
FREQUENCIES = np.linspace(0.5 / 32, 0.5, 32)


def _power_spectrum(images: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """The grayscale image's power per FFT coefficient, `(B, H, W)`, and each coefficient's
    radial frequency in cycles per pixel, `(H, W)`, computed in `dtype` on the images' device.

    The mean is removed and a Hann window applied first, so the image's borders (a jump
    where the FFT wraps around) do not show up as high-frequency energy.
    """
    gray = (images.to(dtype) * LUMA.to(images.device, dtype).view(1, 3, 1, 1)).sum(1)  # (B, H, W)
    gray = gray - gray.mean(dim=(1, 2), keepdim=True)
    height, width = gray.shape[-2:]
    window = torch.outer(
        torch.hann_window(height, periodic=False, dtype=dtype, device=gray.device),
        torch.hann_window(width, periodic=False, dtype=dtype, device=gray.device),
    )
    # Power per coefficient, scaled so white noise of variance v has a flat spectrum ~ v.
    power = torch.fft.fft2(gray * window).abs().square() / (height * width)  # (B, H, W)
    radius = torch.sqrt(
        torch.fft.fftfreq(height, dtype=dtype, device=gray.device)[:, None] ** 2
        + torch.fft.fftfreq(width, dtype=dtype, device=gray.device)[None, :] ** 2
    )
    return power, radius


def high_frequency_energy(images: torch.Tensor, cutoff: float = HF_CUTOFF) -> torch.Tensor:
    """Each image's energy above `cutoff`, `(B,)`: a variance (Parseval), in float32 on the
    images' own device. Cheap enough to score every served image."""
    power, radius = _power_spectrum(images, torch.float32)
    height, width = power.shape[-2:]
    return (power * (radius > cutoff)).sum(dim=(1, 2)) / (height * width)


def spectral_scores(images: torch.Tensor, cutoff: float = HF_CUTOFF) -> tuple[torch.Tensor, torch.Tensor]:
    """The radially averaged power spectrum of each grayscale image on `FREQUENCIES`, `(B, 32)`,
    and its high-frequency energy, `(B,)`: the share of pixel variance above `cutoff`.
    Both in float64, for evaluation.
    """
    power, radius = _power_spectrum(images, torch.float64)
    height, width = power.shape[-2:]
    hf_energy = (power * (radius > cutoff)).sum(dim=(1, 2)) / (height * width)  # Parseval: a variance

    # Rings one frequency step (1 / shorter side) wide, up to Nyquist; corners beyond it are left out.
    side = min(height, width)
    ring = (radius * side).round().long().flatten()  # (H * W,)
    inside = ring <= side // 2
    counts = torch.bincount(ring[inside], minlength=side // 2 + 1).double()
    sums = torch.zeros(power.shape[0], side // 2 + 1, dtype=torch.float64, device=power.device)
    sums.index_add_(1, ring[inside], power.flatten(1)[:, inside])
    profile = (sums / counts).cpu().numpy()  # (B, side // 2 + 1)
    ring_freqs = np.arange(side // 2 + 1) / side
    spectra = np.stack([np.interp(FREQUENCIES, ring_freqs, row) for row in profile])
    return torch.from_numpy(spectra), hf_energy.cpu()
