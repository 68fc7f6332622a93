"""``refinery refiner``: publish refiner versions to the bucket, move them through the
stable and canary channels that ``REFINERY_REFINER=registry:NAME`` workers follow, roll
them back, and see what serves (docs/refiner.md, "Shipping a refiner")."""

from __future__ import annotations

import getpass
import json
import socket
from pathlib import Path
from typing import Any

import click
from rich.table import Table

from cli.common import console, make_client
from shared.canary import CanaryRule
from shared.refiner_channels import Channels, ChannelStore, check_fraction
from shared.refiner_registry import RefinerRegistry, check_name, parse_ref
from shared.settings import Settings


def _person() -> str:
    return f"{getpass.getuser()}@{socket.gethostname()}"


def _stores() -> tuple[RefinerRegistry, ChannelStore, Settings]:
    client = make_client()
    return RefinerRegistry(client.storage), ChannelStore(client.store.redis), client.settings


@click.group()
def refiner() -> None:
    """Publish, promote, canary and roll back refiner versions."""


@refiner.command()
@click.argument("directory", type=click.Path(path_type=Path))
@click.option("--name", help="The refiner's name (default: the directory's).")
@click.option("--no-eval", is_flag=True, help="Publish a refiner whose card holds no `refinery eval` metrics.")
@click.option("--json", "as_json", is_flag=True)
def publish(directory: Path, name: str | None, no_eval: bool, as_json: bool) -> None:
    """Upload an exported refiner (`refinery train --out`) as an immutable version."""
    registry, _, _ = _stores()
    published, new = registry.publish(directory, name or directory.resolve().name, require_eval=not no_eval)
    if as_json:
        click.echo(json.dumps({**published.model_dump(mode="json"), "new": new}))
    else:
        click.echo(f"{published.ref} {'published' if new else 'was already published (same bytes)'}")


@refiner.command("list")
@click.argument("name", required=False)
@click.option("--json", "as_json", is_flag=True, help="One JSON object per line: each version's manifest.")
def list_versions(name: str | None, as_json: bool) -> None:
    """Published versions, oldest first, with their evaluation and channel."""
    registry, channels, _ = _stores()
    versions = registry.versions(check_name(name) if name else None)
    found = {n: channels.find(n) for n in {v.name for v in versions}}
    if as_json:
        for version in versions:
            click.echo(version.model_dump_json())
        return
    table = Table()
    for column in ("version", "channel", "published", "from", "detail ratio", "gap closed", "L1 / student's"):
        table.add_column(column)
    for version in versions:
        metrics = [f"{value:.3f}" if value is not None else "-" for value in version.metrics.values()]
        table.add_row(
            version.ref,
            _channel(found[version.name], version.version),
            f"{version.published_at:%Y-%m-%d %H:%M}",
            version.published_from,
            *(metrics if version.evaluated else ["not evaluated", "", ""]),
        )
    console.print(table)


def _channel(channels: Channels | None, version: str) -> str:
    if channels is None:
        return ""
    if channels.stable == version:
        return "stable"
    if channels.canary == version:
        return f"canary {channels.canary_fraction:.0%}"
    return ""


@refiner.command()
@click.argument("ref", metavar="NAME@VERSION")
@click.option("--canary", type=float, help="Serve it to this share of jobs (0-1) beside stable, instead of as stable.")
@click.option("--by", default=None, help="Who promotes it, for the history (default: user@host).")
def promote(ref: str, canary: float | None, by: str | None) -> None:
    """Make a published version stable, or the canary beside stable."""
    name, version = parse_ref(ref, field="ref")
    if canary is not None:
        check_fraction(canary)
    registry, channels, _ = _stores()
    registry.get(name, version)
    after = channels.promote(name, version, by or _person(), canary=canary)
    click.echo(f"{name}: {_summary(after)} (revision {after.revision})")


@refiner.command()
@click.argument("name")
@click.option("--reason", help="Why, for the history.")
@click.option("--by", default=None, help="Who rolls it back, for the history (default: user@host).")
def rollback(name: str, reason: str | None, by: str | None) -> None:
    """End the canary; with none, go back to the previous stable version."""
    _, channels, _ = _stores()
    channels.get(check_name(name))  # an unknown name is not one with nothing to roll back
    after = channels.rollback(name, by or _person(), reason)
    click.echo(f"{name}: {_summary(after)} (revision {after.revision})")


def _summary(channels: Channels) -> str:
    canary = f", canary {channels.canary} at {channels.canary_fraction:.0%}" if channels.canary else ""
    return f"stable {channels.stable}{canary}"


@refiner.command()
@click.argument("name")
@click.option("--json", "as_json", is_flag=True)
def status(name: str, as_json: bool) -> None:
    """The channels, the canary's tallies and verdict so far, what each worker serves, the history."""
    _, channels, settings = _stores()
    current = channels.get(check_name(name))
    report = {**current.model_dump(mode="json"), **_comparison(channels, current, settings)}
    report["workers"] = _workers(name)
    if as_json:
        click.echo(json.dumps(report))
        return
    console.print(f"[bold]{name}[/]: {_summary(current)} (revision {current.revision})")
    if report["verdict"]:
        tallies = report["tallies"]
        for arm in ("stable", "canary"):
            if arm in tallies:
                console.print(f"  {arm}: {tallies[arm]}")
        console.print(f"  verdict: {report['verdict']}")
    for worker, seen in report["workers"].items():
        console.print(
            f"  worker {worker}: revision {seen['revision']}, stable {seen['stable']}, canary {seen['canary']}"
        )
    for change in current.history[-10:]:
        reason = f": {change.reason}" if change.reason else ""
        console.print(
            f"  r{change.revision} {change.at:%Y-%m-%d %H:%M:%S} {change.action} {change.channel} "
            f"{change.version} by {change.by}{reason}"
        )


def _comparison(channels: ChannelStore, current: Channels, settings: Settings) -> dict[str, Any]:
    """The canary's tallies against stable's since it started, and what the rule says."""
    if current.canary is None or current.stable is None or current.canary_epoch is None:
        return {"tallies": {}, "verdict": None}
    tallies = channels.tallies(current.name, current.canary_epoch)
    arms = {arm: tallies.get(current.ref(getattr(current, arm))) for arm in ("stable", "canary")}
    rule = CanaryRule.from_settings(settings)
    stable, canary = arms["stable"], arms["canary"]
    if stable is None or canary is None or min(stable.jobs, canary.jobs) < rule.min_jobs:
        verdict = f"too few jobs so far (the rule needs {rule.min_jobs} in each)"
    else:
        verdict = rule.verdict(stable, canary) or "not worse so far"
    return {"tallies": {arm: tally.summary() for arm, tally in arms.items() if tally}, "verdict": verdict}


def _workers(name: str) -> dict[str, dict[str, Any]]:
    """What each worker following ``name`` has adopted, from the worker records."""
    found = {}
    for worker, info in make_client().store.workers().items():
        following = info.get("refiner_channels")
        if isinstance(following, dict) and following.get("name") == name:
            found[worker] = {**following, "failures": info.get("refiner_failures", {})}
    return found
