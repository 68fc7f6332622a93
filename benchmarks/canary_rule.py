"""How often the canary rule rolls back a canary as good as stable, and how fast it catches
a bad one, on the quality marks real refiners give.

    python benchmarks/canary_rule.py [--images 512] [--streams 4000] [--jobs 1000]

1. Marks: tiny-schnell images at 64 px (the offline double of the generator), refined by
   the demo refiner (stable), by a negligibly perturbed copy of it (a canary as good as
   stable, other bytes), and by a refiner trained to blur (a bad canary); each detail ratio
   judged by the worker's own ``QualityMonitor`` with the default settings.
2. Streams: jobs split 50/50 between stable and a canary, each job's mark drawn from its
   arm's measured marks, the rule (``shared.canary``, default settings) applied after every
   job, as workers apply it after every poll: the share of streams in which the rule ever
   rolls the canary back within ``--jobs`` jobs, with a 95% (Wilson) interval, and for the
   bad canary how many jobs it took.

Writes benchmarks/results/canary_rule.json.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import statistics
import tempfile
from pathlib import Path

import torch
from rich.console import Console
from tqdm import tqdm

from devstack.refiner_doubles import blurring_refiner_network, perturbed_copy
from refiner import load_refiner
from refiner.export import Refiner
from shared.canary import CanaryRule, Tally
from shared.settings import Settings
from worker.quality import QualityMonitor
from worker.tiny_flux import build_tiny_pipeline

RESULTS = Path(__file__).parent / "results" / "canary_rule.json"
DEMO_REFINER = Path(__file__).parents[1] / "devstack" / "demo_refiner"
console = Console()


def tiny_images(count: int, size: int = 64, batch: int = 32) -> torch.Tensor:
    """(count, 3, size, size) tiny-schnell images in [0, 1], seeds 0..count-1."""
    pipe = build_tiny_pipeline("tiny-schnell")
    pipe.set_progress_bar_config(disable=True)
    images = []
    for start in tqdm(range(0, count, batch), desc="images", unit="batch"):
        seeds = range(start, min(count, start + batch))
        out = pipe(
            prompt=[f"portrait {seed}" for seed in seeds],
            generator=[torch.Generator().manual_seed(seed) for seed in seeds],
            width=size,
            height=size,
            num_inference_steps=4,
            guidance_scale=0.0,
            max_sequence_length=77,
            output_type="pt",
        ).images
        images.append(out.float())
    return torch.cat(images)


def marks(refiner: Refiner, images: torch.Tensor) -> list[tuple[float, bool]]:
    """Each image's (detail ratio, flagged), judged as a worker with default settings judges them."""
    monitor = QualityMonitor(Settings(_env_file=None))
    _, ratios = refiner.refine_and_score(images)
    judged = [monitor.judge(refiner.version, ratio) for ratio in ratios.tolist()]
    return [(quality.detail_ratio, quality.flagged) for quality in judged]


def stream(rule: CanaryRule, rng: random.Random, stable: list, canary: list, jobs: int) -> int | None:
    """The job after which the rule rolls the canary back, or None."""
    arms = [Tally(), Tally()]
    for job in range(1, jobs + 1):
        arm = rng.random() < 0.5
        ratio, flagged = rng.choice(canary if arm else stable)
        arms[arm] = arms[arm].add(ratio, flagged)
        if rule.verdict(arms[0], arms[1]):
            return job
    return None


def wilson(successes: int, trials: int, z: float = 1.96) -> list[float]:
    p = successes / trials
    centre = (p + z * z / (2 * trials)) / (1 + z * z / trials)
    half = z * math.sqrt(p * (1 - p) / trials + z * z / (4 * trials * trials)) / (1 + z * z / trials)
    return [round(max(0.0, centre - half), 6), round(min(1.0, centre + half), 6)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=512)
    parser.add_argument("--streams", type=int, default=4000)
    parser.add_argument("--jobs", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    torch.manual_seed(args.seed)
    images = tiny_images(args.images)
    with tempfile.TemporaryDirectory() as tmp:
        refiners = {
            "stable": load_refiner(DEMO_REFINER),
            "equal_canary": load_refiner(perturbed_copy(DEMO_REFINER, Path(tmp) / "perturbed")),
            "blurring_canary": Refiner(blurring_refiner_network(), "blurring"),
        }
        measured = {name: marks(refiner, images) for name, refiner in refiners.items()}

    rule, rng = CanaryRule(), random.Random(args.seed)
    result: dict = {
        "rule": rule.__dict__,
        "images": args.images,
        "streams": args.streams,
        "jobs_per_stream": args.jobs,
        "split": 0.5,
        "marks": {
            name: {
                "detail_mean": round(statistics.fmean(r for r, _ in m), 4),
                "detail_sd": round(statistics.stdev(r for r, _ in m), 4),
                "flagged_rate": round(sum(f for _, f in m) / len(m), 4),
            }
            for name, m in measured.items()
        },
    }
    for canary in ("equal_canary", "blurring_canary"):
        streams = args.streams if canary == "equal_canary" else max(200, args.streams // 20)
        outcomes = [
            stream(rule, rng, measured["stable"], measured[canary], args.jobs)
            for _ in tqdm(range(streams), desc=canary, unit="stream")
        ]
        caught = [job for job in outcomes if job is not None]
        result[canary] = {
            "streams": streams,
            "rolled_back": len(caught),
            "rate": round(len(caught) / streams, 6),
            "rate_95": wilson(len(caught), streams),
            "jobs_to_rollback_median": statistics.median(caught) if caught else None,
            "jobs_to_rollback_max": max(caught) if caught else None,
        }
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    console.print_json(json.dumps(result))


if __name__ == "__main__":
    main()
