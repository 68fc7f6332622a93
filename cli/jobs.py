"""Job commands: submit generate/refine, status, wait, cancel, dead-letters."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click
from rich.table import Table

from cli.common import EXIT_TIMEOUT, SECONDS, console, make_client, show_checks
from shared import keys
from shared.contract import JobError, JobRecord, OutputFormat, Priority
from shared.errors import JobNotFound

if TYPE_CHECKING:
    from producer.client import JobHandle


def _show(record: JobRecord, as_json: bool) -> None:
    if as_json:
        click.echo(record.model_dump_json())
        return
    table = Table(show_header=False, box=None)
    table.add_row("job", record.job_id)
    table.add_row("kind", record.kind)
    table.add_row("state", record.state.value)
    table.add_row("attempts", str(record.attempts))
    if record.seed is not None:
        table.add_row("seed", str(record.seed))
    if record.result:
        table.add_row("result", record.result.uri)
        table.add_row("url", record.result.url or "")
    if record.refiner:
        table.add_row("refiner", record.refiner)
    if record.error:
        table.add_row("error", f"{record.error.code}: {record.error.message}")
    if record.timings_ms:
        table.add_row("timings ms", ", ".join(f"{k} {v:.0f}" for k, v in record.timings_ms.items()))
    console.print(table)


def _finish(job: JobHandle, wait: bool, timeout: float | None, as_json: bool) -> None:
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


def _job_options(command):
    for option in reversed(
        [
            click.option(
                "--format", "output_format", type=click.Choice([f.value for f in OutputFormat]), default="png"
            ),
            click.option("--callback-url", help="Signed POST on each terminal state."),
            click.option("--idempotency-key", help="Submitting again with the same key returns the same job."),
            click.option("--metadata", help="JSON object stored with the job and echoed in callbacks."),
            click.option(
                "--priority", type=click.Choice([p.value for p in Priority]), default="normal", show_default=True
            ),
            click.option(
                "--deadline", "deadline_s", type=SECONDS, help="Seconds; still queued by then: fails 'expired'."
            ),
            click.option(
                "--refiner-version", help="Run this published refiner (NAME@VERSION), not the one its channels draw."
            ),
            click.option("--wait", is_flag=True, help="Block until the job is finished."),
            click.option("--timeout", type=SECONDS, default=None, help="Seconds to wait at most."),
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
        except RecursionError:
            raise click.BadParameter("nested too deeply", param_hint="--metadata") from None
    return fields


@click.group()
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
def submit_generate(
    prompt, seed, width, height, steps, guidance, no_refine, keep_raw, wait, timeout, as_json, **common
) -> None:
    """Generate a portrait with the worker's preset and refine it."""
    job = make_client().submit_generate(
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
@click.option(
    "--file", "path", type=click.Path(exists=True, dir_okay=False, path_type=Path), help="A local image, sent inline."
)
@click.option("--keep-input", is_flag=True, help="Keep the uploaded --file after the job ends (retention expires it).")
@_job_options
def submit_refine(input_uri, path, keep_input, wait, timeout, as_json, **common) -> None:
    """Refine an existing image."""
    if (input_uri is None) == (path is None):
        raise click.UsageError("give exactly one of --input or --file")
    image = path.read_bytes() if path else None
    job = make_client().submit_refine(
        input_uri=input_uri, image=image, keep_input=keep_input, **_common_fields(**common)
    )
    _finish(job, wait, timeout, as_json)


@click.command()
@click.argument("job_id", required=False)
@click.option("--json", "as_json", is_flag=True)
def status(job_id: str | None, as_json: bool) -> None:
    """Show a job's record; without JOB_ID, the live workers, queues, dead letters and
    waiting callbacks (`refinery doctor` checks Redis and S3 as well)."""
    from producer import preflight

    client = make_client()
    if job_id is None:
        checks = preflight.overview(client, preflight.required_queues(client.settings))
        if as_json:
            click.echo(preflight.as_json(checks))
        else:
            show_checks(checks, "refinery status")
        return
    record = client.status(job_id)
    _show(record, as_json)
    if warning := preflight.job_callback_warning(client, record):
        click.echo(f"warning: {warning}", err=True)


@click.command("wait")
@click.argument("job_id")
@click.option("--timeout", type=SECONDS, default=None)
@click.option("--json", "as_json", is_flag=True)
def wait(job_id: str, timeout: float | None, as_json: bool) -> None:
    """Block until a job is finished, then show its record."""
    _finish(make_client().handle(job_id), True, timeout, as_json)


@click.command()
@click.argument("job_id")
@click.option("--json", "as_json", is_flag=True)
def cancel(job_id: str, as_json: bool) -> None:
    """Cancel a job: a queued one never runs, a running one publishes nothing."""
    _show(make_client().cancel(job_id), as_json)


@click.command("dead-letters")
@click.option("--limit", type=click.IntRange(min=1), default=20, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="One JSON object per line: each job record.")
def dead_letters(limit: int, as_json: bool) -> None:
    """Jobs that failed for reasons of the system (worker_lost, internal_error, storage_unavailable), newest first."""
    client = make_client()
    for job_id in client.store.dead_letters(min(limit, keys.DEAD_LETTER_MAX)):
        try:
            record = client.status(job_id)
        except JobNotFound:
            continue  # the record outlived its REFINERY_JOB_TTL_S
        if as_json:
            click.echo(record.model_dump_json())
        else:
            error = record.error or JobError(code="unknown", message="the record carries no error")
            console.print(f"{record.job_id}  {record.finished_at:%Y-%m-%d %H:%M:%S}  {error.code}: {error.message}")
