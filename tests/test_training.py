"""Unit tests for refiner training: data, losses, architectures, the loop, resume, export.

One module fixture writes 48 real tiny pairs (tiny-schnell at 4 steps vs tiny-dev at 28,
guidance 3.5, 32x32) in the pairs layout; every training run below uses small networks and
a few dozen steps, so the file runs in well under a minute on 2 CPU cores.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from accelerate import Accelerator
from PIL import Image

from refiner import RefinerUNet, load_refiner, to_pil
from refiner.data import PairDataset, ResumableBatchSampler, collate_pairs, split_of
from refiner.extractors import LPIPSAlex
from refiner.losses import (
    CycleLossWeights,
    PairedLoss,
    cycle_loss,
    discriminator_loss,
    generator_loss,
    gradient_loss,
    identity_loss,
    lsgan_loss,
    ms_ssim,
)
from refiner.modes import MODES
from refiner.networks import (
    CycleDiscriminators,
    EfficientSelfAttention,
    PatchDiscriminator,
    build_cyclegan,
    count_parameters,
)
from refiner.options import TrainConfig, build_parser, config_from_args
from refiner.train import get_lr, train
from shared.datasets import MANIFEST_DIR, ManifestRow, PresetRow, pair_paths

SIZE = 32
PAIRS = 48
# Small networks keep every run to about a second.
SMALL = {"base_channels": 8, "channel_mults": (1, 2), "disc_channels": 8}


@pytest.fixture(scope="module")
def pairs_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from producer.prompts import build_prompts
    from worker.models import generate
    from worker.tiny_flux import build_tiny_pipeline

    root = tmp_path_factory.mktemp("pairs")
    student_pipe, teacher_pipe = build_tiny_pipeline("tiny-schnell"), build_tiny_pipeline("tiny-dev")
    for pipe in (student_pipe, teacher_pipe):
        pipe.set_progress_bar_config(disable=True)
    prompts = build_prompts(PAIRS, seed=0)
    (root / MANIFEST_DIR).mkdir()
    for start in range(0, PAIRS, 16):
        chunk, seeds = prompts[start : start + 16], list(range(start, start + 16))
        texts = [p.text for p in chunk]
        common = {"width": SIZE, "height": SIZE, "max_sequence_length": 77}
        students = generate(student_pipe, texts, seeds, steps=4, guidance=0.0, **common)
        teachers = generate(teacher_pipe, texts, seeds, steps=28, guidance=3.5, **common)
        for prompt, seed, student, teacher in zip(chunk, seeds, students, teachers):
            pair_id = f"{seed:07d}"
            paths = pair_paths(pair_id)
            (root / paths["student"]).parent.mkdir(parents=True)
            to_pil(student).save(root / paths["student"])
            to_pil(teacher).save(root / paths["teacher"])
            row = ManifestRow(
                pair_id=pair_id,
                prompt=prompt.text,
                attributes=prompt.attributes,
                seed=seed,
                width=SIZE,
                height=SIZE,
                student=PresetRow(preset="tiny-schnell", steps=4, guidance=0.0),
                teacher=PresetRow(preset="tiny-dev", steps=28, guidance=3.5),
            )
            (root / paths["manifest"]).write_text(row.model_dump_json())
    return root


def _config(pairs_dir: Path, out: Path, **overrides) -> TrainConfig:
    settings = {
        "data": str(pairs_dir),
        "out": str(out),
        "batch_size": 4,
        "val_every": 10,
        "sample_every": 10,
        "checkpoint_every": 10,
        **SMALL,
    }
    settings.update(overrides)
    return TrainConfig(**settings)


# --- data ------------------------------------------------------------------------------


def test_split_is_deterministic_disjoint_and_stable(pairs_dir: Path, tmp_path: Path) -> None:
    train_set, val_set = PairDataset(pairs_dir, "train"), PairDataset(pairs_dir, "val")
    assert set(train_set.pair_ids).isdisjoint(val_set.pair_ids)
    assert sorted(train_set.pair_ids + val_set.pair_ids) == PairDataset(pairs_dir, "all").pair_ids
    assert len(train_set) + len(val_set) == PAIRS and len(val_set) > 0
    assert PairDataset(pairs_dir, "val").pair_ids == val_set.pair_ids
    assert all(split_of(pair_id, 0.1) == "val" for pair_id in val_set.pair_ids)

    # A dataset with only half the pairs puts each of them in the same split.
    half = tmp_path / "half"
    for pair_id in sorted(PairDataset(pairs_dir, "all").pair_ids)[: PAIRS // 2]:
        shutil.copytree(pairs_dir / "pairs" / pair_id, half / "pairs" / pair_id)
        (half / "manifest").mkdir(exist_ok=True)
        shutil.copy(pairs_dir / "manifest" / f"{pair_id}.json", half / "manifest")
    half_val = PairDataset(half, "val").pair_ids
    assert half_val == [pair_id for pair_id in val_set.pair_ids if pair_id in PairDataset(half, "all").pair_ids]


def test_items_rows_and_incomplete_pairs(pairs_dir: Path, tmp_path: Path) -> None:
    dataset = PairDataset(pairs_dir, "val")
    item = dataset[0]
    assert item["student"].shape == item["teacher"].shape == (3, SIZE, SIZE)
    assert item["student"].dtype == torch.float32
    assert 0 <= item["student"].min() and item["teacher"].max() <= 1
    assert not torch.equal(item["student"], item["teacher"])
    assert item["pair_id"] == dataset.pair_ids[0] == dataset.rows[0].pair_id
    assert "age_group" in dataset.rows[0].attributes

    # A manifest row whose images are not written yet is skipped, not an error.
    partial = tmp_path / "partial"
    shutil.copytree(pairs_dir, partial)
    (partial / "pairs" / dataset.pair_ids[0] / "teacher.png").unlink()
    assert len(PairDataset(partial, "all")) == PAIRS - 1
    with pytest.raises(FileNotFoundError, match="pairs/ and manifest/"):
        PairDataset(tmp_path / "nowhere", "train")
    with pytest.raises(ValueError, match="split"):
        PairDataset(pairs_dir, "test")


def test_crops_are_seeded_and_unpaired_draws_another_teacher(pairs_dir: Path) -> None:
    dataset = PairDataset(pairs_dir, "train", resolution=16, seed=3)
    a, b = dataset[(5, 1234)], dataset[(5, 1234)]
    assert a["student"].shape == (3, 16, 16)
    assert torch.equal(a["student"], b["student"]) and torch.equal(a["teacher"], b["teacher"])
    assert any(not torch.equal(a["student"], dataset[(5, seed)]["student"]) for seed in range(5))
    # Student and teacher are cropped at the same place: the crop is a window of both.
    full = PairDataset(pairs_dir, "train")[5]
    windows = full["teacher"].unfold(1, 16, 1).unfold(2, 16, 1)  # (3, 17, 17, 16, 16)
    match = (windows == a["teacher"][:, None, None]).flatten(3).all(-1).all(0)
    top, left = match.nonzero()[0].tolist()
    assert torch.equal(full["student"][:, top : top + 16, left : left + 16], a["student"])

    unpaired = PairDataset(pairs_dir, "train", seed=3, unpaired=True)
    items = [unpaired[(i, 100 + i)] for i in range(10)]
    assert sum(item["teacher_pair_id"] != item["pair_id"] for item in items) >= 8


def test_sampler_is_a_function_of_the_step() -> None:
    straight = ResumableBatchSampler(10, batch_size=4, seed=1)
    batches = [batch for _, batch in zip(range(8), straight)]
    resumed = ResumableBatchSampler(10, batch_size=4, seed=1, start_step=5)
    assert [batch for _, batch in zip(range(3), resumed)] == batches[5:]
    # Each epoch visits every item once.
    positions = [key[0] for batch in batches[:5] for key in batch]  # 20 draws = 2 epochs
    assert sorted(positions[:10]) == list(range(10)) and sorted(positions[10:]) == list(range(10))
    # Two processes share out the global batch without overlap.
    ranks = [ResumableBatchSampler(10, 2, seed=1, num_replicas=2, rank=r).batch_at(0) for r in (0, 1)]
    assert [key for keys in ranks for key in keys] == straight.batch_at(0)


# --- losses ----------------------------------------------------------------------------


def _edge(shift: int = 0) -> torch.Tensor:
    image = torch.zeros(1, 3, 32, 32)
    image[..., 16 + shift :] = 1.0
    return image


def test_gradient_loss_on_known_inputs() -> None:
    noise = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    assert gradient_loss(noise, noise) == 0
    assert gradient_loss(_edge(), _edge()) == 0
    assert gradient_loss(_edge(), _edge(shift=2)) > 0.01
    # A constant offset changes no gradient.
    assert gradient_loss(noise * 0.5, noise * 0.5 + 0.2) < 1e-6


def test_ms_ssim_on_known_inputs() -> None:
    g = torch.Generator().manual_seed(0)
    for size in (8, 32, 64, 200):
        x = torch.rand(2, 3, size, size, generator=g)
        assert torch.allclose(ms_ssim(x, x), torch.ones(2), atol=1e-5)
        y = (x + 0.3 * torch.randn(x.shape, generator=g)).clamp(0, 1)
        score = ms_ssim(x, y)
        assert score.shape == (2,) and (score < 0.95).all() and (score > 0).all()
        assert torch.allclose(score, ms_ssim(y, x), atol=1e-5)
    with pytest.raises(ValueError, match="equal shapes"):
        ms_ssim(torch.rand(1, 3, 8, 8), torch.rand(1, 3, 8, 9))


def test_paired_loss_parts_and_gradients() -> None:
    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    loss = PairedLoss(gradient_weight=1.0, perceptual="ms_ssim", perceptual_weight=0.5, l1_weight=1.0)
    total, parts = loss(x, x)
    assert set(parts) == {"gradient", "l1", "ms_ssim"}
    assert abs(total.item()) < 1e-5 and abs(parts["ms_ssim"].item()) < 1e-5

    output = (x + 0.1).requires_grad_()
    total, parts = loss(output, x)
    expected = parts["gradient"] + parts["l1"] + 0.5 * parts["ms_ssim"]
    assert torch.allclose(total.detach(), expected) and parts["l1"] > 0.05
    total.backward()
    assert torch.isfinite(output.grad).all() and output.grad.abs().sum() > 0

    assert set(PairedLoss(perceptual="none")(x, x)[1]) == {"gradient", "l1"}
    with pytest.raises(ValueError, match="lpips_weights"):
        PairedLoss(perceptual="lpips")
    with pytest.raises(ValueError, match="perceptual"):
        PairedLoss(perceptual="vgg")


def test_gradient_term_against_the_input_or_the_target() -> None:
    g = torch.Generator().manual_seed(0)
    student = torch.rand(2, 3, 32, 32, generator=g)
    teacher = (student + 0.2 * torch.randn(student.shape, generator=g)).clamp(0, 1)  # more texture
    output = (0.8 * student + 0.2 * teacher).requires_grad_()  # nearer the input
    against = {name: PairedLoss(perceptual="none", gradient_against=name) for name in ("target", "input")}

    # The same batch gives different gradient terms, and so different totals.
    parts = {name: loss(output, teacher, student)[1] for name, loss in against.items()}
    assert parts["input"]["gradient"] < 0.5 * parts["target"]["gradient"]
    assert torch.equal(parts["input"]["l1"], parts["target"]["l1"])  # the other terms stay with the target
    total, _ = against["input"](output, teacher, student)
    assert torch.allclose(total.detach(), parts["input"]["gradient"] + parts["input"]["l1"])
    total.backward()
    assert torch.isfinite(output.grad).all() and output.grad.abs().sum() > 0

    # An output that is its input has no gradient term against the input, whatever the target.
    assert against["input"](student, teacher, student)[1]["gradient"] == 0
    assert against["target"](student, teacher, student)[1]["gradient"] > 0.01
    # "target" ignores the input; "input" cannot do without it.
    assert torch.equal(against["target"](output, teacher)[0], against["target"](output, teacher, student)[0])
    with pytest.raises(ValueError, match="source"):
        against["input"](output, teacher)
    with pytest.raises(ValueError, match="gradient_against"):
        PairedLoss(gradient_against="teacher")


def test_lpips_loads_local_weights_only(tmp_path: Path) -> None:
    # Random weights with the real key names stand in for torchvision's AlexNet + lpips heads.
    torch.manual_seed(0)
    reference = LPIPSAlex.__new__(LPIPSAlex)
    torch.nn.Module.__init__(reference)
    shapes = {
        "features.0": (64, 3, 11, 11),
        "features.3": (192, 64, 5, 5),
        "features.6": (384, 192, 3, 3),
        "features.8": (256, 384, 3, 3),
        "features.10": (256, 256, 3, 3),
    }
    state = {}
    for name, shape in shapes.items():
        state[f"{name}.weight"] = 0.05 * torch.randn(shape)
        state[f"{name}.bias"] = torch.zeros(shape[0])
    for i, width in enumerate((64, 192, 384, 256, 256)):
        state[f"lin{i}.model.1.weight"] = torch.rand(1, width, 1, 1)
    torch.save(state, tmp_path / "lpips_alex.pth")

    lpips = LPIPSAlex(tmp_path / "lpips_alex.pth")
    x = torch.rand(2, 3, 64, 64)
    assert torch.allclose(lpips(x, x), torch.zeros(2))
    assert (lpips(x, torch.rand(2, 3, 64, 64)) > 0).all()
    _, parts = PairedLoss(perceptual="lpips", lpips_weights=tmp_path / "lpips_alex.pth")(x, x)
    assert "lpips" in parts and "ms_ssim" not in parts

    del state["lin4.model.1.weight"]
    torch.save(state, tmp_path / "incomplete.pth")
    with pytest.raises(ValueError, match="lin4"):
        LPIPSAlex(tmp_path / "incomplete.pth")


def test_cyclegan_losses_on_known_inputs() -> None:
    ones, zeros = torch.ones(2, 1, 4, 4), torch.zeros(2, 1, 4, 4)
    assert lsgan_loss(ones, True) == 0 and lsgan_loss(zeros, False) == 0
    assert lsgan_loss(zeros, True) == 1 and lsgan_loss(ones, False) == 1
    x = torch.rand(1, 3, 8, 8)
    assert cycle_loss(x, x) == 0 and identity_loss(x, x) == 0
    assert torch.isclose(cycle_loss(x + 0.25, x), torch.tensor(0.25))


# --- architectures ---------------------------------------------------------------------


@pytest.mark.parametrize("arch", ["unet-cbam", "cyclegan", "esa-cyclegan"])
def test_architecture_shapes_and_parameter_counts(arch: str) -> None:
    x = torch.rand(2, 3, SIZE, SIZE)
    refiner = RefinerUNet()
    assert 500_000 < count_parameters(refiner) < 1_000_000  # ~0.73M
    if arch == "unet-cbam":
        assert refiner(x).shape == x.shape
        return
    generators, discriminators = build_cyclegan(arch, refiner)
    assert generators.g_st is refiner and count_parameters(generators.g_ts) == count_parameters(refiner)
    out = generators(x, x)
    for tensor in (out.fake_teacher, out.fake_student, out.cycled_student, out.identity_teacher):
        assert tensor.shape == x.shape
    pred_t, pred_s = discriminators(x, x)
    assert pred_t.shape == pred_s.shape == (2, 1, 2, 2)  # 70x70 patches over a 32 px image
    assert discriminators.d_teacher(torch.rand(1, 3, 128, 128)).shape == (1, 1, 14, 14)
    d_params = count_parameters(discriminators.d_teacher)
    if arch == "cyclegan":
        assert 600_000 < d_params < 800_000  # ~0.69M at base_channels=32
    else:
        plain = count_parameters(PatchDiscriminator(32))
        assert 0 < d_params - plain < 50_000  # the ESA block (~12k at 64 channels)
    g_loss, parts = generator_loss(out, discriminators, x, x, CycleLossWeights())
    assert set(parts) == {"gan", "cycle", "identity"} and torch.isfinite(g_loss)
    assert torch.isfinite(discriminator_loss(out, discriminators, x, x))


def test_esa_block_starts_as_identity_and_is_linear_in_positions() -> None:
    block = EfficientSelfAttention(16)
    x = torch.randn(2, 16, 12, 10)
    assert torch.equal(block(x), x)
    with torch.no_grad():
        block.gamma.fill_(1.0)
    y = block(x)
    assert y.shape == x.shape and not torch.allclose(y, x)
    assert isinstance(CycleDiscriminators(8, attention=True).d_teacher.net[5], EfficientSelfAttention)


def test_overfits_a_small_batch(pairs_dir: Path) -> None:
    torch.manual_seed(0)
    dataset = PairDataset(pairs_dir, "train")
    student = torch.stack([dataset[i]["student"] for i in range(2)])
    teacher = torch.stack([dataset[i]["teacher"] for i in range(2)])
    network = RefinerUNet(base_channels=16, channel_mults=(1, 2))
    optimizer = torch.optim.Adam(network.parameters(), lr=3e-3)
    losses = []
    for _ in range(300):
        loss = torch.nn.functional.l1_loss(network(student), teacher)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert min(losses[-10:]) < losses[0] / 10, (losses[0], losses[-10:])


# --- the training loop -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("arch", "overrides"),
    [("unet-cbam", {}), ("unet-cbam", {"adversarial_weight": 0.1, "perceptual": "none"}), ("esa-cyclegan", {})],
)
def test_a_mode_logs_every_part_its_step_returns(pairs_dir: Path, tmp_path: Path, arch: str, overrides: dict) -> None:
    # metrics.csv drops what is not a column, so a part missing from `columns` would vanish.
    mode = MODES[arch](_config(pairs_dir, tmp_path, arch=arch, **overrides).resolved(), Accelerator())
    batch = collate_pairs([PairDataset(pairs_dir, "train")[i] for i in range(2)])
    loss, parts = mode.step(batch["student"], batch["teacher"])
    assert set(parts) == set(mode.columns) and torch.isfinite(loss)


def test_short_run_writes_metrics_samples_checkpoint_and_export(pairs_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    export = train(_config(pairs_dir, out, steps=20))

    with (out / "metrics.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert [int(r["step"]) for r in rows] == list(range(21))  # step 0: the baselines
    assert {"loss", "l1", "gradient", "ms_ssim", "lr", "val_l1_refined", "val_l1_affine"} <= set(rows[0])
    assert float(rows[0]["val_l1_refined"]) == pytest.approx(float(rows[0]["val_l1_student"]))  # identity
    assert all(float(r["loss"]) > 0 for r in rows[1:]) and rows[20]["val_l1_refined"]

    grid = Image.open(out / "samples" / "step_000020.png")
    val_pairs = len(PairDataset(pairs_dir, "val"))
    # refiner.report's layout: a 110 px id column and a 16 px header; 32 px pairs enlarged to 128.
    assert grid.width == 110 + 3 * 128 and grid.height == 16 + min(val_pairs, 8) * 128
    assert (out / "samples" / "step_000010.png").is_file()

    checkpoint = torch.load(out / "checkpoint.pt", weights_only=True)
    assert {"model", "optimizer", "step", "config"} <= set(checkpoint) and checkpoint["step"] == 20
    assert checkpoint["config"]["perceptual"] == "ms_ssim"

    refiner = load_refiner(export)
    assert refiner.network.config.base_channels == 8
    card = json.loads((export / "refiner.json").read_text())
    assert card["architecture"] == "unet-cbam" and card["perceptual_loss"] == "ms_ssim"
    assert card["discriminator_parameters"] is None  # no adversarial term, no discriminator
    assert card["gradient_against"] == card["config"]["gradient_against"] == "target"  # the default, recorded
    assert json.loads((out / "config.json").read_text())["gradient_against"] == "target"
    assert card["parameters"] == count_parameters(refiner.network)
    assert card["data"]["pairs"] == PAIRS and card["data"]["val_pairs"] == val_pairs
    metrics = card["metrics"]
    assert metrics["val_l1_refined"] <= metrics["val_l1_student"]  # best-val, identity included
    assert metrics["val_l1_refined"] == min(float(r["val_l1_refined"]) for r in rows if r["val_l1_refined"])
    assert card["wall_time_s"] > 0 and card["config"]["steps"] == 20

    with pytest.raises(FileExistsError, match="resume"):
        train(_config(pairs_dir, out, steps=20))

    # Fine-tuning starts from the exported weights: its step-0 score is theirs.
    tuned = train(_config(pairs_dir, tmp_path / "tuned", steps=2, init=str(export), lr=1e-5))
    with (tmp_path / "tuned" / "metrics.csv").open() as f:
        start = next(csv.DictReader(f))
    assert float(start["val_l1_refined"]) == pytest.approx(metrics["val_l1_refined"], abs=1e-6)
    assert load_refiner(tuned).network.config.base_channels == 8


def test_time_budget_stops_early_and_still_exports(pairs_dir: Path, tmp_path: Path) -> None:
    export = train(_config(pairs_dir, tmp_path / "budget", steps=1000, max_minutes=0.0))
    card = json.loads((export / "refiner.json").read_text())
    assert card["steps"] == 1 and card["stopped_by_time_limit"] is True
    assert (tmp_path / "budget" / "samples" / "step_000001.png").is_file()
    assert torch.load(tmp_path / "budget" / "checkpoint.pt", weights_only=True)["step"] == 1


def test_gradient_against_input_trains_and_is_recorded(pairs_dir: Path, tmp_path: Path) -> None:
    export = train(_config(pairs_dir, tmp_path / "input", steps=3, gradient_against="input"))
    card = json.loads((export / "refiner.json").read_text())
    assert card["gradient_against"] == card["config"]["gradient_against"] == "input"
    with (tmp_path / "input" / "metrics.csv").open() as f:
        rows = list(csv.DictReader(f))[1:]
    assert len(rows) == 3 and all(np.isfinite(float(r["gradient"])) for r in rows)


@pytest.mark.parametrize("arch", ["unet-cbam", "cyclegan"])
def test_resume_continues_the_same_run(pairs_dir: Path, tmp_path: Path, arch: str) -> None:
    common = {"arch": arch, "lr_decay_steps": 12, "val_every": 4, "sample_every": 0, "checkpoint_every": 0}
    train(_config(pairs_dir, tmp_path / "straight", steps=12, **common))
    train(_config(pairs_dir, tmp_path / "halves", steps=6, **common))
    train(_config(pairs_dir, tmp_path / "halves", steps=12, resume=True, **common))

    straight = torch.load(tmp_path / "straight" / "checkpoint.pt", weights_only=True)
    halves = torch.load(tmp_path / "halves" / "checkpoint.pt", weights_only=True)
    assert straight["step"] == halves["step"] == 12
    for name, weights in straight["model"].items():
        for key, value in weights.items():
            assert torch.allclose(value, halves["model"][name][key], atol=1e-6), (name, key)
    with (tmp_path / "halves" / "metrics.csv").open() as f:
        assert [int(r["step"]) for r in csv.DictReader(f)] == list(range(13))


@pytest.mark.parametrize("arch", ["cyclegan", "esa-cyclegan"])
def test_cyclegan_trains_without_nans_and_exports_a_refiner(pairs_dir: Path, tmp_path: Path, arch: str) -> None:
    out = tmp_path / arch
    export = train(_config(pairs_dir, out, arch=arch, steps=30, val_every=15, sample_every=30))
    with (out / "metrics.csv").open() as f:
        rows = list(csv.DictReader(f))[1:]
    assert len(rows) == 30
    for row in rows:
        for column in ("loss", "gan", "cycle", "identity", "d_loss"):
            assert np.isfinite(float(row[column])), (row["step"], column)
    refiner = load_refiner(export)
    assert isinstance(refiner.network, RefinerUNet)
    images = PairDataset(pairs_dir, "val")[0]["student"][None]  # (1, 3, 32, 32)
    assert refiner(images).shape == images.shape
    card = json.loads((export / "refiner.json").read_text())
    assert card["architecture"] == arch and card["discriminator_parameters"] > 0
    # Unpaired training does not choose by paired L1: it exports its last, trained weights.
    assert card["metrics"]["exported"] == "last" and card["metrics"]["best_step"] == 30
    assert not torch.equal(refiner(images), images)


def test_paired_adversarial_term_trains_and_resumes(pairs_dir: Path, tmp_path: Path) -> None:
    common = {
        "adversarial_weight": 0.05,
        "lr_decay_steps": 10,
        "val_every": 5,
        "sample_every": 0,
        "checkpoint_every": 0,
    }
    export = train(_config(pairs_dir, tmp_path / "straight", steps=10, **common))
    with (tmp_path / "straight" / "metrics.csv").open() as f:
        rows = list(csv.DictReader(f))[1:]
    assert all(np.isfinite(float(r[c])) for r in rows for c in ("adversarial", "d_loss"))
    assert len({r["d_loss"] for r in rows}) > 1  # the discriminator learns
    assert isinstance(load_refiner(export).network, RefinerUNet)
    # The card records the discriminator it trained beside the refiner.
    card = json.loads((export / "refiner.json").read_text())
    assert card["discriminator_parameters"] == count_parameters(PatchDiscriminator(SMALL["disc_channels"]))

    train(_config(pairs_dir, tmp_path / "halves", steps=5, **common))
    train(_config(pairs_dir, tmp_path / "halves", steps=10, resume=True, **common))
    straight = torch.load(tmp_path / "straight" / "checkpoint.pt", weights_only=True)["model"]
    halves = torch.load(tmp_path / "halves" / "checkpoint.pt", weights_only=True)["model"]
    assert set(straight) == {"refiner", "discriminator"}
    for name in straight:
        for key, value in straight[name].items():
            assert torch.allclose(value, halves[name][key], atol=1e-6), (name, key)


def test_learning_rate_schedule_and_cli_parsing() -> None:
    config = TrainConfig(data="d", out="o", steps=1000, lr=1e-3).resolved()
    assert config.warmup_steps == 50 and config.lr_decay_steps == 1000
    assert get_lr(0, config) == pytest.approx(1e-3 / 50)
    assert get_lr(49, config) == pytest.approx(1e-3)
    assert get_lr(999, config) == pytest.approx(1e-4, rel=1e-3)
    assert get_lr(5000, config) == pytest.approx(1e-4)

    parsed = config_from_args(
        [
            "--data",
            "d",
            "--arch",
            "esa-cyclegan",
            "--out",
            "o",
            "--steps",
            "7",
            "--batch-size",
            "3",
            "--lr",
            "0.01",
            "--resolution",
            "64",
            "--init",
            "r",
            "--seed",
            "5",
            "--resume",
            "--channel-mults",
            "1,2",
        ]
    )
    assert (parsed.arch, parsed.steps, parsed.batch_size, parsed.lr, parsed.resolution) == (
        "esa-cyclegan",
        7,
        3,
        0.01,
        64,
    )
    assert (parsed.init, parsed.seed, parsed.resume, parsed.channel_mults) == ("r", 5, True, (1, 2))
    assert TrainConfig(data="d", out="o", arch="cyclegan").resolved().lr == 2e-4
    assert parsed.gradient_against == "target"
    assert config_from_args(["--data", "d", "--out", "o", "--gradient-against", "input"]).gradient_against == "input"
    with pytest.raises(ValueError, match="gradient_against"):
        TrainConfig(data="d", out="o", gradient_against="teacher").resolved()
    assert TrainConfig(data="d", out="o", lpips_weights="w.pth").resolved().perceptual == "lpips"
    with pytest.raises(ValueError, match="arch"):
        TrainConfig(data="d", out="o", arch="gan").resolved()
    with pytest.raises(ValueError, match="mirrors an s3:// dataset"):
        TrainConfig(data="s3://bucket/pairs", out="o").resolved()


def test_every_config_field_is_an_option() -> None:
    fields = {field.name for field in dataclasses.fields(TrainConfig)}
    assert {action.dest for action in build_parser()._actions} - {"help"} == fields
    # The options' defaults are the config's.
    assert config_from_args(["--data", "d", "--out", "o"]) == TrainConfig(data="d", out="o")
    # Each type parses, the eight options that the hand-written parser lacked among them.
    given = {
        "lr_decay_steps": 900,
        "min_lr_ratio": 0.05,
        "weight_decay": 0.01,
        "grad_clip": 0.0,
        "disc_channels": 16,
        "max_val_pairs": 64,
        "affine_fit_pairs": 128,
        "sample_pairs": 4,
        "max_minutes": 1.5,
        "mixed_precision": "bf16",
        "perceptual": "none",
        "channel_mults": (1, 2, 2),
    }
    argv = ["--data", "d", "--out", "o"]
    for name, value in given.items():
        text = ",".join(map(str, value)) if isinstance(value, tuple) else str(value)
        argv += ["--" + name.replace("_", "-"), text]
    parsed = config_from_args(argv)
    assert {name: getattr(parsed, name) for name in given} == given
    assert "(default: 1,2,4)" in build_parser().format_help()
    with pytest.raises(SystemExit):
        config_from_args(["--data", "d", "--out", "o", "--mixed-precision", "fp64"])


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.mark.integration
def test_two_processes_under_accelerate_launch_train_what_one_process_trains(pairs_dir: Path, tmp_path: Path) -> None:
    """`accelerate launch -m cli train` runs `refinery train` itself, with its `--data`. Two
    processes, each on its half of every global batch (DDP averages their gradients), end
    where one process on the whole batch ends, and only the main one exports."""
    common = {"steps": 4, "val_every": 2, "sample_every": 0, "checkpoint_every": 0}
    argv = ["--data", str(pairs_dir), "--out", str(tmp_path / "two"), "--batch-size", "2"]
    argv += ["--base-channels", "8", "--channel-mults", "1,2"]  # SMALL's networks
    for name, value in common.items():
        argv += ["--" + name.replace("_", "-"), str(value)]
    # `accelerate launch --cpu` starts one process however many are asked for (several CPU
    # processes need mpirun); torchrun's launcher starts two, and ACCELERATE_USE_CPU, which
    # --cpu sets, puts them on gloo.
    launcher = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2"]
    launcher += ["--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
    launched = subprocess.run(
        [*launcher, "--main_process_port", str(_free_port()), "-m", "cli", "train", *argv],
        env={**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert launched.returncode == 0, launched.stderr[-3000:]
    assert launched.stdout.count("refiner: ") == 1, launched.stdout
    two = tmp_path / "two" / "refiner"
    assert json.loads((two / "refiner.json").read_text())["processes"] == 2

    one = train(_config(pairs_dir, tmp_path / "one", batch_size=4, **common))
    assert json.loads((one / "refiner.json").read_text())["processes"] == 1
    one_weights, two_weights = load_refiner(one).network.state_dict(), load_refiner(two).network.state_dict()
    for key, value in one_weights.items():
        assert torch.allclose(value, two_weights[key], atol=1e-4), key
    with (tmp_path / "two" / "metrics.csv").open() as f:
        assert [int(r["step"]) for r in csv.DictReader(f)] == list(range(5))
