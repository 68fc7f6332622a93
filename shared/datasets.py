"""Where a pair dataset's files live, for the worker that writes them and the tools that
read, resume and mirror them (the layout ``refiner.data.PairDataset`` reads):

    <dataset>/pairs/<pair_id>/student.png
    <dataset>/pairs/<pair_id>/teacher.png
    <dataset>/manifest/<pair_id>.json      written last: its presence means the pair is complete
"""

from __future__ import annotations

PAIR_IMAGES = ("student", "teacher")


def pair_paths(pair_id: str) -> dict[str, str]:
    """Paths relative to the dataset root."""
    paths = {role: f"pairs/{pair_id}/{role}.png" for role in PAIR_IMAGES}
    paths["manifest"] = f"manifest/{pair_id}.json"
    return paths


def pair_uris(dataset: str, pair_id: str) -> dict[str, str]:
    return {name: f"{dataset}/{path}" for name, path in pair_paths(pair_id).items()}


def pair_id_of(manifest_name: str) -> str:
    """``manifest/0000042.json`` (or its last segment) -> ``0000042``."""
    return manifest_name.rsplit("/", 1)[-1].removesuffix(".json")
