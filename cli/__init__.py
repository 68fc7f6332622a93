"""The ``refinery`` command line: jobs and pair datasets through the producer, workers,
refiner training, evaluation and rollout, and the local demo.

With ``--json`` a job command prints exactly one JSON object, the job record. Errors go to
stderr as ``error [code] field: message`` with exit status 2 (3 for a wait that timed out).
"""

from __future__ import annotations

import sys
from typing import Any, NoReturn

import click
import redis
from kombu.exceptions import OperationalError

from cli import demo, doctor, gateway, jobs, pairs, refiner, retention, training, worker
from cli.common import EXIT_ERROR
from shared.errors import BrokerUnavailable, InvalidInput, RefineryError


class _Errors(click.Group):
    """Turns typed errors into one clear line and an exit status instead of a traceback."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        for arg in args:
            try:
                arg.encode()
            except UnicodeEncodeError:
                # Bytes that are not UTF-8 arrive as surrogates, which Redis, S3 and JSON refuse.
                _fail(InvalidInput(f"{arg[:40]!r} is not valid UTF-8", field="argument"))
        return super().parse_args(ctx, args)

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except RefineryError as exc:
            _fail(exc)
        except (redis.ConnectionError, redis.TimeoutError, OperationalError) as exc:
            # What the client's submits raise as BrokerUnavailable, for the commands that
            # read Redis directly (status, wait, workers, dead-letters, ...).
            _fail(BrokerUnavailable(f"Redis unreachable ({exc})", field="redis"))


def _fail(exc: RefineryError) -> NoReturn:
    field = f" {exc.field}:" if exc.field else ""
    click.echo(f"error [{exc.code}]{field} {exc.message}", err=True)
    sys.exit(EXIT_ERROR)


@click.group(cls=_Errors)
def refinery() -> None:
    """face-refinery: FLUX.1-schnell portraits plus a lightweight refiner, served over Redis and S3."""


for command in (
    jobs.submit,
    jobs.status,
    jobs.wait,
    jobs.cancel,
    jobs.dead_letters,
    pairs.pairs,
    training.train,
    training.evaluate,
    refiner.refiner,
    worker.worker,
    worker.node,
    worker.workers,
    doctor.doctor,
    retention.retention,
    demo.demo,
    gateway.gateway,
    gateway.keys,
):
    refinery.add_command(command)


def main() -> None:
    refinery()
