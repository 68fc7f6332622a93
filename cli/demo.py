"""``refinery demo``: the whole system on a private local stack (see `devstack`)."""

from __future__ import annotations

from pathlib import Path

import click

from cli.common import console


@click.command()
@click.option(
    "--jobs", type=click.IntRange(1, 1000), default=8, show_default=True, help="Generate-and-refine jobs to run."
)
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=Path("demo-out"), show_default=True)
@click.option(
    "--refiner",
    default=None,
    help="A refiner directory, or 'identity' (no refinement). Default: the demo refiner trained on the offline doubles.",
)
def demo(jobs: int, out: Path, refiner: str | None) -> None:
    """Start a private local stack (Redis, S3, worker), run jobs through it, write a contact sheet."""
    try:
        from devstack.demo import DEMO_REFINER, run_demo
    except ModuleNotFoundError as exc:
        if exc.name != "devstack":
            raise
        # The images leave devstack/ out (it holds a test secret); it comes with a checkout.
        raise click.ClickException("the demo needs a source checkout (scripts/dev.sh demo)") from None
    from refiner.export import IDENTITY, NOOP

    if refiner not in (None, IDENTITY, NOOP) and not (Path(refiner) / "config.json").is_file():
        # Checked before a stack starts: the worker would only fail to load it minutes later.
        raise click.BadParameter(f"{refiner!r} is not a refiner directory (no config.json)", param_hint="--refiner")
    run_demo(jobs=jobs, out=out, refiner=refiner or str(DEMO_REFINER), console=console)
