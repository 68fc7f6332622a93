"""``python -m benchmarks.gpu``: the GPU benchmark's code paths kept working between GPU runs.

``--small`` builds the same pipelines from tiny configs on the CPU and runs every part, the
system part through a real local stack (redis-server, moto's S3 server, a worker process
loading the saved model with the product's loader), so what breaks here would break on the
GPU. The run with the GPU image's own package versions is scripts/gpu_rehearsal.sh (CI).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch

from benchmarks.gpu.record import PARTS, Budget, Record

ROOT = Path(__file__).parents[1]
# The machine's two cores are shared: one OpenMP thread per process keeps tiny networks steady.
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def run_benchmark(*args: str, timeout: float = 120) -> tuple[subprocess.CompletedProcess, float]:
    """``python -m benchmarks.gpu ARGS`` from the repository root, and its wall time."""
    started = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks.gpu", *args],
        cwd=ROOT,
        env=ENV,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    return done, time.monotonic() - started


def assert_accounted_for(result: dict) -> None:
    """Every part measured, or skipped with its reason."""
    assert list(result["parts"]) == list(PARTS)
    for name, part in result["parts"].items():
        assert part["status"] in ("ok", "skipped"), (name, part)
        if part["status"] == "skipped":
            assert part["reason"], name


@pytest.mark.integration
def test_small_run_within_its_budget_accounts_for_every_part(tmp_path: Path) -> None:
    # 120 s: the small run took 40-58 s here beside another test file, and 58-70 s alone on
    # a slow day (the rehearsal's run), when a 60 s budget had the watchdog cut it.
    done, wall_s = run_benchmark("--small", "--budget-s", "120", "--out-dir", str(tmp_path), timeout=180)

    assert done.returncode == 0, done.stderr[-4000:]
    assert wall_s < 120, "the budget counts from the process's start and the watchdog ends it there"
    result = json.loads((tmp_path / "gpu.json").read_text())
    assert next(iter(result)) == "versions"
    assert result["versions"]["torch"] == torch.__version__ and result["versions"]["diffusers"]
    assert result["small"] is True and result["device"] == "cpu"
    assert_accounted_for(result)
    assert "budget 120 s from the process's start" in (tmp_path / "gpu.log").read_text()
    parts = result["parts"]

    latency = parts["latency"]
    sizes, batches = result["scale"]["sizes"], result["scale"]["batches"]
    assert [(r["size"], r["batch"]) for r in latency["rows"]] == [(s, b) for s in sizes for b in batches]
    for row in latency["rows"]:
        assert row["status"] == "ok", row
        assert row["s_per_call"] == pytest.approx(row["s_per_image"] * row["batch"], rel=0.01, abs=1e-3)

    refiner = parts["refiner_speed"]
    if refiner["status"] == "ok":
        assert {r["variant"] for r in refiner["rows"]} == {"eager", "channels_last", "compile", "compile+channels_last"}
        assert all(r["status"] == "ok" and r["ms_per_image"] > 0 for r in refiner["rows"]), refiner
        assert result["goals"]["refiner_ms_per_image"]["best"] == min(r["ms_per_image"] for r in refiner["rows"])

    batching = parts["batching"]
    if batching["status"] == "ok":
        for levels in (batching["generator"], batching["generator_and_refiner"]):
            assert 0 <= levels["mean_levels"] <= levels["max_levels"] <= 255
            assert levels["nonfinite_values"] == 0

    saving = parts["saving"]
    if saving["status"] == "ok":
        assert saving["flops_saving_vs_dev"] == pytest.approx(0.86, abs=0.02)  # benchmarks/results/refiner_cost.json
        for run in saving["rows"]:
            dev, both = run["dev"], run["schnell_plus_refiner"]
            assert dev["status"] == both["status"] == "ok", run
            assert run["saving_vs_dev"] == pytest.approx(1 - both["s_per_image"] / dev["s_per_image"], abs=1e-3)

    system = parts["system"]
    if system["status"] == "ok":
        assert system["direct"]["jobs_per_s"] > 0 and system["system"]["jobs_per_s"] > 0
        assert system["system_over_direct"] == pytest.approx(
            system["system"]["jobs_per_s"] / system["direct"]["jobs_per_s"], abs=0.01
        )
        assert set(system["system"]["batch_sizes"]) <= set(range(1, system["max_batch"] + 1))
        assert "celery" in (tmp_path / "worker.log").read_text()


@pytest.mark.integration
def test_a_budget_spent_mid_run_stops_it_with_every_part_on_record(tmp_path: Path) -> None:
    # 8 s: the imports alone take about 5 s here, the whole small run about 40 s.
    done, wall_s = run_benchmark("--small", "--budget-s", "8", "--out-dir", str(tmp_path))

    assert done.returncode == 0, done.stderr[-4000:]
    assert wall_s < 8
    result = json.loads((tmp_path / "gpu.json").read_text())
    assert result["finished"] is False
    assert_accounted_for(result)
    assert any("stopped at" in part.get("reason", "") for part in result["parts"].values())


@pytest.mark.skipif(torch.cuda.is_available(), reason="with a GPU this would run the full benchmark")
def test_full_run_without_a_gpu_says_so_in_one_line(tmp_path: Path) -> None:
    done, _ = run_benchmark("--out-dir", str(tmp_path))

    assert done.returncode == 2
    assert done.stderr.strip().splitlines()[-1].startswith("benchmarks.gpu: no CUDA device")
    assert "Traceback" not in done.stderr
    result = json.loads((tmp_path / "gpu.json").read_text())
    assert result["error"].startswith("no CUDA device") and result["versions"]["torch"]


def test_the_record_is_whole_after_every_row_and_a_cut_keeps_the_rows(tmp_path: Path) -> None:
    record = Record(tmp_path, {"versions": {}})
    record.begin("latency")
    record.row("latency", {"size": 64, "batch": 1, "status": "ok"})
    assert json.loads(record.path.read_text())["parts"]["latency"]["rows"] == [{"size": 64, "batch": 1, "status": "ok"}]

    record.finish("latency")
    record.begin("refiner_speed")
    record.row("refiner_speed", {"batch": 1, "status": "ok"})
    record.cut("budget: stopped")

    parts = json.loads(record.path.read_text())["parts"]
    assert parts["latency"]["status"] == "ok"
    assert parts["refiner_speed"] == {**parts["refiner_speed"], "status": "skipped", "reason": "budget: stopped"}
    assert len(parts["refiner_speed"]["rows"]) == 1
    assert {parts[name]["status"] for name in ("batching", "saving", "system")} == {"skipped"}


def test_nothing_after_the_cut_overwrites_it(tmp_path: Path) -> None:
    # The watchdog kills the system part's stack as it cuts; the part then fails on the
    # main thread, which must neither record that failure nor finish the run.
    record = Record(tmp_path, {"versions": {}})
    record.begin("system")
    record.cut("budget: stopped")
    record.finish("system", status="error", error="ConnectionError: Error 111 connecting")
    record.set(finished=True, elapsed_s=61.0)

    result = json.loads(record.path.read_text())
    assert result["parts"]["system"] == {**result["parts"]["system"], "status": "skipped", "reason": "budget: stopped"}
    assert result["finished"] is False and "elapsed_s" not in result
    assert record.result == result


def test_budget_counts_from_the_process_start() -> None:
    # psutil's figure for the same age is off by up to a second (a boot time in whole seconds).
    assert Budget(60).elapsed() == pytest.approx(time.time() - psutil.Process().create_time(), abs=1.1)
    budget = Budget(10, started=time.monotonic() - 9)
    assert budget.lacks(0.5) is None
    assert budget.lacks(5) == "budget: needs ~5 s, 1 s left"


def test_the_system_part_names_what_it_lacks(monkeypatch: pytest.MonkeyPatch) -> None:
    from benchmarks.gpu import system

    monkeypatch.setattr(system, "PACKAGES", ("celery", "no_such_package"))
    assert system.missing() == ["no_such_package"]
