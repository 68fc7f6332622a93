"""``refinery demo``: the whole system on embedded defaults, on this machine.

Starts a private stack (redis-server, moto's S3 server, one worker with the offline
``tiny-schnell`` test double), runs generate-and-refine and refine-only jobs through it,
and writes a labelled contact sheet plus every job record. Everything it started is
stopped on the way out, also on Ctrl-C or error.
"""

from __future__ import annotations

import io
import json
import tempfile
import time
from pathlib import Path

from PIL import Image, ImageDraw
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from devstack.stack import LocalStack
from producer.client import Client, JobHandle
from shared.jobs import JobRecord

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
SIZE = 128
TILE_LABEL_HEIGHT = 14


def run_demo(*, jobs: int, out: Path, console: Console) -> None:
    started = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="refinery-demo-") as workdir, LocalStack(Path(workdir)) as stack:
        settings = stack.settings
        console.log(f"redis-server on :{stack.redis_port}, S3 (moto) on :{stack.s3_port}")
        with console.status(f"starting a worker with {settings.model_preset} (loading and warming models)"):
            stack.start_worker("worker")
        console.log("worker ready")
        client = Client(settings)

        generated = [
            client.submit_generate(PROMPTS[i % len(PROMPTS)], seed=i, width=SIZE, height=SIZE, keep_raw=True)
            for i in range(jobs)
        ]
        generated_records = _wait_all(generated, "generate-and-refine", console)

        # Refine-only twice: from an object already in S3, and from bytes sent inline.
        done = [r for r in generated_records if r.result]
        refine_jobs: list[JobHandle] = []
        if done:
            refine_jobs.append(client.submit_refine(input_uri=done[0].result.raw_uri))
            inline = client.storage.get(done[-1].result.raw_uri)
            refine_jobs.append(client.submit_refine(image=inline))
        refine_records = _wait_all(refine_jobs, "refine-only", console)

        records = generated_records + refine_records
        sheet = _contact_sheet(client, records)
        sheet.save(out / "contact_sheet.png")

    wall_s = time.perf_counter() - started
    summary = {"wall_s": round(wall_s, 2), "jobs": [r.model_dump(mode="json") for r in records]}
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    console.print(_table(records))
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


def _contact_sheet(client: Client, records: list[JobRecord]) -> Image.Image:
    """One row per job: before (raw or input) | after (refined), each labelled."""
    rows = []
    for record in records:
        if not record.result:
            continue
        before_uri = record.result.raw_uri if record.kind == "generate_and_refine" else record.spec.input_uri
        before = Image.open(io.BytesIO(client.storage.get(before_uri))).convert("RGB")
        after = Image.open(io.BytesIO(client.storage.get(record.result.uri))).convert("RGB")
        caption = f"{record.job_id[:8]} seed {record.seed}" if record.seed is not None else record.job_id[:8]
        rows.append([(before, f"before {caption}"), (after, f"refined ({record.refiner})")])
    tile = SIZE
    sheet = Image.new("RGB", (2 * tile, max(1, len(rows)) * (tile + TILE_LABEL_HEIGHT)), "white")
    draw = ImageDraw.Draw(sheet)
    for y, row in enumerate(rows):
        top = y * (tile + TILE_LABEL_HEIGHT)
        for x, (image, label) in enumerate(row):
            sheet.paste(image.resize((tile, tile)), (x * tile, top + TILE_LABEL_HEIGHT))
            draw.text((x * tile + 2, top + 1), label[:24], fill="black")
    return sheet


def _table(records: list[JobRecord]) -> Table:
    table = Table(title="jobs")
    for column in ("job", "kind", "state", "seed", "queue wait ms", "generate ms", "refine ms", "upload ms", "total ms"):
        table.add_column(column)
    for r in records:
        t = r.timings_ms
        cells = [t.get(k) for k in ("queue_wait", "generate", "refine", "upload", "total")]
        table.add_row(
            r.job_id[:8], r.kind.value, r.state.value, str(r.seed if r.seed is not None else "-"),
            *("-" if v is None else f"{v:.0f}" for v in cells),
        )
    return table
