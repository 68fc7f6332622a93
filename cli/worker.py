"""``refinery worker``: a Celery worker with its models resident; ``refinery node``: every
worker of one GPU node, supervised; ``refinery workers``: the live ones."""

from __future__ import annotations

import json
import logging
import os
import sys
from urllib.parse import urlsplit

import click
from rich.table import Table

from cli.common import console, load_settings, make_client
from shared.routing import default_queues
from shared.settings import Settings


@click.command()
@click.option("--queues", default=None, help="Comma-separated; default: the queues of the kinds served by default.")
@click.option("--preset", default=None, help="Model preset; default: REFINERY_MODEL_PRESET.")
@click.option("--loglevel", default="INFO", show_default=True)
@click.option("--name", default=None, help="Worker name (Celery hostname).")
@click.option(
    "--callbacks/--no-callbacks",
    default=True,
    show_default=True,
    help="With model queues: start a callbacks worker beside this one (production runs its own).",
)
@click.option("--exit-with-parent", is_flag=True, hidden=True, help="Drain when stdin closes (started by a parent).")
def worker(
    queues: str | None, preset: str | None, loglevel: str, name: str | None, callbacks: bool, exit_with_parent: bool
) -> None:
    """Run a worker: model queues keep their models resident; 'callbacks' delivers webhooks."""
    from worker.main import exit_with_parent as watch_parent
    from worker.main import run_worker

    if exit_with_parent:
        watch_parent()
    settings = load_settings()
    if preset:
        settings = settings.model_copy(update={"model_preset": preset})
    run_worker(settings, resolve_queues(settings, queues), loglevel=loglevel, name=name, callbacks=callbacks)
    # Everything a worker holds is in Redis and S3 by now. The interpreter's teardown of
    # torch's and diffusers' modules would add 1.5-2 s to every drain and rolling restart.
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


@click.command()
@click.option("--gpus", default="all", show_default=True, help="'all' (CUDA_VISIBLE_DEVICES or every GPU) or ids: 0,1")
@click.option("--queues", default=None, help="Model queues of each GPU worker; default: as for `refinery worker`.")
@click.option("--callbacks/--no-callbacks", default=True, show_default=True, help="Run the node's callbacks worker.")
def node(gpus: str, queues: str | None, callbacks: bool) -> None:
    """Run a GPU node: a model worker per GPU (a CPU one without GPUs) and a callbacks worker,
    restarted when they die; SIGTERM drains them all."""
    from worker.node import Node, plan_children

    logging.basicConfig(level=logging.INFO, format="[%(asctime)s: node] %(message)s")
    settings = load_settings()
    sys.exit(Node(settings, plan_children(settings, gpus, resolve_queues(settings, queues), callbacks)).run())


def resolve_queues(settings: Settings, queues: str | None) -> list[str]:
    """The --queues option as given, or the default queues."""
    if not queues:
        return default_queues(settings)
    return [q.strip() for q in queues.split(",") if q.strip()]


@click.command()
@click.option("--json", "as_json", is_flag=True, help="One JSON object: worker name -> its record.")
@click.option("--file-sd", is_flag=True, help="Prometheus file_sd targets: one group per worker with metrics.")
def workers(as_json: bool, file_sd: bool) -> None:
    """Live workers: what each serves, and where it serves its Prometheus metrics."""
    live = make_client().store.workers()
    if as_json:
        click.echo(json.dumps(live, sort_keys=True))
        return
    if file_sd:
        click.echo(json.dumps(_file_sd_groups(live), indent=2))
        return
    table = Table(title=f"{len(live)} live workers")
    for column in ("worker", "queues", "preset", "device", "refiner", "jobs done", "metrics"):
        table.add_column(column, overflow="fold")  # addresses are read whole, not cut
    for name, info in sorted(live.items()):
        queues = info.get("queues")
        table.add_row(
            name,
            ",".join(map(str, queues)) if isinstance(queues, list) else "-",
            *(str(info.get(key) or "-") for key in ("preset", "device", "refiner")),
            str(info.get("jobs_done", "-")),
            str(info.get("metrics_url") or "-"),
        )
    console.print(table)


def _file_sd_groups(live: dict[str, dict[str, object]]) -> list[dict[str, object]]:
    groups: list[dict[str, object]] = []
    for name, info in sorted(live.items()):
        url = info.get("metrics_url")
        if not isinstance(url, str):
            continue
        queues = info.get("queues")
        labels = {"worker": name, "queues": ",".join(map(str, queues)) if isinstance(queues, list) else ""}
        labels |= {key: str(info[key]) for key in ("preset", "device", "refiner") if info.get(key)}
        groups.append({"targets": [urlsplit(url).netloc], "labels": labels})
    return groups
