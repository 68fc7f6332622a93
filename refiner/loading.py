"""Loading a trained refiner and running it at inference."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import torch

from refiner.network import RefinerUNet

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"


@dataclass
class Refiner:
    """A refiner network in eval mode, with the version that produced its weights.

    `version` is `"identity"` for the untrained network, else `"<dir name>@<sha256[:12]>"` of
    the weights file, so a result can be traced back to the exact weights that made it.
    """

    network: RefinerUNet
    version: str

    @torch.inference_mode()
    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        """Refine `(B, 3, H, W)` images in [0, 1]; returns them clamped to [0, 1], same shape.

        The images may live on any device and dtype: they run on the network's, and come
        back on their own.
        """
        x = images.to(device=self.network.device, dtype=self.network.dtype)
        refined = self.network(x).clamp_(0.0, 1.0)
        return refined.to(device=images.device, dtype=images.dtype)


def load_refiner(
    path: str | Path | None,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> Refiner:
    """Load the refiner saved by `RefinerUNet.save_pretrained` at `path`.

    With `path=None`, the refiner is a freshly built default network, which is the identity
    (its last conv is zero-initialised). Only safetensors weights are read, and only from
    local disk: a missing directory or file raises `FileNotFoundError` naming the path.
    """
    if path is None:
        # `.type` casts like `.to(dtype=...)`, minus diffusers' warning about fp32-only modules
        # that it prints on every dtype cast, even for a model that has none.
        network, version = RefinerUNet().type(dtype), "identity"
    else:
        path = Path(path)
        missing = [name for name in (CONFIG_NAME, WEIGHTS_NAME) if not (path / name).is_file()]
        if missing:
            raise FileNotFoundError(
                f"no refiner weights at {path}: missing {', '.join(missing)} "
                "(expected a directory written by RefinerUNet.save_pretrained)"
            )
        network = RefinerUNet.from_pretrained(
            path, dtype=dtype, use_safetensors=True, local_files_only=True
        )
        with (path / WEIGHTS_NAME).open("rb") as weights:
            digest = hashlib.file_digest(weights, "sha256").hexdigest()
        version = f"{path.resolve().name}@{digest[:12]}"
    network = network.to(device).eval()
    return Refiner(network=network, version=version)
