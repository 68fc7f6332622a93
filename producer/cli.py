"""The ``refinery`` command line: submit, status, wait, cancel, worker, demo.

With ``--json`` a job command prints exactly one JSON object, the job record. Errors go to
stderr as ``error [code] field: message`` with exit status 2 (3 for a wait that timed out).
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path
from typing import Any

import click
from rich.console import Console
from rich.table import Table

from shared.errors import JobNotFound, RefineryError
from shared.jobs import JobRecord, OutputFormat, Priority
from shared.settings import get_settings

console = Console()

EXIT_ERROR = 2
EXIT_TIMEOUT = 3


def _client():
    from producer.client import Client

    return Client(get_settings())


def _show(record: JobRecord, as_json: bool) -> None:
    if as_json:
        click.echo(record.model_dump_json())
        return
    table = Table(show_header=False, box=None)
    table.add_row("job", record.job_id)
    table.add_row("kind", record.kind.value)
    table.add_row("state", record.state.value)
    table.add_row("attempts", str(record.attempts))
    if record.seed is not None:
        table.add_row("seed", str(record.seed))
    if record.result:
        table.add_row("result", record.result.uri)
        table.add_row("url", record.result.url or "")
    if record.error:
        table.add_row("error", f"{record.error.code}: {record.error.message}")
    if record.timings_ms:
        table.add_row("timings ms", ", ".join(f"{k} {v:.0f}" for k, v in record.timings_ms.items()))
    console.print(table)


def _finish(job, wait: bool, timeout: float | None, as_json: bool) -> None:
    if not wait:
        _show(job.status(), as_json)
        return
    try:
        record = job.wait(timeout)
    except TimeoutError as exc:
        click.echo(f"error [timeout] {exc}", err=True)
        _show(job.status(), as_json)
        sys.exit(EXIT_TIMEOUT)
    _show(record, as_json)


class _Errors(click.Group):
    """Turns typed errors into one clear line and an exit status instead of a traceback."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except RefineryError as exc:
            field = f" {exc.field}:" if exc.field else ""
            click.echo(f"error [{exc.code}]{field} {exc.message}", err=True)
            sys.exit(EXIT_ERROR)


@click.group(cls=_Errors)
def cli() -> None:
    """face-refinery: FLUX.1-schnell portraits plus a lightweight refiner, served over Redis and S3."""


def _job_options(command):
    for option in reversed(
        [
            click.option("--format", "output_format", type=click.Choice([f.value for f in OutputFormat]), default="png"),
            click.option("--callback-url", help="Signed POST on each terminal state."),
            click.option("--idempotency-key", help="Submitting again with the same key returns the same job."),
            click.option("--metadata", help="JSON object stored with the job and echoed in callbacks."),
            click.option("--priority", type=click.Choice([p.value for p in Priority]), default="normal", show_default=True),
            click.option("--deadline", "deadline_s", type=float, help="Seconds; still queued by then: fails 'expired'."),
            click.option("--wait", is_flag=True, help="Block until the job is finished."),
            click.option("--timeout", type=float, default=None, help="Seconds to wait at most."),
            click.option("--json", "as_json", is_flag=True, help="Print the job record as one JSON object."),
        ]
    ):
        command = option(command)
    return command


def _common_fields(metadata: str | None, **options: Any) -> dict:
    fields: dict[str, Any] = dict(options)
    if metadata:
        try:
            fields["metadata"] = json.loads(metadata)
        except json.JSONDecodeError as exc:
            raise click.BadParameter(f"not JSON: {exc}", param_hint="--metadata") from None
    return fields


@cli.group()
def submit() -> None:
    """Submit a job."""


@submit.command("generate")
@click.option("--prompt", required=True)
@click.option("--seed", type=int)
@click.option("--width", type=int, default=1024, show_default=True)
@click.option("--height", type=int, default=1024, show_default=True)
@click.option("--steps", type=int, help="Default: the preset's own.")
@click.option("--guidance", type=float, help="Default: the preset's own.")
@click.option("--no-refine", is_flag=True, help="Return schnell's image as it is.")
@click.option("--keep-raw", is_flag=True, help="Also store the unrefined image.")
@_job_options
def submit_generate(prompt, seed, width, height, steps, guidance, no_refine, keep_raw, wait, timeout, as_json, **common) -> None:
    """Generate a portrait with the worker's preset and refine it."""
    job = _client().submit_generate(
        prompt,
        seed=seed,
        width=width,
        height=height,
        steps=steps,
        guidance=guidance,
        refine=not no_refine,
        keep_raw=keep_raw,
        **_common_fields(**common),
    )
    _finish(job, wait, timeout, as_json)


@submit.command("refine")
@click.option("--input", "input_uri", help="s3://bucket/key of the image to refine.")
@click.option("--file", "path", type=click.Path(exists=True, dir_okay=False, path_type=Path), help="A local image, sent inline.")
@_job_options
def submit_refine(input_uri, path, wait, timeout, as_json, **common) -> None:
    """Refine an existing image."""
    if (input_uri is None) == (path is None):
        raise click.UsageError("give exactly one of --input or --file")
    image = path.read_bytes() if path else None
    job = _client().submit_refine(input_uri=input_uri, image=image, **_common_fields(**common))
    _finish(job, wait, timeout, as_json)


@cli.command()
@click.argument("job_id")
@click.option("--json", "as_json", is_flag=True)
def status(job_id: str, as_json: bool) -> None:
    """Show a job's record."""
    _show(_client().status(job_id), as_json)


@cli.command("wait")
@click.argument("job_id")
@click.option("--timeout", type=float, default=None)
@click.option("--json", "as_json", is_flag=True)
def wait_cmd(job_id: str, timeout: float | None, as_json: bool) -> None:
    """Block until a job is finished, then show its record."""
    client = _client()
    _finish(client.handle(job_id), True, timeout, as_json)


@cli.command()
@click.argument("job_id")
@click.option("--json", "as_json", is_flag=True)
def cancel(job_id: str, as_json: bool) -> None:
    """Cancel a job: a queued one never runs, a running one publishes nothing."""
    _show(_client().cancel(job_id), as_json)


@cli.group()
def pairs() -> None:
    """Synthetic student/teacher pair datasets, generated by pair workers."""


_OUT_HELP = "s3://bucket/prefix, or a local directory (served through S3 and mirrored there)."


@pairs.command("generate")
@click.option("--count", type=int, required=True, help="Pairs 0..count-1; those already written are skipped.")
@click.option("--out", required=True, help=_OUT_HELP)
@click.option("--student", default=None, help="Default: REFINERY_MODEL_PRESET.")
@click.option("--teacher", default=None, help="Default: REFINERY_TEACHER_PRESET.")
@click.option("--width", type=int, default=1024, show_default=True)
@click.option("--height", type=int, default=1024, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True, help="Dataset seed: fixes every prompt and image seed.")
@click.option("--no-wait", is_flag=True, help="Queue and return.")
def pairs_generate(count, out, student, teacher, width, height, seed, no_wait) -> None:
    """Queue pair jobs, then wait for them with progress and ETA."""
    from producer import pairs as datasets

    client = _client()
    target = datasets.resolve_target(client, out)
    handles, skipped = datasets.submit(
        client,
        target,
        count=count,
        student=student or client.settings.model_preset,
        teacher=teacher or client.settings.teacher_preset,
        width=width,
        height=height,
        seed=seed,
    )
    console.print(f"{target.dataset}: {len(handles)} pairs queued, {skipped} already written")
    if no_wait:
        return
    outcome = datasets.wait(client, target, handles, count, console)
    console.print(", ".join(f"{n} {state}" for state, n in outcome.items()) + f"; {datasets.status(client, target)}")
    if outcome["failed"]:
        sys.exit(EXIT_ERROR)


@pairs.command("status")
@click.option("--out", required=True, help=_OUT_HELP)
@click.option("--json", "as_json", is_flag=True)
def pairs_status(out: str, as_json: bool) -> None:
    """Pairs written, pairs queued (and mirrored locally)."""
    from producer import pairs as datasets

    client = _client()
    counts = datasets.status(client, datasets.resolve_target(client, out))
    if as_json:
        click.echo(json.dumps(counts))
    else:
        console.print(counts)


def _local_dataset(args: list[str]) -> list[str]:
    """Replace an ``--data s3://...`` argument by a local mirror of that dataset (the ML
    side reads local directories only)."""
    if "--data" not in args or not args[args.index("--data") + 1].startswith("s3://"):
        return args
    from producer import pairs as datasets

    client = _client()
    at = args.index("--data") + 1
    dataset = args[at].rstrip("/")
    local = client.settings.model_cache_dir / "datasets" / hashlib.sha1(dataset.encode()).hexdigest()[:16]
    fetched = datasets.mirror(client, datasets.Target(dataset, local))
    console.print(f"{dataset}: {fetched} new pairs mirrored into {local}")
    return [*args[:at], str(local), *args[at + 1 :]]


_PASS_THROUGH = {"ignore_unknown_options": True, "allow_extra_args": True, "help_option_names": []}


@cli.command(context_settings=_PASS_THROUGH)
@click.pass_context
def train(ctx: click.Context) -> None:
    """Train a refiner: --data s3://...|DIR --arch unet-cbam|cyclegan|esa-cyclegan --out DIR [...]
    (all options: refinery train --help). Runs under `accelerate launch` too."""
    from refiner.train import main as train_main

    sys.exit(train_main(_local_dataset(ctx.args)))


@cli.command("eval", context_settings=_PASS_THROUGH)
@click.pass_context
def evaluate(ctx: click.Context) -> None:
    """Evaluate a refiner against the teacher: --data s3://...|DIR --refiner DIR [--out DIR] [...]
    (all options: refinery eval --help). Writes metrics.json, report.md and PNG plots."""
    from refiner.evaluate import main as evaluate_main

    sys.exit(evaluate_main(_local_dataset(ctx.args)))


@cli.command("dead-letters")
@click.option("--limit", default=20, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="One JSON object per line: each job record.")
def dead_letters(limit: int, as_json: bool) -> None:
    """Jobs that failed for reasons of the system (worker_lost, internal_error, storage_unavailable), newest first."""
    client = _client()
    for job_id in client.store.dead_letters(limit):
        try:
            record = client.status(job_id)
        except JobNotFound:
            continue  # the record outlived its REFINERY_JOB_TTL_S
        if as_json:
            click.echo(record.model_dump_json())
        else:
            console.print(f"{record.job_id}  {record.finished_at:%Y-%m-%d %H:%M:%S}  {record.error.code}: {record.error.message}")


@cli.command()
@click.option("--queues", default=None, help="Comma-separated; default: generate,refine.")
@click.option("--preset", default=None, help="Model preset; default: REFINERY_MODEL_PRESET.")
@click.option("--loglevel", default="INFO", show_default=True)
@click.option("--name", default=None, help="Worker name (Celery hostname).")
def worker(queues: str | None, preset: str | None, loglevel: str, name: str | None) -> None:
    """Run a worker: model queues keep their models resident; 'callbacks' delivers webhooks."""
    from worker.main import run_worker

    settings = get_settings()
    if preset:
        settings = settings.model_copy(update={"model_preset": preset})
    names = queues.split(",") if queues else [settings.queue_generate, settings.queue_refine]
    run_worker(settings, [q.strip() for q in names if q.strip()], loglevel=loglevel, name=name)


@cli.command()
@click.option("--jobs", default=8, show_default=True, help="Generate-and-refine jobs to run.")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=Path("demo-out"), show_default=True)
def demo(jobs: int, out: Path) -> None:
    """Start a private local stack (Redis, S3, worker), run jobs through it, write a contact sheet."""
    from producer.demo import run_demo

    run_demo(jobs=jobs, out=out, console=console)


def main() -> None:
    cli()
