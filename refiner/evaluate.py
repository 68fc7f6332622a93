"""Evaluate a refiner on held-out pairs: how close to the teacher it gets, for whom, at what cost.

    refinery eval --data DIR --refiner DIR [--out DIR] [--split val] [--inception-weights FILE]
                  [--bootstrap 100]

One pass over the split's pairs refines each student image and scores student, refined and
the affine colour-correction baseline against the teacher (`refiner.metrics`,
`refiner.spectrum`); FID and KID get 95% intervals from bootstrap resamples of the pairs,
recomputed from the features the extractor gave once. Then it writes

    out/metrics.json   the numbers, for tools (keys listed in `evaluate`)
    out/report.md      the numbers with their definitions, for people (`refiner.report`)
    out/spectrum.png   radially averaged power spectra of student, refined and teacher
    out/samples.png    up to 8 pairs: student | refined | teacher

The split is the one training used: the refiner's card (`refiner.export`) records its
`val_fraction` (and the affine baseline fitted on the training pairs).
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from refiner.baseline import apply_affine, fit_affine
from refiner.data import PairDataset, batched_pairs
from refiner.export import CARD_NAME, Refiner, load_refiner, read_card, record_evaluation
from refiner.extractors import build_extractor
from refiner.metrics import (
    bootstrap_fid_kid,
    fid_gap,
    fid_kid,
    paired_scores,
    percentile_interval,
    quantize,
)
from refiner.report import fmt, fmt_interval, plot_spectra, sample_grid, write_report
from refiner.spectrum import FREQUENCIES, HF_CUTOFF, spectral_scores
from shared.datasets import ManifestRow

logger = logging.getLogger(__name__)

# The prompt attributes a fairness breakdown is reported for (producer.prompts records them).
FAIRNESS_ATTRIBUTES = ("age_group", "gender_presentation", "ethnicity_region")
DEFAULT_VAL_FRACTION = 0.1  # PairDataset's and training's default
SAMPLE_PAIRS = 8
AFFINE_FIT_PAIRS = 1024  # as training fits it
SETS = ("student", "refined", "teacher")
BOOTSTRAP_RESAMPLES = 100
CONFIDENCE = 0.95


def comparability(extractor_name: str, calibrated: bool) -> str:
    """The plain statement `fid.comparable_with` records: which other FIDs these may be set against."""
    if calibrated:
        return (
            "standard FID (pytorch-fid's InceptionV3, 2048-d pool features): comparable with other standard "
            "FIDs computed on the same number of images at the same resolution"
        )
    return (
        f"only FIDs computed with this same extractor ({extractor_name}) on the same number of images; "
        "not with published FIDs, nor with FIDs from any other extractor"
    )


def bootstrap_intervals(
    feats: dict[str, torch.Tensor], points: dict[str, dict[str, float]], resamples: int, seed: int
) -> dict[str, list[float] | None]:
    """95% intervals of FID, KID (student and refined, against the teacher) and FIDdiff from
    `resamples` bootstrap resamples of the pairs (`refiner.metrics.bootstrap_fid_kid`), each
    centred on its full-sample value `points` (`percentile_interval`). Keys `fid_student`,
    `fid_refined`, `fiddiff`, `kid_student`, `kid_refined`; all `None` with no resamples."""
    keys = ("fid_student", "fid_refined", "fiddiff", "kid_student", "kid_refined")
    if resamples == 0:
        return dict.fromkeys(keys)
    values = bootstrap_fid_kid(
        feats["teacher"], {"student": feats["student"], "refined": feats["refined"]}, resamples, seed
    )
    fiddiff = values["student"]["fid"] - values["refined"]["fid"]  # (B,): same resample on both sides
    return {
        "fid_student": percentile_interval(values["student"]["fid"], points["student"]["fid"], CONFIDENCE),
        "fid_refined": percentile_interval(values["refined"]["fid"], points["refined"]["fid"], CONFIDENCE),
        "fiddiff": percentile_interval(fiddiff, points["student"]["fid"] - points["refined"]["fid"], CONFIDENCE),
        "kid_student": percentile_interval(values["student"]["kid"], points["student"]["kid"], CONFIDENCE),
        "kid_refined": percentile_interval(values["refined"]["kid"], points["refined"]["kid"], CONFIDENCE),
    }


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.inference_mode()
def time_refiner(refiner: Refiner, images: torch.Tensor, repeats: int = 3) -> float:
    """Milliseconds per image of the refiner on `images` (already on its device): one warm-up
    call (allocator, kernel selection), then the mean of `repeats` calls."""
    device = refiner.network.device
    images = images.to(device)
    refiner(images)
    _sync(device)
    start = time.perf_counter()
    for _ in range(repeats):
        refiner(images)
    _sync(device)
    return (time.perf_counter() - start) * 1000 / (repeats * images.shape[0])


def _ratio(numerator: float, denominator: float) -> float | None:
    return numerator / denominator if denominator > 0 else None


def generation_ms(rows: Sequence[ManifestRow], role: str) -> float | None:
    """Mean ms per image of `role` ("student" or "teacher") over the manifest rows that record
    it in `timings_ms`; `None` when none do."""
    values = [row.timings_ms[role] for row in rows if role in row.timings_ms]
    return float(np.mean(values)) if values else None


def fairness_breakdown(rows: Sequence[ManifestRow], scores: dict[str, torch.Tensor]) -> dict[str, dict[str, Any]]:
    """`{attribute: {value: group scores}}` for each of `FAIRNESS_ATTRIBUTES`, groups largest
    first; a row without the attribute counts as `"(missing)"`, so counts sum to the pairs."""
    breakdown = {}
    for attribute in FAIRNESS_ATTRIBUTES:
        members: dict[str, list[int]] = defaultdict(list)
        for index, row in enumerate(rows):
            members[row.attributes.get(attribute, "(missing)")].append(index)
        groups = {}
        for value, indices in sorted(members.items(), key=lambda item: (-len(item[1]), item[0])):
            s = {key: tensor[indices] for key, tensor in scores.items()}
            student_l1, refined_l1 = s["student_l1"].mean().item(), s["refined_l1"].mean().item()
            teacher_hf = s["teacher_hf"].sum().item()
            groups[value] = {
                "count": len(indices),
                "student_l1": student_l1,
                "refined_l1": refined_l1,
                "improvement": None if student_l1 == 0 else 1 - refined_l1 / student_l1,
                "student_psnr": s["student_psnr"].mean().item(),
                "refined_psnr": s["refined_psnr"].mean().item(),
                "student_hf_ratio": _ratio(s["student_hf"].sum().item(), teacher_hf),
                "refined_hf_ratio": _ratio(s["refined_hf"].sum().item(), teacher_hf),
            }
        breakdown[attribute] = groups
    return breakdown


def _affine_baseline(
    card: dict[str, Any], data: Path, val_fraction: float, evaluated: PairDataset
) -> tuple[torch.Tensor, torch.Tensor, str]:
    """`a`, `b` of the global colour correction and where they came from: the refiner's
    training card, else a fit on the training split, else (no training pairs) on the
    evaluated pairs themselves, which flatters the baseline and is said so."""
    if "affine_baseline" in card:
        fitted = card["affine_baseline"]
        source = f"from `{CARD_NAME}` (fitted on the training pairs)"
        return torch.tensor(fitted["a"]), torch.tensor(fitted["b"]), source
    train_set = PairDataset(data, "train", None, val_fraction)
    if len(train_set):
        a, b = fit_affine(train_set, AFFINE_FIT_PAIRS)
        return a, b, f"fitted here on {min(len(train_set), AFFINE_FIT_PAIRS)} training pairs"
    a, b = fit_affine(evaluated, AFFINE_FIT_PAIRS)
    return a, b, "fitted on the evaluated pairs themselves (no training pairs): an optimistic baseline"


def evaluate(
    data: Path,
    refiner: Path | None,
    out: Path,
    *,
    split: str = "val",
    batch_size: int = 16,
    device: str | torch.device = "cpu",
    inception_weights: Path | None = None,
    limit: int | None = None,
    val_fraction: float | None = None,
    bootstrap: int = BOOTSTRAP_RESAMPLES,
    seed: int = 0,
) -> dict[str, Any]:
    """Score the refiner at `refiner` (`None`: the identity) on the pairs of `split` in `data`,
    write the report to `out`, and return what `out/metrics.json` holds:

    `paired.{student,refined}.{l1,psnr,ssim}`, `paired.affine.l1`,
    `fid.{student_teacher,refined_teacher,fiddiff,gap_closed,extractor}`,
    `fid.{student_teacher_ci,refined_teacher_ci,fiddiff_ci}` (`[lo, hi]`, 95%),
    `fid.calibrated` (the standard InceptionV3 or not), `fid.comparable_with` (a sentence),
    `kid.{student_teacher,refined_teacher}`, `kid.{student_teacher_ci,refined_teacher_ci}`,
    `detail.{student_hf_ratio,refined_hf_ratio}`, `cost.{student_ms,teacher_ms,refiner_ms,reduction}`,
    `bootstrap.{resamples,confidence,seed,method}`, `fairness`, `pairs`, `split`,
    `refiner_version`. A score that cannot be computed (no timings in the manifest, a
    teacher without detail; intervals with `bootstrap=0`) is `null`.

    `limit` scores the first pairs of the split by id; `val_fraction` defaults to the one the
    refiner was trained with (its `refiner.json`), else 0.1. `bootstrap` is the number of
    resamples of the pairs behind each interval (0: none); `seed` fixes them and KID's subsets.
    """
    # 1. Check inputs; the refiner, its training card and the split it was validated on.
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if limit is not None and limit < 2:
        raise ValueError(f"limit must be >= 2 (FID needs two images per set), got {limit}")
    if bootstrap < 0:
        raise ValueError(f"bootstrap must be >= 0 resamples (0: no intervals), got {bootstrap}")
    card = read_card(refiner)
    if val_fraction is None:
        val_fraction = card.get("data", {}).get("val_fraction", DEFAULT_VAL_FRACTION)
    dataset = PairDataset(data, split, None, val_fraction)
    count = len(dataset) if limit is None else min(limit, len(dataset))
    if count < 2:
        raise ValueError(
            f"{data}: split {split!r} has {len(dataset)} pairs at val_fraction={val_fraction}; FID needs at least 2"
        )
    device = torch.device(device)
    model = load_refiner(refiner, device)
    a, b, affine_source = _affine_baseline(card, Path(data), val_fraction, dataset)
    extractor = build_extractor(inception_weights).to(device)

    # 2. One pass: refine, score each pair, keep spectra, features and the first samples.
    per_pair: dict[str, list[torch.Tensor]] = defaultdict(list)
    spectra = {name: np.zeros(len(FREQUENCIES)) for name in SETS}
    features: dict[str, list[torch.Tensor]] = defaultdict(list)
    samples: list[tuple[str, torch.Tensor, torch.Tensor, torch.Tensor]] = []
    refiner_ms = time_refiner(model, next(batched_pairs(dataset, count, batch_size))["student"])  # the first batch
    with torch.inference_mode(), tqdm(total=count, desc="eval", unit="pair", dynamic_ncols=True) as progress:
        for batch in batched_pairs(dataset, count, batch_size):
            student, teacher = batch["student"], batch["teacher"]  # (B, 3, H, W) on the CPU
            images = {"student": student, "refined": quantize(model(student)), "teacher": teacher}
            for name in ("student", "refined"):
                for key, values in paired_scores(images[name], teacher).items():
                    per_pair[f"{name}_{key}"].append(values)
            per_pair["affine_l1"].append(paired_scores(quantize(apply_affine(student, a, b)), teacher)["l1"])
            for name, image in images.items():
                profile, hf = spectral_scores(image)
                spectra[name] += profile.sum(0).numpy()
                per_pair[f"{name}_hf"].append(hf)
                features[name].append(extractor(image.to(device)).cpu())
            samples += list(zip(batch["pair_id"], student, images["refined"], teacher))[: SAMPLE_PAIRS - len(samples)]
            progress.update(student.shape[0])
    scores = {key: torch.cat(values) for key, values in per_pair.items()}
    feats = {name: torch.cat(values) for name, values in features.items()}  # (N, D) each

    # 3. Distribution scores: each set's features against the teacher's, and their intervals
    #    from resampling the pairs (the features are reused: the extractor ran once).
    student_dist = fid_kid(feats["teacher"], feats["student"], seed)
    refined_dist = fid_kid(feats["teacher"], feats["refined"], seed)
    fiddiff, gap_closed = fid_gap(student_dist["fid"], refined_dist["fid"])
    ci = bootstrap_intervals(feats, {"student": student_dist, "refined": refined_dist}, bootstrap, seed)
    calibrated = inception_weights is not None

    # 4. Cost: generation from the manifest (timed where the pairs were made), refinement here.
    rows = dataset.rows[:count]
    student_ms, teacher_ms = generation_ms(rows, "student"), generation_ms(rows, "teacher")
    reduction = (1 - (student_ms + refiner_ms) / teacher_ms) if student_ms is not None and teacher_ms else None

    mean = {key: values.mean().item() for key, values in scores.items()}
    teacher_hf = scores["teacher_hf"].sum().item()
    refined_hf_ratio = _ratio(scores["refined_hf"].sum().item(), teacher_hf)
    metrics = {
        "paired": {
            "student": {"l1": mean["student_l1"], "psnr": mean["student_psnr"], "ssim": mean["student_ssim"]},
            "refined": {"l1": mean["refined_l1"], "psnr": mean["refined_psnr"], "ssim": mean["refined_ssim"]},
            "affine": {"l1": mean["affine_l1"]},
        },
        "fid": {
            "student_teacher": student_dist["fid"],
            "refined_teacher": refined_dist["fid"],
            "fiddiff": fiddiff,
            "gap_closed": gap_closed,
            "extractor": extractor.name,
            "student_teacher_ci": ci["fid_student"],
            "refined_teacher_ci": ci["fid_refined"],
            "fiddiff_ci": ci["fiddiff"],
            "calibrated": calibrated,
            "comparable_with": comparability(str(extractor.name), calibrated),
        },
        "kid": {
            "student_teacher": student_dist["kid"],
            "refined_teacher": refined_dist["kid"],
            "student_teacher_ci": ci["kid_student"],
            "refined_teacher_ci": ci["kid_refined"],
        },
        "detail": {
            "student_hf_ratio": _ratio(scores["student_hf"].sum().item(), teacher_hf),
            "refined_hf_ratio": refined_hf_ratio,
        },
        "cost": {"student_ms": student_ms, "teacher_ms": teacher_ms, "refiner_ms": refiner_ms, "reduction": reduction},
        "bootstrap": {
            "resamples": bootstrap,
            "confidence": CONFIDENCE,
            "seed": seed,
            "method": "pairs resampled with replacement (student, refined and teacher together); "
            "percentile interval of the resampled values, shifted so their median is the full-sample value",
        },
        "fairness": fairness_breakdown(rows, scores),
        "pairs": count,
        "split": split,
        "refiner_version": model.version,
    }

    # 5. Write the numbers, the plots and the report.
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2, allow_nan=False))
    plot_spectra(out / "spectrum.png", FREQUENCIES, {name: total / count for name, total in spectra.items()}, HF_CUTOFF)
    sample_grid(out / "samples.png", samples)
    context = {
        "data": str(data),
        "device": str(device),
        "batch_size": batch_size,
        "affine_source": affine_source,
        "calibrated": calibrated,
        "kid_std": {"student": student_dist["kid_std"], "refined": refined_dist["kid_std"]},
        "cutoff": HF_CUTOFF,
    }
    write_report(out / "report.md", metrics, context)
    if refiner is not None and Path(refiner, CARD_NAME).is_file():
        # What `refinery refiner publish` requires and `refinery refiner list` shows.
        record_evaluation(
            Path(refiner),
            {
                "split": split,
                "pairs": count,
                "detail_ratio": refined_hf_ratio,
                "gap_closed": gap_closed,
                "l1_vs_student": _ratio(mean["refined_l1"], mean["student_l1"]),
                "metrics": str(out.resolve() / "metrics.json"),
            },
        )
    logger.info("wrote %s (metrics.json, report.md, spectrum.png, samples.png)", out)
    return metrics


# --- command line ----------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="refinery eval", description="Evaluate a refiner against the teacher.")
    p.add_argument("--data", required=True, type=Path, help="dataset directory (pairs/ and manifest/)")
    p.add_argument("--refiner", required=True, type=Path, help="exported refiner directory")
    p.add_argument("--out", type=Path, default=None, help="report directory (default: eval-SPLIT beside the refiner)")
    p.add_argument("--split", choices=("val", "train", "all"), default="val")
    p.add_argument(
        "--inception-weights",
        type=Path,
        default=None,
        help="local pt_inception-2015-12-05-*.pth (pytorch-fid's); without it FID is uncalibrated",
    )
    p.add_argument("--limit", type=int, default=None, help="score only the first N pairs of the split")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--val-fraction", type=float, default=None, help="default: the refiner's training value, else 0.1")
    p.add_argument(
        "--bootstrap",
        type=int,
        default=BOOTSTRAP_RESAMPLES,
        metavar="N",
        help="resamples of the pairs behind the 95%% intervals of FID and KID (0: no intervals)",
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the bootstrap resamples and KID's subsets")
    return p


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    out = args.out or args.refiner.parent / f"eval-{args.split}"
    m = evaluate(
        args.data,
        args.refiner,
        out,
        split=args.split,
        batch_size=args.batch_size,
        device=args.device,
        inception_weights=args.inception_weights,
        limit=args.limit,
        val_fraction=args.val_fraction,
        bootstrap=args.bootstrap,
        seed=args.seed,
    )
    p, fid, cost = m["paired"], m["fid"], m["cost"]
    print(f"{m['pairs']} {m['split']} pairs, refiner {m['refiner_version']}")
    print(
        f"L1 to teacher: student {p['student']['l1']:.5f}  affine {p['affine']['l1']:.5f}  "
        f"refined {p['refined']['l1']:.5f}"
    )
    print(
        f"FID to teacher: student {fid['student_teacher']:.3f}{fmt_interval(fid['student_teacher_ci'], '.3f')}  "
        f"refined {fid['refined_teacher']:.3f}{fmt_interval(fid['refined_teacher_ci'], '.3f')}  "
        f"FIDdiff {fid['fiddiff']:.3f}{fmt_interval(fid['fiddiff_ci'], '.3f')}  gap closed {fmt(fid['gap_closed'], '.1%')}"
    )
    print(f"FID extractor: {fid['extractor']}; comparable with {fid['comparable_with']}")
    print(
        f"HF energy / teacher: student {fmt(m['detail']['student_hf_ratio'], '.3f')}  "
        f"refined {fmt(m['detail']['refined_hf_ratio'], '.3f')}"
    )
    print(
        f"ms per image: student {fmt(cost['student_ms'], '.2f')}  teacher {fmt(cost['teacher_ms'], '.2f')}  "
        f"refiner {cost['refiner_ms']:.2f}  cost reduction {fmt(cost['reduction'], '.1%')}"
    )
    print(f"report: {out / 'report.md'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
