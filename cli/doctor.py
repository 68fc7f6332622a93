"""``refinery doctor``: a deployment's preflight, before traffic or as a readiness probe."""

from __future__ import annotations

import sys

import click

from cli.common import EXIT_ERROR, make_client, show_checks


@click.command()
@click.option(
    "--queues",
    default=None,
    help="Comma-separated queues that must have a live worker; default: those of the kinds served by default, and callbacks.",
)
@click.option("--json", "as_json", is_flag=True, help="One JSON object: status and every check.")
def doctor(queues: str | None, as_json: bool) -> None:
    """Check Redis (reachable, persistent, noeviction, clock), the bucket (write, read,
    delete), live workers on every queue, queue depths, dead letters and waiting callbacks.
    Exits with status 2 when any check fails."""
    from producer import preflight

    client = make_client()
    required = (
        [q.strip() for q in queues.split(",") if q.strip()] if queues else preflight.required_queues(client.settings)
    )
    checks = preflight.run(client, required)
    if as_json:
        click.echo(preflight.as_json(checks))
    else:
        show_checks(checks, "refinery doctor")
    if preflight.failed(checks):
        sys.exit(EXIT_ERROR)
