"""What every command shares: the console, the exit statuses and the job client."""

from __future__ import annotations

from typing import TYPE_CHECKING

from rich.console import Console

from shared.settings import get_settings

if TYPE_CHECKING:
    from producer.client import Client

console = Console()

EXIT_ERROR = 2
EXIT_TIMEOUT = 3


def make_client() -> Client:
    # Imported on first use: `refinery worker` and `--help` need neither the client nor boto3.
    from producer.client import Client

    return Client(get_settings())
