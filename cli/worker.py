"""``refinery worker``: a Celery worker with its models resident."""

from __future__ import annotations

import click

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
