"""The README's first command: `refinery demo` serves the shipped demo refiner, and its
contact sheet shows the refiner moving the student's images towards the teacher's."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from PIL import Image

from devstack.demo import DEMO_REFINER
from refiner import load_refiner

pytestmark = pytest.mark.integration


def test_demo_serves_the_trained_refiner_and_shows_its_effect(tmp_path):
    out = tmp_path / "demo-out"
    done = subprocess.run(
        [sys.executable, "-m", "cli", "demo", "--jobs", "3", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    jobs = summary["jobs"]
    assert len(jobs) == 9 and all(job["state"] == "succeeded" for job in jobs)
    version = load_refiner(DEMO_REFINER).version
    refined = [job for job in jobs if job["kind"] != "pair"]
    assert all(job["refiner"] == version for job in refined)
    # The shipped refiner restores detail, on the pairs and on freshly generated images alike.
    assert all(job["quality"]["detail_ratio"] > 2 and not job["quality"]["flagged"] for job in refined)
    scores = summary["scores"]
    assert scores["hf_ratio"]["student"] < 0.6 < scores["hf_ratio"]["refined"]
    assert scores["l1_to_teacher"]["refined"] < 0.85 * scores["l1_to_teacher"]["student"]
    sheet = Image.open(out / "contact_sheet.png")
    assert sheet.height > 3 * 128 and sheet.width > 3 * 128  # three rows of three enlarged tiles
