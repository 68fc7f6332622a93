"""Unit tests for the refiner network and its loader (CPU, small images)."""

from __future__ import annotations

import hashlib
import re
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

from refiner import Refiner, RefinerUNet, load_refiner
from refiner.pixels import to_8bit, to_pil, to_tensor


def _perturb_last_layer(network: RefinerUNet, seed: int = 0) -> None:
    """Give the zero-initialised output conv random weights, so the network is no identity."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in network.conv_out.parameters():
            param.copy_(0.05 * torch.randn(param.shape, generator=generator))


@pytest.fixture
def images() -> torch.Tensor:
    return torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("size", [(32, 32), (48, 40), (37, 53), (5, 3), (1, 1)])
def test_output_shape_matches_input(size: tuple[int, int]) -> None:
    network = RefinerUNet().eval()
    _perturb_last_layer(network)
    x = torch.rand(1, 3, *size)
    with torch.no_grad():
        assert network(x).shape == x.shape


def test_untrained_network_is_identity(images: torch.Tensor) -> None:
    with torch.no_grad():
        assert torch.equal(RefinerUNet().eval()(images), images)


def test_perturbed_last_layer_changes_output(images: torch.Tensor) -> None:
    network = RefinerUNet().eval()
    _perturb_last_layer(network)
    with torch.no_grad():
        assert not torch.allclose(network(images), images, atol=1e-4)


def test_batch_gives_same_output_as_single_images() -> None:
    # In float64: in float32 the convolutions sum in another order for a batch of 3 than
    # for one image (oneDNN blocks them differently), up to 2e-6 apart on an AMD EPYC for
    # every one of 30 initialisations, below any leak between images but above a tight bound.
    network = RefinerUNet().eval()
    _perturb_last_layer(network)
    network.double()
    batch = torch.rand(3, 3, 48, 40, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    with torch.no_grad():
        together = network(batch)
        alone = torch.cat([network(image[None]) for image in batch])
    assert not torch.allclose(together, batch, atol=1e-4)
    assert torch.allclose(together, alone, atol=1e-12)


def test_default_parameter_count_is_small() -> None:
    count = sum(p.numel() for p in RefinerUNet().parameters())
    assert 300_000 < count < 2_000_000


@pytest.mark.parametrize("path", [None, "identity"])  # unset, or REFINERY_REFINER=identity
def test_identity_when_no_weights(images: torch.Tensor, path: str | None) -> None:
    refiner = load_refiner(path)
    assert refiner.version == "identity"
    assert not refiner.network.training
    assert torch.equal(refiner(images), images)


def test_save_and_load_round_trip(tmp_path, images: torch.Tensor) -> None:
    network = RefinerUNet(base_channels=16, channel_mults=(1, 2)).eval()
    _perturb_last_layer(network)
    directory = tmp_path / "refiner-v1"
    network.save_pretrained(directory)

    refiner = load_refiner(directory)

    digest = hashlib.sha256((directory / "diffusion_pytorch_model.safetensors").read_bytes()).hexdigest()
    assert refiner.version == f"refiner-v1@{digest[:12]}"
    assert re.fullmatch(r"refiner-v1@[0-9a-f]{12}", refiner.version)
    assert refiner.network.config.channel_mults == [1, 2]
    with torch.no_grad():
        assert torch.equal(refiner(images), network(images).clamp(0, 1))
    assert load_refiner(directory, dtype=torch.bfloat16).network.dtype == torch.bfloat16


def test_missing_path_raises(tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match="nowhere"):
        load_refiner(tmp_path / "nowhere")
    RefinerUNet().save_pretrained(tmp_path / "partial")
    (tmp_path / "partial" / "diffusion_pytorch_model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="diffusion_pytorch_model.safetensors"):
        load_refiner(tmp_path / "partial")


def test_call_clamps_and_keeps_input_dtype(images: torch.Tensor) -> None:
    network = RefinerUNet().eval()
    with torch.no_grad():
        network.conv_out.bias.fill_(2.0)  # pushes every pixel well above 1
    refiner = Refiner(network=network, version="test")

    out = refiner(images.double())
    assert out.dtype == torch.float64 and out.shape == images.shape
    assert torch.equal(out, torch.ones_like(out))
    assert network(images).max() > 1  # the network itself does not clamp


def test_8bit_images_refine_to_the_levels_the_float_path_encodes(images: torch.Tensor) -> None:
    """The worker's refine-only inputs stay uint8 until the refiner's device: the same bytes
    come out as from floats refined, then rounded by to_pil, and the same detail ratios."""
    network = RefinerUNet().eval()
    _perturb_last_layer(network)
    refiner = Refiner(network=network, version="test")
    levels = to_8bit(images)

    refined, ratios = refiner.refine_and_score(levels)
    float_refined, float_ratios = refiner.refine_and_score(torch.stack([to_tensor(to_pil(i)) for i in levels]))
    assert refined.dtype == torch.uint8 and refined.shape == levels.shape
    assert torch.equal(refined, to_8bit(float_refined))
    assert not torch.equal(refined, levels)  # the refiner did change them
    assert torch.equal(ratios, float_ratios)
    assert torch.equal(refiner(levels), refined)


def test_gradients_flow_through_training_step() -> None:
    torch.manual_seed(0)
    network = RefinerUNet(base_channels=16, channel_mults=(1, 2))
    source, target = torch.rand(2, 2, 3, 32, 32).unbind()
    optimizer = torch.optim.Adam(network.parameters(), lr=1e-3)

    loss = torch.nn.functional.l1_loss(network(source), target)
    loss.backward()
    # The zero-initialised last conv must still receive a gradient, or training never starts.
    assert network.conv_out.weight.grad.abs().sum() > 0
    optimizer.step()
    optimizer.zero_grad()

    assert torch.nn.functional.l1_loss(network(source), target) != loss


def test_loads_in_threads_leave_later_modules_on_the_cpu():
    """from_pretrained builds inside accelerate's init_empty_weights, which patches
    torch.nn.Module for the whole process: before refiner.building, overlapping loads left
    the patch in place, and every module built afterwards was on the meta device."""
    original = torch.nn.Module.register_parameter
    demo = Path(__file__).parents[1] / "devstack" / "demo_refiner"
    try:
        with ThreadPoolExecutor(6) as threads:
            versions = set(threads.map(lambda _: load_refiner(demo).version, range(12)))
        assert len(versions) == 1
        assert torch.nn.Module.register_parameter is original
        assert torch.nn.Linear(2, 2).weight.device.type == "cpu"
    finally:  # a failure here must not break every later test in this process
        torch.nn.Module.register_parameter = original  # type: ignore[method-assign]
