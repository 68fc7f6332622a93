"""The refiner's whole life, end to end through the real system, on the tiny presets.

    python benchmarks/refiner_pipeline.py [--pairs 4096] [--size 64] [--minutes 10] [--seeds 0 1 2]
        [--train-args "--gradient-weight 0 --perceptual-weight 0"] [--results PATH] [--work DIR]

1. a private stack (redis-server, S3, one pairs worker with tiny-schnell and tiny-dev
   resident) and ``refinery pairs generate`` into a local directory;
2. ``refinery train --arch unet-cbam`` once per seed, each capped at ``--minutes``;
3. ``refinery eval`` of each run on the held-out pairs.
Prints the acceptance figures (refined L1 against the student's and the affine colour
baseline's, FID refined vs student, same extractor) with their spread over the seeds, and
writes benchmarks/results/refiner_pipeline.json. Two figures put FID in context:

- the sampling floor: FID between the held-out teacher images and as many other teacher
  images; a student near it is already indistinguishable from the teacher in distribution;
- the L1/FID trade-off of blending each refined image back towards its student,
  `student + t * (refined - student)`, so one sees whether any point meets both bounds.

Takes about pairs/1000 + seeds x (minutes + 1) minutes on 2 cores (generation is skipped
for pairs already in `--work`).
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from devstack.stack import LocalStack
from refiner import load_refiner
from refiner.data import PairDataset, batched_pairs
from refiner.extractors import RandomConvFeatures
from refiner.metrics import fid_kid, quantize
from shared.datasets import MANIFEST_DIR

RESULTS = Path(__file__).parent / "results" / "refiner_pipeline.json"
BLENDS = (0.0, 0.25, 0.5, 0.75, 1.0)  # 0: the student, 1: the refiner's output


def refinery(env: dict, *args: str) -> None:
    subprocess.run([sys.executable, "-m", "cli", *args], env=env, check=True)


def images(dataset: PairDataset, count: int | None = None) -> dict[str, torch.Tensor]:
    """Student and teacher images of the first `count` pairs (default: all), `(N, 3, H, W)` each."""
    batches = list(batched_pairs(dataset, len(dataset) if count is None else count, 64))
    return {role: torch.cat([batch[role] for batch in batches]) for role in ("student", "teacher")}


@torch.inference_mode()
def fid_context(data: Path, refiner_dir: Path) -> dict:
    """The FID sampling floor and the L1/FID trade-off of blending refined towards student,
    on the held-out pairs, with evaluation's uncalibrated extractor."""
    val = images(PairDataset(data, "val"))
    other = images(PairDataset(data, "train"), len(val["teacher"]))  # unrelated pairs, same count
    extractor = RandomConvFeatures()
    teacher = extractor(val["teacher"])
    refined = load_refiner(refiner_dir)(val["student"])
    blends = []
    for t in BLENDS:
        blended = quantize(val["student"] + t * (refined - val["student"]))
        blends.append(
            {
                "t": t,
                "l1": (blended - val["teacher"]).abs().mean().item(),
                "fid": fid_kid(teacher, extractor(blended))["fid"],
            }
        )
    return {
        "fid_floor_teacher_vs_other_teacher": fid_kid(teacher, extractor(other["teacher"]))["fid"],
        "fid_other_student": fid_kid(teacher, extractor(other["student"]))["fid"],
        "blend_towards_refined": blends,
    }


def acceptance(run: dict) -> dict[str, bool]:
    """The refiner-effect issue's bounds, each on its own."""
    return {
        "fid_at_most_half_the_students": run["fid_refined_teacher"] <= 0.5 * run["fid_student_teacher"],
        "fid_intervals_apart": run["fid_refined_teacher_ci"][1] < run["fid_student_teacher_ci"][0],
        "kid_lower": run["kid_refined_teacher"] < run["kid_student_teacher"],
        "hf_ratio_in_0.85_1.15": 0.85 <= run["hf_ratio_refined"] <= 1.15,
        "l1_at_most_0.85x_student": run["refined_over_student"] <= 0.85,
        "l1_at_most_0.95x_affine": run["refined_over_affine"] <= 0.95,
        "gap_closed_at_least_half": run["fid_gap_closed"] >= 0.5,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pairs", type=int, default=4096)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument(
        "--steps-per-minute",
        type=int,
        default=55,
        help="sets the lr schedule's length; measured at 64 px here: 55 (default loss), 180 (L1 alone)",
    )
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--arch", default="unet-cbam", help="unet-cbam (paired), cyclegan or esa-cyclegan (unpaired)")
    parser.add_argument("--train-args", default="", help="extra `refinery train` options, e.g. the loss weights")
    parser.add_argument("--results", type=Path, default=RESULTS)
    parser.add_argument(
        "--work", type=Path, default=None, help="keep data and runs here (default: a temporary directory)"
    )
    args = parser.parse_args()

    work = args.work or Path(tempfile.mkdtemp(prefix="refinery-pipeline-"))
    data = work / "data"
    already_there = len(list((data / MANIFEST_DIR).glob("*.json")))
    started = time.perf_counter()
    with LocalStack(work / "stack", max_batch=16) as stack:
        stack.start_worker("pairs", [stack.settings.queue("pair")])
        refinery(
            stack.env,
            "pairs",
            "generate",
            "--count",
            str(args.pairs),
            "--out",
            str(data),
            "--width",
            str(args.size),
            "--height",
            str(args.size),
        )
        env = stack.env
    generate_s = time.perf_counter() - started

    runs = []
    for seed in args.seeds:
        run = work / f"{args.results.stem}-seed{seed}"  # one folder per result file: variants never collide
        began = time.perf_counter()
        steps = int(args.minutes * args.steps_per_minute)
        refinery(
            env,
            "train",
            "--data",
            str(data),
            "--arch",
            args.arch,
            "--out",
            str(run),
            "--seed",
            str(seed),
            "--steps",
            str(steps),
            "--max-minutes",
            str(args.minutes),
            *shlex.split(args.train_args),
        )
        train_s = time.perf_counter() - began
        refinery(env, "eval", "--data", str(data), "--refiner", str(run / "refiner"), "--out", str(run / "eval"))
        metrics = json.loads((run / "eval" / "metrics.json").read_text())
        paired, fid, kid, detail = metrics["paired"], metrics["fid"], metrics["kid"], metrics["detail"]
        runs.append(
            {
                "seed": seed,
                "arch": args.arch,
                "train_seconds": round(train_s, 1),
                "student_l1": paired["student"]["l1"],
                "affine_l1": paired["affine"]["l1"],
                "refined_l1": paired["refined"]["l1"],
                "refined_over_student": paired["refined"]["l1"] / paired["student"]["l1"],
                "refined_over_affine": paired["refined"]["l1"] / paired["affine"]["l1"],
                "fid_student_teacher": fid["student_teacher"],
                "fid_refined_teacher": fid["refined_teacher"],
                "fid_student_teacher_ci": fid["student_teacher_ci"],
                "fid_refined_teacher_ci": fid["refined_teacher_ci"],
                "fid_gap_closed": fid["gap_closed"],
                "fid_extractor": fid["extractor"],
                "kid_student_teacher": kid["student_teacher"],
                "kid_refined_teacher": kid["refined_teacher"],
                "hf_ratio_student": detail["student_hf_ratio"],
                "hf_ratio_refined": detail["refined_hf_ratio"],
                **fid_context(data, run / "refiner"),
            }
        )
        runs[-1]["acceptance"] = acceptance(runs[-1])

    def spread(key: str) -> dict:
        values = [r[key] for r in runs]
        return {"mean": statistics.mean(values), "min": min(values), "max": max(values)}

    result = {
        "pairs": args.pairs,
        "size": args.size,
        "minutes_per_run": args.minutes,
        "train_args": args.train_args,
        "pair_generation_seconds": round(generate_s, 1),
        "pairs_already_there": already_there,  # skipped by generation (resumed from --work)
        "arch": args.arch,
        "accepted_every_seed": all(all(r["acceptance"].values()) for r in runs),
        **{
            key: spread(key)
            for key in (
                "refined_over_student",
                "refined_over_affine",
                "fid_student_teacher",
                "fid_refined_teacher",
                "fid_gap_closed",
                "kid_refined_teacher",
                "hf_ratio_refined",
                "train_seconds",
            )
        },
        "runs": runs,
        "work": str(work),
    }
    args.results.parent.mkdir(parents=True, exist_ok=True)
    args.results.write_text(json.dumps(result, indent=2) + "\n")
    for r in runs:
        print(
            f"seed {r['seed']}: refined/student {r['refined_over_student']:.3f}, "
            f"refined/affine {r['refined_over_affine']:.3f}, "
            f"FID student {r['fid_student_teacher']:.3f} -> refined {r['fid_refined_teacher']:.3f} "
            f"({r['fid_extractor']}); "
            f"floor {r['fid_floor_teacher_vs_other_teacher']:.3f}; HF refined/teacher {r['hf_ratio_refined']:.3f}; "
            f"accepted: {all(r['acceptance'].values())}"
        )
        print(
            "  blend t:   "
            + "  ".join(f"{b['t']:.2f}: L1 {b['l1']:.4f} FID {b['fid']:.3f}" for b in r["blend_towards_refined"])
        )
    print(f"wrote {args.results}")


if __name__ == "__main__":
    main()
