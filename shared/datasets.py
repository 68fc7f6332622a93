"""The pair dataset's one definition: where its files live and what a manifest row holds,
for the worker that writes pairs and for the tools that read, resume, mirror, train on and
evaluate them:

    <dataset>/pairs/<pair_id>/student.png
    <dataset>/pairs/<pair_id>/teacher.png
    <dataset>/manifest/<pair_id>.json      written last: its presence means the pair is complete

``<dataset>`` is an ``s3://bucket/prefix`` URI or a local directory; paths are the same.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

PAIR_IMAGES = ("student", "teacher")
PAIRS_DIR, MANIFEST_DIR = "pairs", "manifest"


class PresetRow(BaseModel):
    """How one side of the pair was generated."""

    preset: str
    steps: int
    guidance: float


class ManifestRow(BaseModel):
    """One complete pair: ``manifest/<pair_id>.json``."""

    model_config = ConfigDict(extra="ignore")

    pair_id: str
    prompt: str
    attributes: dict[str, str] = Field(default_factory=dict)  # the prompt builder's choices
    seed: int
    width: int
    height: int
    student: PresetRow
    teacher: PresetRow
    # Per image: the batch's generation time shared by its images (what a pair costs).
    timings_ms: dict[str, float] = Field(default_factory=dict)
    batch_size: int = 1
    job_id: str | None = None


def pair_paths(pair_id: str) -> dict[str, str]:
    """Paths relative to the dataset root: ``student``, ``teacher`` and ``manifest``."""
    paths = {role: f"{PAIRS_DIR}/{pair_id}/{role}.png" for role in PAIR_IMAGES}
    paths["manifest"] = f"{MANIFEST_DIR}/{pair_id}.json"
    return paths


def pair_uris(dataset: str, pair_id: str) -> dict[str, str]:
    return {name: f"{dataset}/{path}" for name, path in pair_paths(pair_id).items()}


def pair_id_of(manifest_name: str) -> str:
    """``manifest/0000042.json`` (or its last segment) -> ``0000042``."""
    return manifest_name.rsplit("/", 1)[-1].removesuffix(".json")
