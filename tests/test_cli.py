"""Unit tests for the ``refinery`` command line's own parsing (no services)."""

from __future__ import annotations

from pathlib import Path

import click
import pytest

from cli import training

MIRROR = Path("/cache/datasets/0123456789abcdef")


@pytest.fixture
def mirrored(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    uris: list[str] = []

    def mirror_dataset(uri: str) -> Path:
        uris.append(uri)
        return MIRROR

    monkeypatch.setattr(training, "mirror_dataset", mirror_dataset)
    return uris


def _argv(command: click.Command, args: list[str]) -> list[str]:
    with command.make_context(command.name, args) as ctx:
        return training.refiner_argv(ctx)


@pytest.mark.parametrize("command", [training.train, training.evaluate], ids=["train", "eval"])
@pytest.mark.parametrize(
    "data", [["--data=s3://portraits/v1/"], ["--data", "s3://portraits/v1/"]], ids=["equals", "space"]
)
def test_an_s3_dataset_is_mirrored_and_passed_on_as_a_local_directory(mirrored, command, data) -> None:
    argv = _argv(command, ["--arch", "cyclegan", *data, "--out", "runs/r1"])
    assert mirrored == ["s3://portraits/v1/"]
    assert argv == ["--data", str(MIRROR), "--arch", "cyclegan", "--out", "runs/r1"]


@pytest.mark.parametrize("command", [training.train, training.evaluate], ids=["train", "eval"])
def test_a_local_dataset_passes_unchanged(mirrored, command) -> None:
    assert _argv(command, ["--data", "datasets/v1", "--out", "runs/r1"]) == [
        "--data",
        "datasets/v1",
        "--out",
        "runs/r1",
    ]
    assert _argv(command, ["--help"]) == ["--help"]
    assert mirrored == []
