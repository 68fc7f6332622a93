"""``python -m benchmarks.gpu``: the arguments, the record and the budget's watchdog, then the
parts. The heavy imports (torch, diffusers, transformers) come after the versions are on
record."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

import benchmarks.gpu
from benchmarks.gpu.record import Budget, Record, header, start_logs, watch

log = logging.getLogger(__name__)

# The GPU machine has no network: a stray hub lookup would hang until its timeout there
# instead of failing. Set before huggingface_hub, transformers or diffusers are imported
# (they read these once, at import); the worker process inherits them.
OFFLINE = {
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "HF_HUB_DISABLE_TELEMETRY": "1",
    "DISABLE_TELEMETRY": "1",
    "DO_NOT_TRACK": "1",
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",
}


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.gpu",
        description=benchmarks.gpu.__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--out-dir", type=Path, required=True, help="gpu.json, gpu.log and worker.log go here")
    parser.add_argument("--small", action="store_true", help="tiny configs on the CPU: the same code paths in seconds")
    parser.add_argument(
        "--budget-s", type=float, default=450.0, help="seconds from the process's start; what does not fit is skipped"
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    os.environ.update(OFFLINE)
    start_logs(args.out_dir)
    budget = Budget(args.budget_s)
    record = Record(args.out_dir, header(sys.argv, args.small, budget))
    watchdog = watch(budget, record)
    log.info(
        "budget %.0f s from the process's start, %.1f s ago; writing %s", budget.seconds, budget.elapsed(), record.path
    )
    try:
        # Here, not at the top: an import that fails on the GPU image (a wheel missing) is
        # then recorded beside the versions.
        from benchmarks.gpu.parts import measure_all

        status = measure_all(args.small, budget, record, args.out_dir)
    except Exception as error:  # the run's boundary: whatever failed is on record
        log.exception("the run failed")
        record.set(error=f"{type(error).__name__}: {str(error)[:2000]}", elapsed_s=budget.elapsed())
        status = 1
    finally:
        watchdog.cancel()  # what is on record is final: the interpreter's teardown must not rewrite it
    # A cut run ends as the watchdog ends it, even where this thread got here first (its
    # part failed the moment the watchdog killed the part's processes).
    return 0 if record.cut_short else status
