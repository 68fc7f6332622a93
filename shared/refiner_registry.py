"""Refiner versions in the bucket: published once, immutable, verified where they are used.

    s3://<bucket>/<prefix>/refiners/<name>/<version>/config.json
                                                     diffusion_pytorch_model.safetensors
                                                     refiner.json      (the card)
                                                     published.json    (this module's manifest)

A version is the first 12 hex digits of the weights' SHA-256, the digest the worker already
puts in every result (``refiner.export.load_refiner``), and ``<name>@<version>`` names it
everywhere: in job records, pins, images' XMP and the channels (``shared.refiner_channels``).
The manifest is written last and holds every file's digest, so a version exists once its
manifest does, and bytes altered in the bucket afterwards are caught by whoever downloads
them (``download``, ``verify``).
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import socket
import tempfile
from datetime import datetime
from pathlib import Path
from typing import Any

from botocore.exceptions import ClientError
from pydantic import BaseModel

from shared.contract import REFINER_NAME, REFINER_VERSION, utcnow
from shared.errors import InvalidInput, RefinerConflict, RefinerUnavailable, UnknownRefiner
from shared.objects import MISSING, ObjectStore

# The files of an exported refiner, as ``refiner.export`` names them (it imports torch, so
# its constants cannot be imported here; a test keeps the two in step).
CONFIG_NAME = "config.json"
WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
CARD_NAME = "refiner.json"
FILES = (CONFIG_NAME, WEIGHTS_NAME, CARD_NAME)
MANIFEST_NAME = "published.json"
VERSION_DIGITS = 12  # as REFINER_VERSION says

_NAME = re.compile(rf"^{REFINER_NAME}$")
_VERSION = re.compile(rf"^{REFINER_VERSION}$")


def check_name(name: str) -> str:
    if not _NAME.match(name):
        raise InvalidInput(
            f"{name!r} is not a refiner name (lowercase letters, digits, '.', '_' or '-', at most 64)", field="name"
        )
    return name


def parse_ref(ref: str, field: str = "refiner") -> tuple[str, str]:
    """``NAME@VERSION`` -> (name, version), both checked."""
    name, at, version = ref.partition("@")
    if not at or not _VERSION.match(version):
        raise InvalidInput(f"expected NAME@VERSION with a {VERSION_DIGITS}-digit hex version, got {ref!r}", field=field)
    check_name(name)
    return name, version


class Published(BaseModel):
    """A version's manifest: what was published, when, from where, and how it scored."""

    name: str
    version: str
    files: dict[str, str]  # file name -> sha256 hex
    evaluated: bool  # whether its card carried evaluation metrics
    metrics: dict[str, float | None]
    architecture: str | None = None
    published_at: datetime
    published_from: str

    @property
    def ref(self) -> str:
        return f"{self.name}@{self.version}"


def card_metrics(card: dict[str, Any]) -> dict[str, float | None]:
    """The scores ``refinery refiner list`` shows, from a card's evaluation block (written
    by ``refinery eval``): detail kept against the teacher, share of the FID gap closed,
    and L1 against the teacher relative to the student's."""
    evaluation = card.get("evaluation") or {}
    return {key: evaluation.get(key) for key in ("detail_ratio", "gap_closed", "l1_vs_student")}


def _holds(directory: Path, published: Published) -> bool:
    """Whether ``directory`` is a complete copy of the published files."""
    return directory.is_dir() and all(
        (directory / file).is_file() and _sha256(directory / file) == digest for file, digest in published.files.items()
    )


def _discard(directory: Path) -> None:
    """Remove a copy that does not match, moving it aside first so that no one finds it half gone."""
    aside = Path(tempfile.mkdtemp(prefix=f".{directory.name}-stale-", dir=directory.parent))
    try:
        directory.rename(aside / directory.name)
    except FileNotFoundError:  # another worker discarded it first
        pass
    shutil.rmtree(aside, ignore_errors=True)


def _sha256(path: Path) -> str:
    with path.open("rb") as file:
        return hashlib.file_digest(file, "sha256").hexdigest()


class RefinerRegistry:
    def __init__(self, objects: ObjectStore) -> None:
        self.objects = objects
        self.bucket = objects.settings.s3_bucket
        self.root = f"{objects.settings.s3_prefix}/refiners"

    def _key(self, name: str, version: str, file: str) -> str:
        return f"{self.root}/{name}/{version}/{file}"

    # -- publishing -----------------------------------------------------------------------

    def publish(self, directory: Path, name: str, *, require_eval: bool = True) -> tuple[Published, bool]:
        """Upload the exported refiner in ``directory`` as ``name``; returns its manifest and
        whether it is new (publishing the same bytes again changes nothing)."""
        check_name(name)
        card = _read_card(directory)
        metrics = card_metrics(card)
        evaluated = any(value is not None for value in metrics.values())
        if require_eval and not evaluated:
            raise InvalidInput(
                f"{directory / CARD_NAME} holds no evaluation metrics: run `refinery eval --refiner {directory}` "
                "first, or publish with --no-eval",
                field="card",
            )
        files = {file: _sha256(directory / file) for file in FILES}
        version = files[WEIGHTS_NAME][:VERSION_DIGITS]
        existing = self._manifest(name, version)
        if existing is not None:
            if existing.files != files:
                raise RefinerConflict(
                    f"{name}@{version} is already published with other bytes ({_differing(existing.files, files)}); "
                    "versions are immutable",
                    field="directory",
                )
            return existing, False
        published = Published(
            name=name,
            version=version,
            files=files,
            evaluated=evaluated,
            metrics=metrics,
            architecture=card.get("architecture"),
            published_at=utcnow(),
            published_from=f"{socket.gethostname()}:{directory.resolve()}",
        )
        for file in FILES:
            self._put(self._key(name, version, file), (directory / file).read_bytes())
        # Last: the version exists once every file it names is in place.
        self._put(self._key(name, version, MANIFEST_NAME), published.model_dump_json(indent=2).encode())
        return published, True

    # -- reading --------------------------------------------------------------------------

    def get(self, name: str, version: str) -> Published:
        published = self._manifest(check_name(name), version)
        if published is None:
            raise UnknownRefiner(f"the registry holds no {name}@{version}", field="refiner_version")
        return published

    def versions(self, name: str | None = None) -> list[Published]:
        """Every published version (of ``name``), oldest first."""
        prefix = f"{self.root}/{check_name(name)}/" if name else f"{self.root}/"

        def manifests() -> list[str]:
            pages = self.objects.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=prefix)
            return [
                e["Key"] for page in pages for e in page.get("Contents", []) if e["Key"].endswith(f"/{MANIFEST_NAME}")
            ]

        keys = self.objects.retrying(f"listing of s3://{self.bucket}/{prefix}", manifests)
        found = [Published.model_validate_json(self._read(key)) for key in keys]
        return sorted(found, key=lambda published: published.published_at)

    def download(self, name: str, version: str, into: Path) -> Path:
        """``into/<name>/<version>/``, holding the version's files, each checked against its
        manifest; a copy already there that still matches is used as it is. Raises
        ``RefinerUnavailable`` naming the file whose bytes differ from what was published.

        Workers on one node share ``into`` and adopt a promotion together, so a copy appears
        only by renaming a complete one into place, and a matching copy is never removed: it
        may be what another worker is loading."""
        published = self.get(name, version)
        target = into / name / version
        if _holds(target, published):
            return target
        target.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{version}-", dir=target.parent))
        try:
            for file, digest in published.files.items():
                data = self._read(self._key(name, version, file))
                if hashlib.sha256(data).hexdigest() != digest:
                    raise RefinerUnavailable(
                        f"{published.ref}: {file} in the bucket does not match its published digest "
                        f"({digest[:12]}...); the version was altered after publishing",
                        field="refiner_version",
                    )
                (staging / file).write_bytes(data)
            if target.exists() and not _holds(target, published):
                _discard(target)
            try:
                staging.rename(target)
            except OSError:  # another worker's copy got there first
                if not _holds(target, published):
                    raise
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        return target

    def verify(self, name: str, version: str) -> None:
        """Check the bucket's bytes of a version against its manifest, without keeping them."""
        published = self.get(name, version)
        for file, digest in published.files.items():
            if hashlib.sha256(self._read(self._key(name, version, file))).hexdigest() != digest:
                raise RefinerUnavailable(
                    f"{published.ref}: {file} in the bucket does not match its published digest", field="refiner"
                )

    # -- S3 -------------------------------------------------------------------------------

    def _manifest(self, name: str, version: str) -> Published | None:
        try:
            return Published.model_validate_json(self._read(self._key(name, version, MANIFEST_NAME)))
        except UnknownRefiner:
            return None

    def _read(self, key: str) -> bytes:
        """An object's bytes, retried through an S3 outage as uploads are: a worker that gave
        up on a version at the first error would serve its revision without it."""

        def read() -> bytes:
            return self.objects.client.get_object(Bucket=self.bucket, Key=key)["Body"].read()

        try:
            return self.objects.retrying(f"download of s3://{self.bucket}/{key}", read, final=MISSING)
        except ClientError:  # one of MISSING: an answer, not an outage
            raise UnknownRefiner(f"no s3://{self.bucket}/{key}", field="refiner_version") from None

    def _put(self, key: str, data: bytes) -> None:
        self.objects.put(f"s3://{self.bucket}/{key}", data, "application/octet-stream")


def _read_card(directory: Path) -> dict[str, Any]:
    """The card of the exported refiner in ``directory``, after checking it is one."""
    if not directory.is_dir():
        raise InvalidInput(f"{directory} is not a directory", field="directory")
    missing = [file for file in FILES if not (directory / file).is_file()]
    if missing:
        raise InvalidInput(
            f"{directory} is not an exported refiner: missing {', '.join(missing)} "
            "(`refinery train --out DIR` writes one)",
            field="directory",
        )
    try:
        card = json.loads((directory / CARD_NAME).read_text())
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise InvalidInput(f"{directory / CARD_NAME} is not JSON: {exc}", field="card") from None
    if not isinstance(card, dict):
        raise InvalidInput(f"{directory / CARD_NAME} is not a JSON object", field="card")
    return card


def _differing(before: dict[str, str], after: dict[str, str]) -> str:
    return ", ".join(file for file in FILES if before.get(file) != after.get(file)) + " differ"
