"""What every command shares: the console, the exit statuses and the job client."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import click
from pydantic import ValidationError
from rich.console import Console
from rich.table import Table

from shared.errors import InvalidInput
from shared.settings import Settings, get_settings

if TYPE_CHECKING:
    from producer.client import Client
    from producer.preflight import Check

console = Console()

EXIT_ERROR = 2
EXIT_TIMEOUT = 3


class Seconds(click.ParamType):
    """A duration: a finite number of seconds, not negative (`float` alone lets nan and inf
    through, and a wait for inf seconds never ends)."""

    name = "seconds"

    def convert(self, value: object, param: click.Parameter | None, ctx: click.Context | None) -> float:
        try:
            seconds = float(value)  # type: ignore[arg-type]
        except (TypeError, ValueError):
            self.fail(f"{value!r} is not a number of seconds", param, ctx)
        if not math.isfinite(seconds) or seconds < 0:
            self.fail(f"{value!r} is not a finite, non-negative number of seconds", param, ctx)
        return seconds


SECONDS = Seconds()


def load_settings() -> Settings:
    try:
        return get_settings()
    except ValidationError as exc:
        # A malformed REFINERY_* variable (or .env line) is bad input like a bad option.
        first = exc.errors()[0]
        names = ".".join(str(part) for part in first["loc"])
        raise InvalidInput(first["msg"], field=f"REFINERY_{names.upper()}") from None


def make_client() -> Client:
    # Imported on first use: `refinery worker` and `--help` need neither the client nor boto3.
    from producer.client import Client

    return Client(load_settings())


_STYLE = {"ok": "green", "warn": "yellow", "fail": "bold red"}


def show_checks(checks: list[Check], title: str) -> None:
    """Preflight checks as one table (`refinery doctor`, `refinery status`)."""
    table = Table(title=title)
    table.add_column("check")
    table.add_column("status")
    table.add_column("detail", overflow="fold")
    for check in checks:
        table.add_row(check.name, f"[{_STYLE[check.status]}]{check.status}[/]", check.detail)
    console.print(table)
