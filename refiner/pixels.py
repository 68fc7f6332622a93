"""The one conversion between PIL images and tensors, for training data, reports and the worker.

Tensors are `(3, H, W)` floats in [0, 1]; images are 8-bit RGB. PIL does the decoding, so
torchvision is not needed (it breaks diffusers here).
"""

from __future__ import annotations

import torch
from PIL import Image


def to_tensor(image: Image.Image) -> torch.Tensor:
    """RGB image -> `(3, H, W)` float32 in [0, 1]."""
    if image.mode != "RGB":
        raise ValueError(f"image must be RGB, got mode {image.mode!r}: convert it first")
    pixels = torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8)  # (H * W * 3,)
    return pixels.view(image.height, image.width, 3).permute(2, 0, 1).float().div_(255)


def to_pil(image: torch.Tensor) -> Image.Image:
    """`(3, H, W)` float in [0, 1] -> RGB image, clamped then rounded to the nearest 8-bit level."""
    # In place after the one multiply, and permuted only once 8-bit: 3x less CPU at 1024²
    # than clamp-scale-round on fresh tensors (the same bytes: [0, 1] scaled is [0, 255]).
    pixels = image.mul(255).round_().clamp_(0, 255).to(torch.uint8)
    return Image.fromarray(pixels.permute(1, 2, 0).contiguous().numpy(), "RGB")  # (H, W, 3)
