"""Refiner training and evaluation: `train` and `eval`, with an s3:// dataset mirrored to a
local directory first (the ML side reads local directories only, and imports no S3 client).
Every other option passes through to the argparse interfaces of `refiner.train` and
`refiner.evaluate`, `--help` included.

On several processes or GPUs, `accelerate launch` runs the same command, so it takes the
same `--data`:

    accelerate launch [--multi_gpu --num_processes N ...] -m cli train --data s3://... --out DIR
"""

from __future__ import annotations

import hashlib
import sys
from collections.abc import Callable
from pathlib import Path

import click

from cli.common import console, make_client
from shared.errors import InvalidInput

_PASS_THROUGH = {"ignore_unknown_options": True, "allow_extra_args": True, "help_option_names": []}


def mirror_dataset(uri: str) -> Path:
    """A local copy of the pair dataset at ``uri``; pairs mirrored before are not fetched again."""
    from producer import pairs as datasets

    client = make_client()
    dataset = datasets.resolve_target(client, uri).dataset  # checked: s3://bucket/prefix
    local = client.settings.model_cache_dir / "datasets" / hashlib.sha1(dataset.encode()).hexdigest()[:16]
    fetched = datasets.mirror(client, datasets.Target(dataset, local))
    console.print(f"{dataset}: {fetched} new pairs mirrored into {local}")
    return local


def _local_data(ctx: click.Context, param: click.Parameter, data: str | None) -> str | None:
    if data is None or not data.startswith("s3://"):
        return data
    return str(mirror_dataset(data))


def _local_data_once_per_machine(ctx: click.Context, param: click.Parameter, data: str | None) -> str | None:
    """`_local_data` for training, which may run as several processes (`accelerate launch`),
    each parsing the same `--data`: the first process on each machine mirrors, the others
    wait for it to finish, then find every pair already there instead of writing the same
    files at once."""
    if data is None or not data.startswith("s3://"):
        return data
    from accelerate import PartialState
    from accelerate.utils import parse_flag_from_env

    # The state `Accelerator()` will find: on CPUs when launched with --cpu, as it reads it.
    with PartialState(cpu=parse_flag_from_env("ACCELERATE_USE_CPU")).local_main_process_first():
        return _local_data(ctx, param, data)


_HELP = "s3://bucket/prefix or a local dataset directory."


def refiner_argv(ctx: click.Context) -> list[str]:
    """The argv for the refiner's own parser: the local ``--data``, then everything else as given."""
    data = ctx.params["data"]
    return ctx.args if data is None else ["--data", data, *ctx.args]


@click.command(context_settings=_PASS_THROUGH)
@click.option("--data", callback=_local_data_once_per_machine, help=_HELP)
@click.pass_context
def train(ctx: click.Context, data: str | None) -> None:
    """Train a refiner: --data s3://...|DIR --arch unet-cbam|cyclegan|esa-cyclegan --out DIR [...]
    (all options: refinery train --help). On several processes: accelerate launch -m cli train ..."""
    from refiner.train import main as train_main

    sys.exit(_run(train_main, refiner_argv(ctx)))


@click.command("eval", context_settings=_PASS_THROUGH)
@click.option("--data", callback=_local_data, help=_HELP)
@click.pass_context
def evaluate(ctx: click.Context, data: str | None) -> None:
    """Evaluate a refiner against the teacher: --data s3://...|DIR --refiner DIR [--out DIR] [...]
    (all options: refinery eval --help). Writes metrics.json, report.md and PNG plots."""
    from refiner.evaluate import main as evaluate_main

    sys.exit(_run(evaluate_main, refiner_argv(ctx)))


def _run(main: Callable[[list[str]], int], argv: list[str]) -> int:
    """The ML side names a missing or malformed dataset, refiner or file with these; here
    they are bad input like any other."""
    try:
        return main(argv)
    except (FileNotFoundError, NotADirectoryError, IsADirectoryError) as exc:
        raise InvalidInput(str(exc)) from None
