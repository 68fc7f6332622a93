"""``refinery worker``: a Celery worker with its models resident."""

from __future__ import annotations

import json

import click
from rich.table import Table

from cli.common import console, make_client
from shared.settings import get_settings


@click.command()
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


@click.command()
@click.option("--json", "as_json", is_flag=True, help="One JSON object: worker name -> its record.")
def workers(as_json: bool) -> None:
    """Live workers: what each serves, and where it serves its Prometheus metrics."""
    live = make_client().store.workers()
    if as_json:
        click.echo(json.dumps(live, sort_keys=True))
        return
    table = Table(title=f"{len(live)} live workers")
    for column in ("worker", "queues", "preset", "device", "refiner", "metrics"):
        table.add_column(column, overflow="fold")  # addresses are read whole, not cut
    for name, info in sorted(live.items()):
        queues = info.get("queues")
        table.add_row(
            name,
            ",".join(map(str, queues)) if isinstance(queues, list) else "-",
            *(str(info.get(key) or "-") for key in ("preset", "device", "refiner", "metrics_url")),
        )
    console.print(table)
