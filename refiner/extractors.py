"""Frozen feature networks, rebuilt here with their weights files' module names (torchvision
is not used: it breaks diffusers here), and loaded from local files only:

- `LPIPSAlex`: LPIPS (Zhang et al., 2018) on AlexNet, the paper's perceptual loss;
- `InceptionV3FID`: the InceptionV3 of the FID reference implementation, from a local
  `pt_inception-2015-12-05` weights file (pytorch-fid's);
- `RandomConvFeatures`: without that file, a fixed-seed random conv net whose FID values are
  *uncalibrated*: they rank refiners on one dataset but are not comparable with published FIDs.

Images are `(B, 3, H, W)` float tensors in [0, 1].
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import TypedDict

import torch
import torch.nn.functional as F
from torch import nn

# --- LPIPS -----------------------------------------------------------------------------


class LPIPSAlex(nn.Module):
    """LPIPS (Zhang et al., 2018) with the AlexNet backbone, loaded from local weights only.

    Needs one or more weights files (`.pth` or `.safetensors`) that together hold:
    torchvision's AlexNet `features.{0,3,6,8,10}.{weight,bias}` and the lpips package's
    linear heads `lin{0..4}.model.1.weight` (its `weights/v0.1/alex.pth`). The backbone is
    rebuilt with torchvision's layer names. The network is frozen.
    """

    shift: torch.Tensor  # buffers: ImageNet input normalisation, lpips's ScalingLayer
    scale: torch.Tensor

    def __init__(self, weights: str | Path | Sequence[str | Path]) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 64, 11, stride=4, padding=2),
            nn.ReLU(inplace=False),  # 0, 1 -> tap
            nn.MaxPool2d(3, stride=2),
            nn.Conv2d(64, 192, 5, padding=2),
            nn.ReLU(inplace=False),  # 3, 4 -> tap
            nn.MaxPool2d(3, stride=2),
            nn.Conv2d(192, 384, 3, padding=1),
            nn.ReLU(inplace=False),  # 6, 7 -> tap
            nn.Conv2d(384, 256, 3, padding=1),
            nn.ReLU(inplace=False),  # 8, 9 -> tap
            nn.Conv2d(256, 256, 3, padding=1),
            nn.ReLU(inplace=False),  # 10, 11 -> tap
        )
        self.taps = (1, 4, 7, 9, 11)
        widths = (64, 192, 384, 256, 256)
        # lpips names its heads lin0..lin4, each `model = Sequential(Dropout, Conv1x1)`.
        for i, width in enumerate(widths):
            setattr(self, f"lin{i}", nn.Module())
            getattr(self, f"lin{i}").model = nn.Sequential(nn.Identity(), nn.Conv2d(width, 1, 1, bias=False))
        self.register_buffer("shift", torch.tensor([-0.030, -0.088, -0.188]).view(1, 3, 1, 1))
        self.register_buffer("scale", torch.tensor([0.458, 0.448, 0.450]).view(1, 3, 1, 1))

        files = [weights] if isinstance(weights, (str, Path)) else list(weights)
        state: dict[str, torch.Tensor] = {}
        for file in files:
            state.update(_load_state_dict(Path(file)))
        wanted = {k for k in self.state_dict() if k not in ("shift", "scale")}
        missing = sorted(wanted - set(state))
        if missing:
            raise ValueError(
                f"lpips weights {', '.join(map(str, files))} lack {len(missing)} tensors, "
                f"e.g. {missing[:3]} (need torchvision AlexNet features.* and lpips lin*.model.1.weight)"
            )
        self.load_state_dict({k: state[k] for k in wanted}, strict=False)
        self.requires_grad_(False).eval()

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """LPIPS distance per image, `(B,)`, for images in [0, 1]."""
        h = torch.cat([x, y]) * 2 - 1
        h = (h - self.shift) / self.scale
        total = torch.zeros(())  # a 0-dim zero takes the distances' dtype and device, as 0 would
        for i, layer in enumerate(self.features):
            h = layer(h)
            if i in self.taps:
                k = self.taps.index(i)
                fx, fy = h.chunk(2)
                # Unit-normalise each position's feature vector, then a learned weighted distance.
                fx = fx / (fx.pow(2).sum(dim=1, keepdim=True).sqrt() + 1e-10)
                fy = fy / (fy.pow(2).sum(dim=1, keepdim=True).sqrt() + 1e-10)
                d = getattr(self, f"lin{k}").model((fx - fy) ** 2)  # (B, 1, h, w)
                total = total + d.mean(dim=(1, 2, 3))
        return total


def _load_state_dict(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise FileNotFoundError(f"no lpips weights file at {path}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(path)
    return torch.load(path, map_location="cpu", weights_only=True)


# --- FID feature extractors ----------------------------------------------------------


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
                conv.get_parameter("bias").zero_()
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

    def __init__(
        self, cin: int, cout: int, kernel: int | tuple[int, int], stride: int = 1, padding: int | tuple[int, int] = 0
    ) -> None:
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
        return torch.cat(
            [
                self.branch1x1(x),
                self.branch5x5_2(self.branch5x5_1(x)),
                self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
                self.branch_pool(_avg_pool(x)),
            ],
            dim=1,
        )


class _MixedB(nn.Module):  # 35 x 35 -> 17 x 17
    def __init__(self, cin: int) -> None:
        super().__init__()
        self.branch3x3 = _ConvBN(cin, 384, 3, stride=2)
        self.branch3x3dbl_1 = _ConvBN(cin, 64, 1)
        self.branch3x3dbl_2, self.branch3x3dbl_3 = _ConvBN(64, 96, 3, padding=1), _ConvBN(96, 96, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat(
            [
                self.branch3x3(x),
                self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
                F.max_pool2d(x, 3, stride=2),
            ],
            dim=1,
        )


class _Factorised(TypedDict):
    """A 1x7 or 7x1 `_ConvBN`'s kernel and padding."""

    kernel: tuple[int, int]
    padding: tuple[int, int]


class _MixedC(nn.Module):  # 17 x 17, factorised 7x7 convolutions
    def __init__(self, cin: int, c7: int) -> None:
        super().__init__()
        row = _Factorised(kernel=(1, 7), padding=(0, 3))
        col = _Factorised(kernel=(7, 1), padding=(3, 0))
        self.branch1x1 = _ConvBN(cin, 192, 1)
        self.branch7x7_1, self.branch7x7_2 = _ConvBN(cin, c7, 1), _ConvBN(c7, c7, **row)
        self.branch7x7_3 = _ConvBN(c7, 192, **col)
        self.branch7x7dbl_1, self.branch7x7dbl_2 = _ConvBN(cin, c7, 1), _ConvBN(c7, c7, **col)
        self.branch7x7dbl_3, self.branch7x7dbl_4 = _ConvBN(c7, c7, **row), _ConvBN(c7, c7, **col)
        self.branch7x7dbl_5 = _ConvBN(c7, 192, **row)
        self.branch_pool = _ConvBN(cin, 192, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dbl = self.branch7x7dbl_3(self.branch7x7dbl_2(self.branch7x7dbl_1(x)))
        return torch.cat(
            [
                self.branch1x1(x),
                self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x))),
                self.branch7x7dbl_5(self.branch7x7dbl_4(dbl)),
                self.branch_pool(_avg_pool(x)),
            ],
            dim=1,
        )


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
        return torch.cat(
            [
                self.branch3x3_2(self.branch3x3_1(x)),
                self.branch7x7x3_4(b7),
                F.max_pool2d(x, 3, stride=2),
            ],
            dim=1,
        )


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
        return torch.cat(
            [
                self.branch1x1(x),
                self.branch3x3_2a(b3),
                self.branch3x3_2b(b3),
                self.branch3x3dbl_3a(dbl),
                self.branch3x3dbl_3b(dbl),
                self.branch_pool(pooled),
            ],
            dim=1,
        )


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
        for block in (
            self.Mixed_5b,
            self.Mixed_5c,
            self.Mixed_5d,
            self.Mixed_6a,
            self.Mixed_6b,
            self.Mixed_6c,
            self.Mixed_6d,
            self.Mixed_6e,
            self.Mixed_7a,
            self.Mixed_7b,
            self.Mixed_7c,
        ):
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
