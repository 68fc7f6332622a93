"""The free model (``REFINERY_MODEL_PRESET=noop``, ``REFINERY_REFINER=noop``) through a
real worker: the production path with no model cost, which ``benchmarks/ceiling.py`` times."""

from __future__ import annotations

import io
import json
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from PIL import Image

from benchmarks import ceiling
from devstack.stack import LocalStack
from producer.client import Client
from refiner.export import NOOP, NoopRefiner, load_refiner
from shared.contract import JobState, OutputFormat
from shared.images import read_provenance
from shared.presets import get_preset
from worker.models import generate, load_pipeline

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def client(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Client]:
    with LocalStack(tmp_path_factory.mktemp("ceiling"), preset="noop", refiner=NOOP) as stack:
        stack.start_worker("worker")
        yield Client(stack.settings)


def _image(data: bytes) -> Image.Image:
    image = Image.open(io.BytesIO(data))
    image.load()
    return image


def test_generate_makes_a_correctly_sized_image_per_seed(client: Client) -> None:
    records = [client.submit_generate("a portrait", seed=seed, width=96, height=64).wait(60) for seed in (1, 1, 2)]

    assert all(r.state is JobState.succeeded for r in records), [r.error for r in records]
    assert (records[0].generator, records[0].refiner) == ("noop", "noop")
    images = [_image(client.storage.get(r.result.uri)) for r in records]
    assert {image.size for image in images} == {(96, 64)}
    assert images[0].tobytes() == images[1].tobytes() != images[2].tobytes()
    assert read_provenance(client.storage.get(records[0].result.uri))["generator"] == "noop"
    assert {"generate", "refine", "encode", "upload"} <= set(records[0].timings_ms)


def test_refine_only_returns_its_input(client: Client) -> None:
    source = Image.effect_noise((64, 48), 40).convert("RGB")
    buffer = io.BytesIO()
    source.save(buffer, "PNG")

    records = [client.submit_refine(image=buffer.getvalue(), output_format=fmt).wait(60) for fmt in ("png", "webp")]

    assert all(r.state is JobState.succeeded for r in records), [r.error for r in records]
    assert {(r.refiner, r.result.width, r.result.height) for r in records} == {("noop", 64, 48)}
    png, webp = (_image(client.storage.get(r.result.uri)) for r in records)
    assert png.tobytes() == source.tobytes() and webp.format == "WEBP"


def test_noop_refiner_returns_the_very_tensor_it_was_given() -> None:
    refiner = load_refiner(NOOP)
    images = torch.rand(2, 3, 32, 32)

    refined, ratio = refiner.refine_and_score(images)

    assert isinstance(refiner, NoopRefiner) and refiner.version == NOOP
    assert refined is images and refiner(images) is images
    assert ratio.tolist() == [1.0, 1.0]


def test_noop_generator_is_seeded_and_on_8_bit_levels(tmp_path: Path) -> None:
    cpu = torch.device("cpu")
    pipe = load_pipeline(get_preset("noop"), model_path=None, cache_dir=tmp_path, device=cpu, dtype=torch.float32)
    images = generate(pipe, ["a", "b"], [3, 3], width=64, height=32, steps=1, guidance=0.0, max_sequence_length=77)

    assert images.shape == (2, 3, 32, 64) and torch.equal(images[0], images[1])
    assert torch.equal((images * 255).round() / 255, images) and 0 <= images.min() and images.max() <= 1


def test_ceiling_benchmark_quick_run(tmp_path: Path) -> None:
    out = tmp_path / "ceiling.json"

    # In this process: its stack's workers come from the fork server this file's other
    # stacks use, where a `python benchmarks/ceiling.py` would import everything twice more
    # (itself and its own fork server, about 8 s of CPU each here).
    ceiling.main(["--quick", "--label", "smoke", "--out", str(out)])

    run = json.loads(out.read_text())["runs"]["smoke"]
    rows = {(row["kind"], row["format"]) for row in run["rows"]}
    assert rows == {(kind, fmt.value) for kind in ("generate", "refine") for fmt in OutputFormat}
    assert all(row["cpu_ms_per_job"] > 0 and row["jobs_per_s"] > 0 for row in run["rows"])
    assert run["codecs"]["64x64"]["png_encode_ms"] > 0 and "scaling refine 64px png" in run["goals"]
