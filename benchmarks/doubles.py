"""How the offline doubles differ: detail loss, related content, and a gap FID can see.

    python benchmarks/doubles.py [--pairs 512] [--size 64] [--sweep 0.5 0.6 0.7 1.0]

tiny-schnell (the student: 4 steps, no guidance) and tiny-dev (the teacher: 28 steps,
guidance 3.5) are built into a fresh model cache and loaded from it as a worker loads them
(`worker.models.load_pipeline`, i.e. `FluxPipeline.from_pretrained`), then called directly
(`worker.models.generate`), no queue. Prompts and seeds are held out from the pair datasets
(`refinery pairs generate` uses prompt stream 0 and image seeds 0, 1, ...): prompt stream 1,
image seeds from 1,000,000. Images are rounded to 8 bits, as they are served. Two disjoint
halves A and B of `--pairs` pairs each:
  detail   the student's high-frequency energy over the teacher's (`refiner.spectrum.
           spectral_scores`: energy above 0.25 cycles/px), mean over all pairs of both halves;
  related  the Pearson correlation of each student's pixels with its teacher's (mean, min);
  FID      on the project's extractor (`build_extractor(None)`: the fixed-seed random conv
           net, since no Inception weights exist offline), N images a side:
           floor = FID(teacher A, teacher B), the sampling noise of two teacher sets;
           gap   = FID(student A, teacher B), the same comparison with the student's images;
           also FID(student A, teacher A), the paired sets.
`--sweep` adds the detail and related scores and the gap for other blur sigmas on half A (the
student's VAE swapped in memory for one with that low-pass): the calibration behind the
shipped sigma. Writes benchmarks/results/doubles.json and a contact sheet, docs/doubles.png.
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

import torch
from diffusers import FluxPipeline

from producer.prompts import build_prompts
from refiner.extractors import build_extractor
from refiner.metrics import fid_kid, quantize
from refiner.report import sample_grid
from refiner.spectrum import HF_CUTOFF, spectral_scores
from shared.presets import get_preset
from worker import tiny_flux
from worker.models import generate, load_pipeline

RESULTS = Path(__file__).parent / "results" / "doubles.json"
SHEET = Path(__file__).parent.parent / "docs" / "doubles.png"
PROMPT_STREAM = 1  # pair datasets use stream 0
FIRST_SEED = 1_000_000
SHEET_ROWS = 6
CPU = torch.device("cpu")


def images(
    pipe: FluxPipeline, preset: str, prompts: list[str], seeds: list[int], size: int, batch: int
) -> torch.Tensor:
    """`(N, 3, size, size)` 8-bit-rounded images of `preset`'s steps and guidance, `batch` per call."""
    p = get_preset(preset)
    out = []
    for start in range(0, len(prompts), batch):
        out.append(
            generate(
                pipe,
                prompts[start : start + batch],
                seeds[start : start + batch],
                width=size,
                height=size,
                steps=p.steps,
                guidance=p.guidance,
                max_sequence_length=p.max_sequence_length,
            )
        )
    return quantize(torch.cat(out))


def correlation(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Pearson correlation of each image's pixels with its partner's, `(N,)`."""
    a, b = a.flatten(1).double(), b.flatten(1).double()
    a, b = a - a.mean(1, keepdim=True), b - b.mean(1, keepdim=True)
    return (a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1))


@torch.no_grad()
def features(extractor: torch.nn.Module, images: torch.Tensor) -> torch.Tensor:
    return torch.cat([extractor(chunk) for chunk in images.split(256)])


def detail_and_relation(student: torch.Tensor, teacher: torch.Tensor) -> dict[str, float]:
    _, hf_student = spectral_scores(student)
    _, hf_teacher = spectral_scores(teacher)
    corr = correlation(student, teacher)
    return {
        "hf_ratio": (hf_student.mean() / hf_teacher.mean()).item(),
        "hf_ratio_per_pair_median": (hf_student / hf_teacher).median().item(),
        "corr_mean": corr.mean().item(),
        "corr_min": corr.min().item(),
        "l1": (student - teacher).abs().mean().item(),
    }


def contact_sheet(path: Path, student: torch.Tensor, teacher: torch.Tensor, note: str) -> None:
    """One pair per row, `student | teacher`, each row labelled with the student's
    high-frequency energy over its teacher's."""
    _, hf_student = spectral_scores(student)
    _, hf_teacher = spectral_scores(teacher)
    rows = [(f"HF ratio {(s / t).item():.2f}", *pair) for s, t, *pair in zip(hf_student, hf_teacher, student, teacher)]
    sample_grid(path, rows, title=[note], columns=("tiny-schnell", "tiny-dev"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pairs", type=int, default=512, help="pairs per half (two halves: A and B)")
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument(
        "--sweep", type=float, nargs="*", default=[0.5, 0.6, 0.7, 1.0], help="other blur sigmas (px) to score on half A"
    )
    parser.add_argument("--results", type=Path, default=RESULTS)
    parser.add_argument("--sheet", type=Path, default=SHEET)
    args = parser.parse_args()
    started = time.perf_counter()
    torch.set_grad_enabled(False)

    n = args.pairs
    prompts = [p.text for p in build_prompts(2 * n, seed=PROMPT_STREAM)]
    seeds = list(range(FIRST_SEED, FIRST_SEED + 2 * n))
    timings: dict[str, float] = {}

    # 1. Load the pair as a worker does: built into a (fresh) model cache, then from_pretrained.
    with tempfile.TemporaryDirectory() as cache:
        t = time.perf_counter()
        student_pipe, teacher_pipe = (
            load_pipeline(get_preset(name), model_path=None, cache_dir=Path(cache), device=CPU, dtype=torch.float32)
            for name in ("tiny-schnell", "tiny-dev")
        )
        timings["build_and_load_s"] = time.perf_counter() - t

    # 2. Generate both halves.
    t = time.perf_counter()
    teacher = images(teacher_pipe, "tiny-dev", prompts, seeds, args.size, args.batch)
    timings["teacher_s"] = time.perf_counter() - t
    print(f"{2 * n} teacher images in {timings['teacher_s']:.1f} s")
    t = time.perf_counter()
    student = images(student_pipe, "tiny-schnell", prompts, seeds, args.size, args.batch)
    timings["student_s"] = time.perf_counter() - t
    print(f"{2 * n} student images in {timings['student_s']:.1f} s")

    # 3. Detail and relation on every pair; FID on the halves.
    pairs = detail_and_relation(student, teacher)
    extractor = build_extractor(None)
    feats_teacher, feats_student = features(extractor, teacher), features(extractor, student)
    a, b = slice(0, n), slice(n, 2 * n)
    floor = fid_kid(feats_teacher[a], feats_teacher[b])
    gap = fid_kid(feats_teacher[b], feats_student[a])
    paired = fid_kid(feats_teacher[a], feats_student[a])
    print(f"detail: student HF energy / teacher's {pairs['hf_ratio']:.3f} (bound <= 0.6)")
    print(f"related: pixel correlation mean {pairs['corr_mean']:.3f}, min {pairs['corr_min']:.3f} (bound >= 0.8)")
    print(
        f"FID floor (teacher A vs teacher B) {floor['fid']:.4f}; FID(student A, teacher B) {gap['fid']:.4f} "
        f"= {gap['fid'] / floor['fid']:.1f}x the floor (bound >= 5x); paired FID(student A, teacher A) {paired['fid']:.4f}"
    )

    # 4. The calibration: other sigmas for the student's low-pass, on half A.
    sweep = []
    for sigma in args.sweep:
        student_pipe.vae = tiny_flux.low_passed(teacher_pipe.vae, sigma)
        other = images(student_pipe, "tiny-schnell", prompts[a], seeds[a], args.size, args.batch)
        row = {
            "blur_sigma": sigma,
            **detail_and_relation(other, teacher[a]),
            "fid_vs_teacher_b": fid_kid(feats_teacher[b], features(extractor, other))["fid"],
        }
        row["fid_over_floor"] = row["fid_vs_teacher_b"] / floor["fid"]
        sweep.append(row)
        print(
            f"  sigma {sigma:.2f}: HF ratio {row['hf_ratio']:.3f}, corr {row['corr_mean']:.3f}, "
            f"FID {row['fid_vs_teacher_b']:.4f} ({row['fid_over_floor']:.1f}x the floor)"
        )

    student_spec = tiny_flux.STUDENTS["tiny-schnell"]
    contact_sheet(
        args.sheet,
        student[:SHEET_ROWS],
        teacher[:SHEET_ROWS],
        f"blur sigma {student_spec.blur_sigma} px; HF ratio {pairs['hf_ratio']:.2f}, corr {pairs['corr_mean']:.2f} "
        f"over {2 * n} pairs",
    )
    timings["total_s"] = time.perf_counter() - started
    result = {
        "what": "tiny-schnell vs tiny-dev: detail loss, related content, FID gap (benchmarks/doubles.py)",
        "pairs": 2 * n,
        "fid_images_per_side": n,
        "size": args.size,
        "held_out": {"prompt_stream": PROMPT_STREAM, "first_seed": FIRST_SEED},
        "student": {"preset": "tiny-schnell", **_sampling("tiny-schnell")},
        "teacher": {"preset": "tiny-dev", **_sampling("tiny-dev")},
        "construction": {
            "build_version": tiny_flux.BUILD_VERSION,
            "student_transformer": f"{student_spec.teacher}'s, guidance {student_spec.baked_guidance} folded into "
            "its timestep embedding (guidance_embeds=False)",
            "student_vae": "the shared VAE with a fixed 3x3 Gaussian low-pass folded into the decoder's conv_out",
            "blur_sigma_px": student_spec.blur_sigma,
            "shared": ["text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2"],
        },
        "properties": {
            "detail": {
                "student_hf_over_teacher": pairs["hf_ratio"],
                "bound": "<= 0.6",
                "cutoff_cycles_per_px": HF_CUTOFF,
                "per_pair_median": pairs["hf_ratio_per_pair_median"],
            },
            "related": {
                "pixel_corr_mean": pairs["corr_mean"],
                "pixel_corr_min": pairs["corr_min"],
                "bound": ">= 0.8",
                "l1": pairs["l1"],
            },
            "fid": {
                "extractor": extractor.name,
                "floor_teacher_a_vs_teacher_b": floor["fid"],
                "student_a_vs_teacher_b": gap["fid"],
                "over_floor": gap["fid"] / floor["fid"],
                "bound": ">= 5x",
                "student_a_vs_teacher_a_paired": paired["fid"],
                "kid": {"floor": floor["kid"], "student_a_vs_teacher_b": gap["kid"]},
            },
        },
        "sweep_half_a": sweep,
        "timings_s": {k: round(v, 2) for k, v in timings.items()},
        "machine": {
            "cpu_threads": torch.get_num_threads(),
            "python": platform.python_version(),
            "torch": torch.__version__,
        },
    }
    args.results.parent.mkdir(parents=True, exist_ok=True)
    args.results.write_text(json.dumps(result, indent=2) + "\n")
    print(f"done in {timings['total_s']:.0f} s; wrote {args.results} and {args.sheet}")


def _sampling(preset: str) -> dict[str, float]:
    p = get_preset(preset)
    return {"steps": p.steps, "guidance": p.guidance}


if __name__ == "__main__":
    main()
