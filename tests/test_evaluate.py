"""Unit tests for refiner evaluation (`refiner.evaluate`, `refiner.metrics`, `refiner.extractors`,
`refiner.report`).

The pair sets are synthetic, written in the pairs layout without any diffusion model: the
teacher is a smooth random field with fine texture on top, the student variants are the
teacher itself, the teacher blurred and colour-shifted (it lacks high frequencies, as a
distilled model's images do), or a pure per-channel colour shift. Every evaluation runs the
identity refiner and the uncalibrated extractor on 24 pairs of 64x64: about a second each.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from refiner import RefinerUNet
from refiner.data import PairDataset
from refiner.evaluate import FAIRNESS_ATTRIBUTES, bootstrap_intervals, evaluate, main
from refiner.extractors import InceptionV3FID, build_extractor, load_inception
from refiner.metrics import fid_gap, fid_kid
from shared.datasets import MANIFEST_DIR, ManifestRow, PresetRow, pair_paths

SIZE, PAIRS = 64, 24
ATTRIBUTES = {
    "age_group": ["young_adult", "adult", "senior"],
    "gender_presentation": ["woman", "man"],
    "ethnicity_region": ["east_asian", "west_african", "northern_european", "south_asian"],
}
SHIFT_A, SHIFT_B = np.array([0.6, 0.8, 0.5]), np.array([0.3, 0.05, 0.4])


def teacher_image(rng: np.random.Generator) -> np.ndarray:
    """A smooth colour field (8x8 noise, upsampled) plus pixel-level texture, (H, W, 3) in [0, 1]."""
    coarse = Image.fromarray((rng.random((8, 8, 3)) * 255).astype(np.uint8)).resize((SIZE, SIZE), Image.BICUBIC)
    texture = rng.normal(0, 0.08, (SIZE, SIZE, 1))
    return np.clip(np.asarray(coarse) / 255 * 0.7 + 0.15 + texture, 0, 1)


def blur(image: np.ndarray) -> np.ndarray:
    """5x5 box blur (edges replicated): removes most energy above a quarter of the sample rate."""
    padded = np.pad(image, ((2, 2), (2, 2), (0, 0)), mode="edge")
    return sum(padded[dy : dy + SIZE, dx : dx + SIZE] for dy in range(5) for dx in range(5)) / 25


def write_pairs(root: Path, student_of) -> Path:
    rng = np.random.default_rng(0)
    (root / MANIFEST_DIR).mkdir(parents=True)
    for index in range(PAIRS):
        pair_id = f"pair{index:03d}"
        paths = pair_paths(pair_id)
        teacher = teacher_image(rng)
        (root / paths["teacher"]).parent.mkdir(parents=True)
        for name, image in (("teacher", teacher), ("student", student_of(teacher))):
            Image.fromarray((np.clip(image, 0, 1) * 255).round().astype(np.uint8)).save(root / paths[name])
        row = ManifestRow(
            pair_id=pair_id,
            prompt=f"portrait {index}",
            attributes={name: values[index % len(values)] for name, values in ATTRIBUTES.items()},
            seed=index,
            width=SIZE,
            height=SIZE,
            student=PresetRow(preset="tiny-schnell", steps=4, guidance=0.0),
            teacher=PresetRow(preset="tiny-dev", steps=28, guidance=3.5),
            timings_ms={"student": 3.5, "teacher": 13.5},
        )
        (root / paths["manifest"]).write_text(row.model_dump_json())
    return root


@pytest.fixture(scope="module")
def identical(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, Path]:
    root = write_pairs(tmp_path_factory.mktemp("identical"), lambda teacher: teacher)
    out = root / "eval"
    return evaluate(root, None, out, split="all"), out


@pytest.fixture(scope="module")
def blurred(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, Path]:
    root = write_pairs(tmp_path_factory.mktemp("blurred"), lambda teacher: blur(teacher) * 0.9 + 0.05)
    out = root / "eval"
    return evaluate(root, None, out, split="all"), out


def test_identical_sets_score_perfectly(identical) -> None:
    metrics, _ = identical
    for name in ("student", "refined"):  # the identity refiner returns the student, pixel for pixel
        assert metrics["paired"][name]["l1"] == 0
        assert metrics["paired"][name]["psnr"] == pytest.approx(100)  # the cap for identical images
        assert metrics["paired"][name]["ssim"] == pytest.approx(1, abs=1e-6)
        assert metrics["detail"][f"{name}_hf_ratio"] == pytest.approx(1)
    assert metrics["fid"]["student_teacher"] == pytest.approx(0, abs=1e-3)
    assert metrics["fid"]["gap_closed"] is None  # no gap to close
    assert "uncalibrated" in metrics["fid"]["extractor"]


def test_blurred_student_lacks_detail_and_identity_refiner_changes_nothing(blurred, identical) -> None:
    metrics, _ = blurred
    assert metrics["detail"]["student_hf_ratio"] < 0.5
    assert metrics["paired"]["student"]["l1"] > 0.03
    assert metrics["fid"]["student_teacher"] > 100 * max(abs(identical[0]["fid"]["student_teacher"]), 1e-3)
    assert metrics["kid"]["student_teacher"] > identical[0]["kid"]["student_teacher"]
    # The identity refiner: refined scores are the student's, so FIDdiff is 0 and nothing is closed.
    assert metrics["paired"]["refined"] == metrics["paired"]["student"]
    assert metrics["detail"]["refined_hf_ratio"] == metrics["detail"]["student_hf_ratio"]
    assert metrics["fid"]["refined_teacher"] == pytest.approx(metrics["fid"]["student_teacher"])
    assert metrics["fid"]["fiddiff"] == pytest.approx(0, abs=1e-6)
    assert metrics["fid"]["gap_closed"] == pytest.approx(0, abs=1e-6)
    # A colour correction undoes the shift but not the blur.
    assert 0 < metrics["paired"]["affine"]["l1"] < metrics["paired"]["student"]["l1"]


def test_fid_gap_arithmetic() -> None:
    assert fid_gap(40.0, 10.0) == (30.0, 0.75)
    assert fid_gap(40.0, 0.0) == (40.0, 1.0)  # refined indistinguishable from the teacher
    assert fid_gap(40.0, 50.0) == (-10.0, -0.25)  # the refiner made it worse
    assert fid_gap(0.0, 5.0) == (-5.0, None)  # no gap to close: the share is undefined


def test_metrics_json_keys_fairness_and_pngs(blurred) -> None:
    metrics, out = blurred
    assert json.loads((out / "metrics.json").read_text()) == metrics
    expected = {
        "paired": {"student": {"l1", "psnr", "ssim"}, "refined": {"l1", "psnr", "ssim"}, "affine": {"l1"}},
        "fid": {
            "student_teacher",
            "refined_teacher",
            "fiddiff",
            "gap_closed",
            "extractor",
            "student_teacher_ci",
            "refined_teacher_ci",
            "fiddiff_ci",
            "calibrated",
            "comparable_with",
        },
        "kid": {"student_teacher", "refined_teacher", "student_teacher_ci", "refined_teacher_ci"},
        "detail": {"student_hf_ratio", "refined_hf_ratio"},
        "cost": {"student_ms", "teacher_ms", "refiner_ms", "reduction"},
        "bootstrap": {"resamples", "confidence", "seed", "method"},
    }
    assert set(metrics) == {*expected, "fairness", "pairs", "split", "refiner_version"}
    for group, keys in expected.items():
        if isinstance(keys, dict):
            assert {k: set(v) for k, v in metrics[group].items()} == keys
        else:
            assert set(metrics[group]) == keys
    assert (metrics["pairs"], metrics["split"], metrics["refiner_version"]) == (PAIRS, "all", "identity")

    # One entry per attribute value, counts summing to the pairs; identity: improvement 0 everywhere.
    assert set(metrics["fairness"]) == set(FAIRNESS_ATTRIBUTES)
    for attribute, values in ATTRIBUTES.items():
        groups = metrics["fairness"][attribute]
        assert set(groups) == set(values)
        assert sum(g["count"] for g in groups.values()) == PAIRS
        assert all(g["improvement"] == 0 and g["student_hf_ratio"] < 1 for g in groups.values())

    cost = metrics["cost"]
    assert (cost["student_ms"], cost["teacher_ms"]) == (3.5, 13.5)
    assert cost["refiner_ms"] > 0
    assert cost["reduction"] == pytest.approx(1 - (3.5 + cost["refiner_ms"]) / 13.5)

    for name in ("spectrum.png", "samples.png"):
        with Image.open(out / name) as image:
            assert image.format == "PNG" and image.width > 100
            image.verify()
    with Image.open(out / "samples.png") as image:  # 8 rows of 64 px enlarged to 128, under a header
        assert image.height == 16 + 8 * 128
    report = (out / "report.md").read_text()
    assert "FIDdiff = FID(student, teacher) - FID(refined, teacher)" in report
    assert "uncalibrated" in report and "ethnicity_region" in report


def test_affine_baseline_fixes_a_pure_colour_shift(tmp_path: Path) -> None:
    root = write_pairs(tmp_path / "shift", lambda teacher: teacher * SHIFT_A + SHIFT_B)
    metrics = evaluate(root, None, tmp_path / "eval", split="all")
    assert metrics["paired"]["student"]["l1"] > 0.05
    assert metrics["paired"]["affine"]["l1"] < 0.005  # only 8-bit rounding is left


def test_cli_reads_the_training_card(tmp_path: Path, blurred) -> None:
    data = blurred[1].parent
    refiner_dir = tmp_path / "run" / "refiner"
    RefinerUNet(base_channels=8, channel_mults=(1, 2)).save_pretrained(refiner_dir)
    # The card's split and affine baseline are the ones used: a = 1, b = 0 is the student itself.
    card = {"data": {"val_fraction": 0.5}, "affine_baseline": {"a": [1.0] * 3, "b": [0.0] * 3}}
    (refiner_dir / "refiner.json").write_text(json.dumps(card))
    assert main(["--data", str(data), "--refiner", str(refiner_dir), "--limit", "5"]) == 0
    metrics = json.loads((tmp_path / "run" / "eval-val" / "metrics.json").read_text())
    assert metrics["split"] == "val" and metrics["pairs"] == min(5, len(PairDataset(data, "val", val_fraction=0.5)))
    assert metrics["refiner_version"].startswith("refiner@")
    assert metrics["paired"]["affine"]["l1"] == pytest.approx(metrics["paired"]["student"]["l1"])


def test_inception_weights_load_by_name_and_wrong_files_are_refused(tmp_path: Path) -> None:
    # Random weights saved under the reference file's keys, classifier included, load and run.
    state = InceptionV3FID().state_dict()
    state.update({"fc.weight": torch.zeros(1008, 2048), "fc.bias": torch.zeros(1008)})
    torch.save(state, tmp_path / "pt_inception-2015-12-05-test.pth")
    extractor = build_extractor(tmp_path / "pt_inception-2015-12-05-test.pth")
    assert extractor.name == "inception-v3-fid (pt_inception-2015-12-05-test.pth)"
    with torch.inference_mode():
        assert extractor(torch.rand(1, 3, 48, 48)).shape == (1, 2048)
    torch.save({"conv.weight": torch.zeros(1)}, tmp_path / "other.pth")
    with pytest.raises(ValueError, match="not a pt_inception"):
        load_inception(tmp_path / "other.pth")


# --- bootstrap intervals and the extractor's honesty -------------------------------------


def test_intervals_contain_the_point_values_and_say_what_compares(blurred, identical, capsys) -> None:
    metrics, out = blurred
    fid, kid = metrics["fid"], metrics["kid"]
    assert metrics["bootstrap"]["resamples"] == 100 and metrics["bootstrap"]["confidence"] == 0.95
    for interval, value in (
        (fid["student_teacher_ci"], fid["student_teacher"]),
        (fid["refined_teacher_ci"], fid["refined_teacher"]),
        (fid["fiddiff_ci"], fid["fiddiff"]),
        (kid["student_teacher_ci"], kid["student_teacher"]),
        (kid["refined_teacher_ci"], kid["refined_teacher"]),
    ):
        assert interval[0] <= value + 1e-9 and value - 1e-9 <= interval[1]
    assert fid["student_teacher_ci"][1] > fid["student_teacher_ci"][0]
    # The identity refiner: every resample gives refined == student, so FIDdiff is 0 throughout.
    assert fid["fiddiff_ci"] == pytest.approx([0, 0], abs=1e-6)
    # Identical sets stay identical under any resample of the pairs.
    assert identical[0]["fid"]["student_teacher_ci"] == pytest.approx([0, 0], abs=1e-3)

    # Without an InceptionV3 file: not calibrated, and every output says what the FIDs compare with.
    assert fid["calibrated"] is False
    assert "not with published FIDs" in fid["comparable_with"] and fid["extractor"] in fid["comparable_with"]
    report = (out / "report.md").read_text()
    assert fid["comparable_with"] in report and "bootstrap intervals from 100 resamples" in report
    RefinerUNet().save_pretrained(out.parent / "untrained")  # zero last conv: the identity
    argv = ["--data", str(out.parent), "--refiner", str(out.parent / "untrained"), "--out", str(out.parent / "cli")]
    assert main([*argv, "--split", "all", "--bootstrap", "0"]) == 0
    printed = capsys.readouterr().out
    assert f"FID extractor: {fid['extractor']}; comparable with only FIDs computed with this same" in printed
    no_intervals = json.loads((out.parent / "cli" / "metrics.json").read_text())
    assert no_intervals["fid"]["student_teacher_ci"] is None and no_intervals["bootstrap"]["resamples"] == 0
    assert no_intervals["fid"]["student_teacher"] == fid["student_teacher"]  # the point values do not move


def test_bootstrap_intervals_are_seeded_and_separate_distinct_sets() -> None:
    # 200 pairs of 16-d features: the student far from the teacher, the refined one close to it.
    g = torch.Generator().manual_seed(0)
    teacher = torch.randn(200, 16, generator=g)
    feats = {
        "teacher": teacher,
        "student": 0.6 * teacher + 0.8 * torch.randn(200, 16, generator=g) + 0.5,
        "refined": 0.95 * teacher + 0.3 * torch.randn(200, 16, generator=g),
    }
    points = {name: fid_kid(teacher, feats[name]) for name in ("student", "refined")}
    ci = bootstrap_intervals(feats, points, 200, seed=0)
    for key in ("fid", "kid"):
        for name in ("student", "refined"):
            lo, hi = ci[f"{key}_{name}"]
            assert lo <= points[name][key] <= hi and lo < hi
        assert ci[f"{key}_refined"][1] < ci[f"{key}_student"][0]  # clearly separated: no overlap
    assert ci["fiddiff"][0] > 0
    assert bootstrap_intervals(feats, points, 200, seed=0) == ci  # reproducible
    assert bootstrap_intervals(feats, points, 200, seed=1) != ci
    assert bootstrap_intervals(feats, points, 0, seed=0) == dict.fromkeys(ci)
    with pytest.raises(ValueError, match="bootstrap must be >= 0"):
        evaluate(Path("unused"), None, Path("unused"), bootstrap=-1)
