"""``refinery retention``: the bucket's lifecycle rule that expires job objects."""

from __future__ import annotations

import json

import click

from cli.common import make_client


@click.command()
@click.option("--apply", "apply_rule", is_flag=True, help="Put the rule in place (other rules are kept).")
@click.option("--json", "as_json", is_flag=True)
def retention(apply_rule: bool, as_json: bool) -> None:
    """Results, raw images and uploaded inputs expire after REFINERY_RETENTION_DAYS: show the
    bucket's rule against the settings, or put it in place."""
    storage = make_client().storage
    if apply_rule:
        storage.apply_retention()
    wanted, found = storage.retention_rule(), storage.retention_in_place()
    if as_json:
        click.echo(json.dumps({"wanted": wanted, "in_place": found, "ok": found == wanted}))
        return
    where = f"s3://{storage.settings.s3_bucket}/{wanted['Filter']['Prefix']}"
    days = wanted["Expiration"]["Days"]
    if found == wanted:
        click.echo(f"{where}: objects expire after {days} days")
    else:
        click.echo(f"{where}: no rule matching REFINERY_RETENTION_DAYS={days} (found {found}); run --apply")
