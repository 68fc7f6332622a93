"""Synthetic pair datasets at scale: ``refinery pairs generate`` and ``refinery pairs status``.

Every pair is one ``pair`` job on the pairs queue, so any number of pair workers (student
and teacher resident) share the work. Prompts and seeds are fixed by the dataset seed and
the pair's index, so a run can stop and resume: pairs whose manifest row exists (in S3, or
in the local directory) are skipped, and a pair already queued is not queued twice (its
idempotency key names it).
A local directory as ``--out`` is served through S3 (``<prefix>/datasets/<dir name>``):
workers write there and this side mirrors each finished pair into the directory.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from botocore.exceptions import BotoCoreError, ClientError
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from producer.client import Client, JobHandle
from producer.prompts import build_prompts
from shared.broker import queue_depth
from shared.contract import JobState, PairSpec, parse_s3_uri
from shared.datasets import pair_id_of, pair_paths
from shared.errors import InvalidInput, StorageUnavailable


@dataclass(frozen=True)
class Target:
    """Where a dataset goes: always an S3 prefix, and optionally a local mirror."""

    dataset: str  # s3://bucket/prefix
    mirror: Path | None


def resolve_target(client: Client, out: str) -> Target:
    """``out`` as a dataset: ``s3://bucket/prefix``, or a local directory (existing or not)."""
    if out.startswith("s3://"):
        dataset = out.rstrip("/")
        try:
            parse_s3_uri(dataset + "/manifest")
        except ValueError as exc:
            raise InvalidInput(f"expected s3://bucket/prefix: {exc}", field="out") from None
        return Target(dataset, None)
    try:
        local = Path(out).resolve()
    except (ValueError, OSError) as exc:  # a NUL byte, a symlink loop
        raise InvalidInput(f"not a usable local path: {exc}", field="out") from None
    if local.exists() and not local.is_dir():
        raise InvalidInput(f"{local} is not a directory", field="out")
    settings = client.settings
    return Target(f"s3://{settings.s3_bucket}/{settings.s3_prefix}/datasets/{local.name}", local)


def pair_id(index: int) -> str:
    return f"{index:07d}"


def written_pairs(client: Client, dataset: str) -> set[str]:
    """Ids of complete pairs: those with a manifest row."""
    bucket, prefix = parse_s3_uri(dataset + "/manifest/x")
    prefix = prefix.removesuffix("x")
    found: set[str] = set()
    try:
        for page in client.storage.client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
            found.update(pair_id_of(obj["Key"]) for obj in page.get("Contents", []))
    except ClientError as exc:
        if exc.response.get("Error", {}).get("Code") == "NoSuchBucket":
            raise InvalidInput(f"no bucket {bucket!r}", field="out") from None
        raise StorageUnavailable(f"listing {dataset} failed: {exc}") from exc
    except BotoCoreError as exc:
        raise StorageUnavailable(f"listing {dataset} failed: {exc}") from exc
    return found


def submit(
    client: Client,
    target: Target,
    *,
    count: int,
    student: str,
    teacher: str,
    width: int,
    height: int,
    seed: int = 0,
) -> tuple[list[JobHandle], int]:
    """Queue the pairs of indices 0..count-1 not written yet; returns (handles, skipped)."""
    done = written_pairs(client, target.dataset)
    if target.mirror is not None:
        # A local directory keeps its pairs when the S3 copy is gone (another endpoint, a
        # private test stack): those need no second generation.
        done |= mirrored_pairs(target)
    handles = []
    for index, prompt in enumerate(build_prompts(count, seed=seed)):
        if pair_id(index) in done:
            continue
        handles.append(
            client.submit_pair(
                prompt.text,
                dataset=target.dataset,
                pair_id=pair_id(index),
                # Pair i's seed: the dataset seed offset by its index.
                seed=seed + index,
                width=width,
                height=height,
                attributes=prompt.attributes,
                student=student,
                teacher=teacher,
            )
        )
    return handles, count - len(handles)


def wait(client: Client, target: Target, handles: Iterable[JobHandle], total: int, console: Console) -> dict[str, int]:
    """Wait for the pairs with a progress bar and ETA; mirror each finished one locally."""
    outcome = {"succeeded": 0, "failed": 0, "cancelled": 0}
    handles = list(handles)
    columns = (
        TextColumn("pairs"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("ETA"),
        TimeRemainingColumn(),
    )
    with Progress(*columns, console=console) as progress:
        task = progress.add_task("pairs", total=total, completed=total - len(handles))
        for handle in handles:
            record = handle.wait()
            outcome[record.state.value] += 1
            if record.state is JobState.failed:
                # A failed record always carries its error, and submit() queues only pair jobs.
                assert record.error is not None and isinstance(record.spec, PairSpec)
                field = f" {record.error.field}:" if record.error.field else ""
                console.print(
                    f"pair {record.spec.pair_id} failed [{record.error.code}]{field} {record.error.message}",
                    markup=False,
                )
            progress.advance(task)
    if target.mirror is not None:
        mirror(client, target)
    return outcome


def mirrored_pairs(target: Target) -> set[str]:
    """Ids of the complete pairs in the local directory: those with a manifest row."""
    return {pair_id_of(path.name) for path in (_local_dir(target) / "manifest").glob("*.json")}


def mirror(client: Client, target: Target) -> int:
    """Download the complete pairs the local directory lacks; returns how many."""
    local_dir = _local_dir(target)
    fetched = 0
    for pid in sorted(written_pairs(client, target.dataset) - mirrored_pairs(target)):
        paths = pair_paths(pid)
        # Images first and the manifest row last, as the worker writes them.
        for name in ("student", "teacher", "manifest"):
            local = local_dir / paths[name]
            local.parent.mkdir(parents=True, exist_ok=True)
            local.write_bytes(client.storage.get(f"{target.dataset}/{paths[name]}"))
        fetched += 1
    return fetched


def _local_dir(target: Target) -> Path:
    if target.mirror is None:
        raise ValueError(f"dataset {target.dataset} has no local directory to mirror into")
    return target.mirror


def status(client: Client, target: Target) -> dict[str, object]:
    counts: dict[str, object] = {
        "dataset": target.dataset,
        "written": len(written_pairs(client, target.dataset)),
        "queued": queue_depth(client.store.redis, client.settings.queue("pair")),
    }
    if target.mirror is not None:
        counts["local"] = str(target.mirror)
        counts["mirrored"] = len(mirrored_pairs(target))
    return counts
