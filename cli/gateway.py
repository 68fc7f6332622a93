"""`refinery gateway` (the HTTP front door) and `refinery keys` (its tenants' API keys)."""

from __future__ import annotations

import json

import click
from rich.table import Table

from cli.common import console, load_settings


@click.command()
@click.option("--host", help="Address to listen on (REFINERY_GATEWAY_HOST).")
@click.option("--port", type=click.IntRange(0, 65535), help="Port to listen on (REFINERY_GATEWAY_PORT).")
@click.option("--workers", type=click.IntRange(1), help="uvicorn worker processes (REFINERY_GATEWAY_WORKERS).")
@click.option("--openapi", "print_openapi", is_flag=True, help="Print the OpenAPI document and exit.")
def gateway(host: str | None, port: int | None, workers: int | None, print_openapi: bool) -> None:
    """Serve the job API over HTTP to tenants with API keys (docs/gateway.md)."""
    # Imported here: the other commands need neither uvicorn nor FastAPI.
    import uvicorn

    from producer.gateway.app import create_app

    # Read here too (each worker reads its own): a bad REFINERY_* value fails once, plainly.
    settings = load_settings()
    if print_openapi:
        # What docs/openapi.json holds; tests/test_gateway.py checks it against a live gateway.
        click.echo(json.dumps(create_app(settings).openapi(), indent=2))
        return
    uvicorn.run(
        "producer.gateway.app:create_app",
        factory=True,
        host=host or settings.gateway_host,
        port=settings.gateway_port if port is None else port,
        workers=workers or settings.gateway_workers,
        # Behind a TLS-terminating proxy the client's address comes in X-Forwarded-For.
        proxy_headers=True,
        access_log=False,
    )


@click.group()
def keys() -> None:
    """Tenants' API keys for the gateway: create, list, revoke."""


def _store():
    from producer.gateway.auth import KeyStore
    from shared.redis_client import connect

    return KeyStore(connect(load_settings()))


@keys.command("create")
@click.option("--tenant", required=True, help="Who the key's jobs belong to.")
@click.option("--rate", type=float, help="Jobs per second (default REFINERY_GATEWAY_DEFAULT_RATE).")
@click.option("--max-queued", type=int, help="Queued jobs at most (default REFINERY_GATEWAY_DEFAULT_MAX_QUEUED).")
@click.option("--json", "as_json", is_flag=True, help="Print the key and its record as one JSON object.")
def create(tenant: str, rate: float | None, max_queued: int | None, as_json: bool) -> None:
    """Make a key; it is printed once and stored only as a hash."""
    settings = load_settings()
    token, record = _store().create(
        tenant,
        rate=settings.gateway_default_rate if rate is None else rate,
        max_queued=settings.gateway_default_max_queued if max_queued is None else max_queued,
    )
    if as_json:
        click.echo(json.dumps({"key": token, **record.model_dump(mode="json")}))
        return
    click.echo(token)
    click.echo(
        f"key id {record.key_id} for tenant {record.tenant}: {record.rate:g} jobs/s, {record.max_queued} queued",
        err=True,
    )


@keys.command("list")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per line.")
def list_keys(as_json: bool) -> None:
    """Every key: its id, tenant, limits and whether it is revoked (never the key itself)."""
    found = _store().list()
    if as_json:
        for record in found:
            click.echo(record.model_dump_json())
        return
    table = Table("key id", "tenant", "rate/s", "max queued", "created", "revoked")
    for record in found:
        revoked = record.revoked_at.isoformat(timespec="seconds") if record.revoked_at else ""
        created = record.created_at.isoformat(timespec="seconds")
        table.add_row(record.key_id, record.tenant, f"{record.rate:g}", str(record.max_queued), created, revoked)
    console.print(table)


@keys.command("revoke")
@click.argument("key_id")
def revoke(key_id: str) -> None:
    """Revoke a key by its id: every gateway replica refuses it from its next request."""
    record = _store().revoke(key_id)
    click.echo(f"revoked key {record.key_id} of tenant {record.tenant}")
