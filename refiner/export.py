"""A trained refiner on disk: its file names, its card, and loading it for inference.

    <dir>/config.json                          RefinerUNet's config (diffusers)
    <dir>/diffusion_pytorch_model.safetensors  its weights
    <dir>/refiner.json                         the card: architecture, training data, metrics

Training writes the directory (`export_refiner`); evaluation reads the card (`read_card`) to
score on the split training held out, and adds its headline scores to it (`record_evaluation`),
which `refinery refiner publish` requires; the worker serves the weights (`load_refiner`).
"""

from __future__ import annotations

import hashlib
import json
import platform
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch

from refiner.building import BUILDING
from refiner.networks import RefinerUNet, count_parameters
from refiner.pixels import to_8bit
from refiner.spectrum import high_frequency_energy

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
CARD_NAME = "refiner.json"
IDENTITY = "identity"  # the version of the untrained refiner, which returns its input
NOOP = "noop"  # the free refiner: returns its input without running anything (NoopRefiner)


@dataclass
class Refiner:
    """A refiner network in eval mode, with the version that produced its weights.

    `version` is `IDENTITY` for the untrained network, else `"<dir name>@<sha256[:12]>"` of
    the weights file, so a result can be traced back to the exact weights that made it.
    """

    network: RefinerUNet
    version: str

    @torch.inference_mode()
    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        """Refine `(B, 3, H, W)` images in [0, 1]; returns them clamped to [0, 1], same shape.

        The images may live on any device and dtype: they run on the network's, and come
        back on their own. uint8 images are 8-bit levels (/ 255) and come back rounded to
        levels, as `to_pil` rounds: the conversions happen where the network is.
        """
        _, refined = self._run(images)
        return _like(refined, images)

    @torch.inference_mode()
    def refine_and_score(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """`__call__`, plus each image's detail ratio, `(B,)` float32 on the images' device:
        the refined image's high-frequency energy over its input's, computed where the images
        already are. A refiner restores detail (ratio above 1); one that blurs scores below."""
        x, refined = self._run(images)
        # An input with no detail at all (a flat image) has no ratio to speak of: 1.
        before, after = high_frequency_energy(x), high_frequency_energy(refined)
        ratio = torch.where(before > 0, after / before.clamp(min=torch.finfo(torch.float32).tiny), 1.0)
        return _like(refined, images), ratio.to(images.device)

    def _run(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The input and its refinement, both on the network's device and in its dtype."""
        x = images.to(self.network.device)
        if x.dtype == torch.uint8:  # scaled in float32, as to_tensor does, whatever the network's dtype
            x = x.float().div_(255)
        x = x.to(self.network.dtype)
        return x, self.network(x).clamp_(0.0, 1.0)


def _like(refined: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
    """``refined`` on the device and in the dtype of the ``images`` it came from."""
    if images.dtype == torch.uint8:
        refined = to_8bit(refined.float())
    return refined.to(device=images.device, dtype=images.dtype)


class NoopRefiner(Refiner):
    """The identity, without the work: no network call, no device or dtype conversion and
    no scoring (every detail ratio is 1). With the ``noop`` preset it is the free model that
    measures the system alone (``benchmarks/ceiling.py``)."""

    def __init__(self) -> None:
        # The network it stands for, for anything that inspects one; it never runs.
        super().__init__(RefinerUNet().eval(), NOOP)

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        return images

    def refine_and_score(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return images, torch.ones(len(images), device=images.device)


def load_refiner(
    path: str | Path | None,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> Refiner:
    """Load the refiner saved by `RefinerUNet.save_pretrained` at `path`.

    With `path=None` or `"identity"`, the refiner is a freshly built default network, which is the identity
    (its last conv is zero-initialised); `"noop"` gives `NoopRefiner`. Only safetensors weights are read, and
    only from local disk: a missing directory or file raises `FileNotFoundError` naming the path.
    """
    if str(path) == NOOP:
        return NoopRefiner()
    if path is None or str(path) == IDENTITY:
        # `.type` casts like `.to(dtype=...)`, minus diffusers' warning about fp32-only modules
        # that it prints on every dtype cast, even for a model that has none.
        with BUILDING:
            network, version = RefinerUNet().type(dtype), IDENTITY
    else:
        path = Path(path)
        missing = [name for name in (CONFIG_NAME, WEIGHTS_NAME) if not (path / name).is_file()]
        if missing:
            raise FileNotFoundError(
                f"no refiner weights at {path}: missing {', '.join(missing)} "
                "(expected a directory written by RefinerUNet.save_pretrained)"
            )
        with BUILDING:
            network = RefinerUNet.from_pretrained(path, dtype=dtype, use_safetensors=True, local_files_only=True)
        with (path / WEIGHTS_NAME).open("rb") as weights:
            digest = hashlib.file_digest(weights, "sha256").hexdigest()
        version = f"{path.resolve().name}@{digest[:12]}"
    network = network.to(device).eval()
    return Refiner(network=network, version=version)


def export_refiner(directory: Path, network: RefinerUNet, architecture: str, details: dict[str, Any]) -> None:
    """Save `network` to `directory` with its card: the architecture and network, then
    `details` (what training knows: data, config, metrics...), then the software it ran on."""
    network.save_pretrained(directory)
    card = {
        "architecture": architecture,
        "network": type(network).__name__,
        "network_config": {k: v for k, v in network.config.items() if not k.startswith("_")},
        "parameters": count_parameters(network),
        **details,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    (directory / CARD_NAME).write_text(json.dumps(card, indent=2))


def read_card(directory: str | Path | None) -> dict[str, Any]:
    """The card of the refiner in `directory`; `{}` for the identity or a directory without one."""
    path = Path(directory) / CARD_NAME if directory is not None else None
    return json.loads(path.read_text()) if path is not None and path.is_file() else {}


def record_evaluation(directory: Path, evaluation: dict[str, Any]) -> None:
    """Put an evaluation's headline scores in the card, as its `evaluation` block (the
    weights, so the version, are untouched)."""
    card = read_card(directory)
    (directory / CARD_NAME).write_text(json.dumps({**card, "evaluation": evaluation}, indent=2))
