"""``benchmarks/gpu.py``: the GPU benchmark's code paths kept working between GPU runs.

``--small`` builds the same pipelines from tiny configs on the CPU and runs every part, the
system part through a real local stack (redis-server, moto's S3 server, a worker process
loading the saved model with the product's loader), so what breaks here would break on the GPU.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

BENCHMARKS = Path(__file__).parents[1] / "benchmarks"
SCRIPT = BENCHMARKS / "gpu.py"
REAL_RESULTS = BENCHMARKS / "results" / "gpu.json"
# The machine's two cores are shared: one OpenMP thread per process keeps tiny networks steady.
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def _stat(path: Path) -> tuple[int, int] | None:
    return (path.stat().st_mtime_ns, path.stat().st_size) if path.exists() else None


@pytest.mark.integration
def test_small_run_measures_every_part_into_its_own_file(tmp_path: Path) -> None:
    out = tmp_path / "gpu-small.json"
    real_before = _stat(REAL_RESULTS)
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--small", "--out", str(out)],
        env=ENV,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    assert _stat(REAL_RESULTS) == real_before, "--small must never write the real gpu.json"
    result = json.loads(out.read_text())
    assert result["small"] is True and result["device"] == "cpu"
    assert result["skipped"] == [], "a small run fits its budget"

    sizes, batches = result["scale"]["sizes"], result["scale"]["batches"]
    latency = result["latency"]
    assert [(r["size"], r["batch"]) for r in latency] == [(s, b) for s in sizes for b in batches]
    for row in latency:
        assert row["status"] == "ok", row
        assert row["s_per_image"] > 0
        assert row["s_per_call"] == pytest.approx(row["s_per_image"] * row["batch"], rel=0.01, abs=1e-3)

    refiner = result["refiner"]
    assert {r["variant"] for r in refiner} == {"eager", "channels_last", "compile", "compile+channels_last"}
    assert all(r["status"] == "ok" and r["ms_per_image"] > 0 for r in refiner), refiner

    batching = result["batching"]
    for levels in (batching["generator"], batching["generator_and_refiner"]):
        assert 0 <= levels["mean_levels"] <= levels["max_levels"] <= 255
        assert levels["nonfinite_values"] == 0

    saving = result["saving"]
    assert saving["flops_saving_vs_dev"] == pytest.approx(0.86, abs=0.02)  # benchmarks/results/refiner_cost.json
    runs = saving["runs"]
    assert [r["batch"] for r in runs] == [1, 2]
    for run in runs:
        dev, both = run["dev"], run["schnell_plus_refiner"]
        assert dev["status"] == both["status"] == "ok", run
        assert run["saving_vs_dev"] == pytest.approx(1 - both["s_per_image"] / dev["s_per_image"], abs=1e-3)
    # 28 steps against 4 (plus a refiner that is small next to them): dev is the slower one.
    assert sum(r["dev"]["s_per_image"] for r in runs) > sum(r["schnell_plus_refiner"]["s_per_image"] for r in runs)

    system = result["system"]
    assert system["status"] == "ok", system
    assert system["direct"]["jobs_per_s"] > 0 and system["system"]["jobs_per_s"] > 0
    assert system["system_over_direct"] == pytest.approx(
        system["system"]["jobs_per_s"] / system["direct"]["jobs_per_s"], abs=0.01
    )
    assert set(system["system"]["batch_sizes"]) <= set(range(1, system["max_batch"] + 1))

    goals = result["goals"]
    assert goals["refiner_ms_per_image"]["best"] == min(r["ms_per_image"] for r in refiner)
    assert goals["schnell_plus_refiner_s_per_image"]["best"] > 0


@pytest.mark.skipif(torch.cuda.is_available(), reason="with a GPU this would run the full benchmark")
def test_full_run_without_a_gpu_says_so_in_one_line(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--out", str(tmp_path / "gpu.json")],
        env=ENV,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2
    assert done.stderr.strip().splitlines()[-1].startswith("gpu.py: no CUDA device")
    assert "Traceback" not in done.stderr
    assert not (tmp_path / "gpu.json").exists()
