"""``refinery demo``: the whole system on embedded defaults, on this machine.

Starts a private stack (redis-server, moto's S3 server, one worker with the offline doubles
``tiny-schnell`` and ``tiny-dev`` and the trained demo refiner resident), then runs jobs of
every kind through it: dataset pairs (the same prompt and seed through student and
teacher), refine-only jobs on each pair's student image, and generate-and-refine jobs. It
writes a contact sheet, one row per pair, ``student | refined | teacher``, each image
labelled with its high-frequency energy over the teacher's, plus every job record.
Everything it started is stopped on the way out, also on Ctrl-C or error.
"""

from __future__ import annotations

import io
import json
import tempfile
import time
from pathlib import Path

import torch
from PIL import Image
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from devstack.stack import LocalStack
from producer.client import Client, JobHandle
from refiner.pixels import to_tensor
from refiner.report import sample_grid
from refiner.spectrum import high_frequency_energy
from shared.contract import JobRecord
from shared.routing import model_queues

# A refiner trained on the offline doubles' pairs; its card (refiner.json) says on what and how.
DEMO_REFINER = Path(__file__).parent / "demo_refiner"
PROMPTS = [
    "close-up portrait of an elderly fisherman, weathered skin, golden hour, 85mm",
    "studio portrait of a young woman with freckles and curly red hair, softbox light",
    "portrait of a middle-aged man with a grey beard, overcast daylight, 50mm",
    "candid portrait of a teenage boy laughing, city street background, bokeh",
    "portrait of a woman in her thirties with braided black hair, window light",
    "headshot of a bald man with glasses, neutral grey background, studio flash",
    "portrait of an old woman with silver hair and a warm smile, garden background",
    "portrait of a young man with short dreadlocks, blue hour, shallow depth of field",
]
# The size the demo refiner was trained at.
SIZE = 64


def run_demo(*, jobs: int, out: Path, refiner: str, console: Console) -> None:
    started = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    with (
        tempfile.TemporaryDirectory(prefix="refinery-demo-") as workdir,
        LocalStack(Path(workdir), refiner=refiner) as stack,
    ):
        settings = stack.settings
        console.log(f"redis-server on :{stack.redis_port}, S3 (moto) on :{stack.s3_port}")
        queues = model_queues(settings)
        with console.status(f"starting a worker with {settings.model_preset} + {settings.teacher_preset}"):
            stack.start_worker("worker", queues)
        console.log(f"worker ready, refiner: {refiner}")
        client = Client(settings)

        dataset = f"s3://{settings.s3_bucket}/demo"
        pair_ids = [f"{i:03d}" for i in range(jobs)]
        pairs = [
            client.submit_pair(
                PROMPTS[i % len(PROMPTS)],
                dataset=dataset,
                pair_id=pair_id,
                seed=i,
                width=SIZE,
                height=SIZE,
                student=settings.model_preset,
                teacher=settings.teacher_preset,
            )
            for i, pair_id in enumerate(pair_ids)
        ]
        pair_records = _wait_all(pairs, "pairs (student + teacher)", console)
        made = [(pair_id, r.result) for pair_id, r in zip(pair_ids, pair_records, strict=True) if r.result is not None]
        refined = [client.submit_refine(input_uri=result.files["student"]) for _, result in made]
        refine_records = _wait_all(refined, "refine-only (each student)", console)
        generated = [
            client.submit_generate(PROMPTS[i % len(PROMPTS)], seed=i, width=SIZE, height=SIZE, keep_raw=True)
            for i in range(jobs)
        ]
        generate_records = _wait_all(generated, "generate-and-refine", console)

        rows = [
            {
                "pair_id": pair_id,
                **{role: _image(client, result.files[role]) for role in ("student", "teacher")},
                "refined": _image(client, job.result.uri),
            }
            for (pair_id, result), job in zip(made, refine_records, strict=True)
            if job.result
        ]
        scores = _scores(rows)
        _sheet(out / "contact_sheet.png", rows, scores, refine_records[0].refiner if refine_records else refiner)

    records = pair_records + refine_records + generate_records
    wall_s = time.perf_counter() - started
    summary = {"wall_s": round(wall_s, 2), "scores": scores, "jobs": [r.model_dump(mode="json") for r in records]}
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    console.print(_table(records))
    console.log(_headline(scores))
    console.log(f"{len(records)} jobs in {wall_s:.1f} s; wrote {out / 'contact_sheet.png'} and {out / 'summary.json'}")


def _wait_all(handles: list[JobHandle], label: str, console: Console) -> list[JobRecord]:
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    records = []
    with Progress(*columns, console=console) as progress:
        task = progress.add_task(label, total=len(handles))
        for handle in handles:
            records.append(handle.wait(timeout=300))
            progress.advance(task)
    return records


def _image(client: Client, uri: str) -> torch.Tensor:
    return to_tensor(Image.open(io.BytesIO(client.storage.get(uri))).convert("RGB"))


def _scores(rows: list[dict]) -> dict:
    """Per image, its high-frequency energy over its teacher's; over all rows, how far the
    refined images moved from the student towards the teacher (0: not at all, 1: all the way)."""
    if not rows:
        return {"rows": []}
    stacked = {role: torch.stack([row[role] for row in rows]) for role in ("student", "refined", "teacher")}
    hf = {role: high_frequency_energy(images) for role, images in stacked.items()}
    l1 = {role: (stacked[role] - stacked["teacher"]).abs().mean().item() for role in ("student", "refined")}
    student_hf, refined_hf = (hf[role].sum().item() / hf["teacher"].sum().item() for role in ("student", "refined"))
    return {
        "rows": [
            {"pair_id": row["pair_id"], **{role: round((hf[role][i] / hf["teacher"][i]).item(), 3) for role in hf}}
            for i, row in enumerate(rows)
        ],
        "hf_ratio": {"student": round(student_hf, 3), "refined": round(refined_hf, 3), "teacher": 1.0},
        "hf_gap_closed": round((refined_hf - student_hf) / (1 - student_hf), 3) if student_hf != 1 else None,
        "l1_to_teacher": {role: round(value, 4) for role, value in l1.items()},
        "l1_gap_closed": round(1 - l1["refined"] / l1["student"], 3) if l1["student"] else None,
    }


def _headline(scores: dict) -> str:
    if not scores["rows"]:
        return "no pair finished: nothing to compare"
    hf, l1 = scores["hf_ratio"], scores["l1_to_teacher"]
    return (
        f"detail (HF energy / teacher's): student {hf['student']:.2f} -> refined {hf['refined']:.2f}; "
        f"L1 to teacher: student {l1['student']:.4f} -> refined {l1['refined']:.4f} "
        f"({scores['l1_gap_closed']:.0%} of the way to the teacher)"
    )


def _sheet(path: Path, rows: list[dict], scores: dict, refiner: str | None) -> None:
    labels = [
        tuple(f"{role} HF {score[role]:.2f}" for role in ("student", "refined", "teacher")) for score in scores["rows"]
    ]
    sample_grid(
        path,
        [(row["pair_id"], row["student"], row["refined"], row["teacher"]) for row in rows],
        labels=labels,
        title=[f"refiner {refiner}", *_headline(scores).split("; ")],
    )


def _table(records: list[JobRecord]) -> Table:
    table = Table(title="jobs")
    for column in (
        "job",
        "kind",
        "state",
        "seed",
        "queue wait ms",
        "generate ms",
        "refine ms",
        "upload ms",
        "total ms",
    ):
        table.add_column(column)
    for r in records:
        t = r.timings_ms
        cells = [t.get(k) for k in ("queue_wait", "generate", "refine", "upload", "total")]
        table.add_row(
            r.job_id[:8],
            r.kind,
            r.state.value,
            str(r.seed if r.seed is not None else "-"),
            *("-" if v is None else f"{v:.0f}" for v in cells),
        )
    return table
