"""Dataset pairs through the queue: a pairs worker with student and teacher resident."""

from __future__ import annotations

import json
import subprocess
import sys

import httpx
import pytest
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

from devstack.stack import LocalStack, free_port, wait_until
from refiner.data import PairDataset

pytestmark = pytest.mark.integration


def pair_stage_counts(metrics_port: int) -> dict[str, float]:
    """refinery_stage_seconds_count of pair jobs, by stage, as the worker serves it."""
    scraped = httpx.get(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10).text
    return {
        sample.labels["stage"]: sample.value
        for family in text_string_to_metric_families(scraped)
        for sample in family.samples
        if sample.name == "refinery_stage_seconds_count" and sample.labels["kind"] == "pair"
    }


def said(result: subprocess.CompletedProcess) -> str:
    """A command's output as one line: the console wraps it at 80 columns."""
    return " ".join(result.stdout.split())


def test_pairs_generate_writes_a_resumable_dataset(tmp_path):
    out = tmp_path / "dataset"
    with LocalStack(tmp_path / "stack", max_batch=4) as stack:
        metrics_port = free_port()
        stack.start_worker("pairs", [stack.settings.queue("pair")], metrics_port=metrics_port)
        args = ["pairs", "generate", "--count", "6", "--out", str(out), "--width", "32", "--height", "48"]
        first = stack.refinery(*args, "--student", "tiny-schnell", "--teacher", "tiny-dev")
        # Counted just after each record's final write, which `pairs generate` may return before.
        wait_until(lambda: pair_stage_counts(metrics_port).get("upload") == 6, timeout_s=30, what="6 pairs counted")
        stage_counts = pair_stage_counts(metrics_port)
        again = stack.refinery(*args)  # presets default to the settings: the same pair
        more = stack.refinery(*[a if a != "6" else "8" for a in args])
        status = stack.refinery("pairs", "status", "--out", str(out), "--json")
        wrong = stack.refinery(
            "pairs",
            "generate",
            "--count",
            "1",
            "--out",
            f"s3://{stack.settings.s3_bucket}/other",
            "--teacher",
            "flux-dev",
            "--width",
            "256",
            "--height",
            "256",
        )
    # A new stack (empty S3, no worker): the local directory's pairs still count as written.
    with LocalStack(tmp_path / "stack2") as stack:
        resumed = stack.refinery(*[a if a != "6" else "8" for a in args])
        # One more pair, and no worker to run it: said at once, rather than a silent wait.
        waiting = subprocess.Popen(
            [sys.executable, "-m", "cli", *[a if a != "6" else "9" for a in args]],
            env=stack.env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            assert waiting.stderr is not None
            warning = waiting.stderr.readline()
            still_waiting = waiting.poll() is None
        finally:
            waiting.kill()
            waiting.wait()

    assert first.returncode == 0, first.stderr
    # The pairs' model time is in Prometheus, as their own stages.
    assert stage_counts == {"student": 6, "teacher": 6, "encode": 6, "upload": 6}
    assert "6 pairs queued, 0 already written" in said(first)
    assert "0 pairs queued, 6 already written" in said(again)
    assert "2 pairs queued, 6 already written" in said(more)
    assert json.loads(status.stdout)["written"] == 8 and json.loads(status.stdout)["mirrored"] == 8
    assert resumed.returncode == 0 and "0 pairs queued, 8 already written" in said(resumed), resumed.stderr
    assert warning.startswith("warning: no live worker consumes the 'pairs' queue") and still_waiting, warning
    assert "refinery worker --queues pairs" in warning

    rows = [json.loads(p.read_text()) for p in sorted((out / "manifest").glob("*.json"))]
    assert [r["pair_id"] for r in rows] == [f"{i:07d}" for i in range(8)]
    assert [r["seed"] for r in rows] == list(range(8))
    assert rows[0]["student"] == {"preset": "tiny-schnell", "steps": 4, "guidance": 0.0}
    assert rows[0]["teacher"] == {"preset": "tiny-dev", "steps": 28, "guidance": 3.5}
    assert {"age_group", "gender_presentation", "ethnicity_region"} <= rows[0]["attributes"].keys()
    assert rows[0]["timings_ms"]["teacher"] > 0 and rows[0]["batch_size"] >= 1
    student = Image.open(out / "pairs/0000000/student.png")
    teacher = Image.open(out / "pairs/0000000/teacher.png")
    assert student.size == teacher.size == (32, 48)
    assert student.tobytes() != teacher.tobytes()

    # What training reads.
    total = len(PairDataset(out, "train")) + len(PairDataset(out, "val"))
    assert total == 8
    # A job for presets this worker does not serve fails with the field named.
    assert wrong.returncode == 2 and "failed [invalid_input] teacher:" in wrong.stdout
