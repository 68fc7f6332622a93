"""``refinery node``: every worker a GPU node needs, started and kept running.

One model worker per GPU, each pinned with ``CUDA_VISIBLE_DEVICES`` (so each holds one
copy of the models on its own device), plus one callbacks worker; on a machine without a
GPU, one CPU model worker. The node supervises them as systemd or Kubernetes would a
pod's containers: a worker that dies is restarted after a backoff, and one that crashed
``REFINERY_NODE_MAX_CRASHES`` times within ``REFINERY_NODE_CRASH_WINDOW_S`` stays down
and says so. SIGTERM and SIGINT are passed on as SIGTERM, so every worker drains
(``worker/app.py``); a second one kills them.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import IO

from shared.errors import InvalidInput
from shared.settings import Settings

logger = logging.getLogger("refinery.node")

# How long the node waits for its workers after passing on SIGTERM, beyond their drain.
EXIT_GRACE_S = 30.0


@dataclass
class Child:
    name: str
    argv: list[str]
    env: dict[str, str]
    process: subprocess.Popen | None = None
    crashes: deque[float] = field(default_factory=deque)  # monotonic times, within the window
    restart_at: float | None = None
    gave_up: bool = False


def visible_gpus() -> list[str]:
    """The GPUs this node may use, as ``CUDA_VISIBLE_DEVICES`` names them."""
    listed = os.environ.get("CUDA_VISIBLE_DEVICES")
    if listed is not None:
        return [gpu.strip() for gpu in listed.split(",") if gpu.strip()]
    import torch

    return [str(index) for index in range(torch.cuda.device_count())]


def plan_children(settings: Settings, gpus: str, queues: list[str], callbacks: bool) -> list[Child]:
    """The workers of one node: ``gpus`` is ``all`` or a comma-separated list of ids."""
    if gpus == "all":
        devices = visible_gpus()
    else:
        devices = [gpu.strip() for gpu in gpus.split(",") if gpu.strip()]
        if not devices or not all(gpu.isdigit() for gpu in devices):
            raise InvalidInput(f"expected 'all' or GPU ids like 0,1, got {gpus!r}", field="gpus")
    # Each stdin is a pipe from the node: killed outright, the node still takes its workers
    # down with it (they drain when the pipe closes: worker/main.py, exit_with_parent).
    cli = [sys.executable, "-m", "cli", "worker", "--exit-with-parent"]
    worker = [*cli, f"--queues={','.join(queues)}", "--no-callbacks"]
    if devices:
        children = [
            Child(
                f"gpu{gpu}", [*worker, f"--name=gpu{gpu}@%h"], {"CUDA_VISIBLE_DEVICES": gpu, "REFINERY_DEVICE": "cuda"}
            )
            for gpu in devices
        ]
    else:
        children = [Child("cpu", [*worker, "--name=cpu@%h"], {"REFINERY_DEVICE": "cpu"})]
    if callbacks:
        queue = settings.queue_callbacks
        children.append(Child(queue, [*cli, f"--queues={queue}", f"--name={queue}@%h"], {}))
    return children


class Node:
    def __init__(self, settings: Settings, children: list[Child]) -> None:
        self.settings = settings
        self.children = children
        self.stopping = False
        self._signals = 0

    def run(self) -> int:
        """Start the workers and keep them running until SIGTERM or SIGINT. Exit status 0
        after a clean stop, 1 when every worker gave up."""
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._on_signal)
        for child in self.children:
            self._start(child)
        while not self.stopping:
            for child in self.children:
                self._tend(child)
            if all(child.gave_up for child in self.children):
                logger.error("node: every worker gave up; stopping")
                return 1
            time.sleep(0.2)
        return self._wait_all()

    def _on_signal(self, signum: int, _frame: object) -> None:
        self.stopping = True
        self._signals += 1
        # The second signal means "now": kill what is still draining.
        forward = signal.SIGTERM if self._signals == 1 else signal.SIGKILL
        logger.info("node: %s; passing %s to the workers", signal.Signals(signum).name, forward.name)
        for child in self.children:
            if child.process is not None and child.process.poll() is None:
                child.process.send_signal(forward)

    def _start(self, child: Child) -> None:
        # Its own session: a Ctrl+C in the terminal reaches the node only, which passes it on once.
        child.process = subprocess.Popen(
            child.argv,
            env={**os.environ, **child.env},
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        assert child.process.stdout is not None
        threading.Thread(target=_relay, args=(child.name, child.process.stdout), daemon=True).start()
        logger.info("node: started %s (pid %d)", child.name, child.process.pid)

    def _tend(self, child: Child) -> None:
        """Restart a worker that died, with backoff; give up on one that keeps dying."""
        now = time.monotonic()
        if child.gave_up:
            return
        if child.restart_at is not None:
            if now >= child.restart_at:
                child.restart_at = None
                self._start(child)
            return
        assert child.process is not None
        status = child.process.poll()
        if status is None:
            return
        window = self.settings.node_crash_window_s
        child.crashes.append(now)
        while child.crashes and child.crashes[0] < now - window:
            child.crashes.popleft()
        if len(child.crashes) >= self.settings.node_max_crashes:
            child.gave_up = True
            logger.error(
                "node: %s exited %d times within %.0f s (last status %d); it stays down",
                child.name,
                len(child.crashes),
                window,
                status,
            )
            return
        backoff = min(self.settings.node_backoff_max_s, self.settings.node_backoff_s * 2 ** (len(child.crashes) - 1))
        child.restart_at = now + backoff
        logger.warning("node: %s exited with status %d; restarting in %.1f s", child.name, status, backoff)

    def _wait_all(self) -> int:
        deadline = time.monotonic() + self.settings.drain_timeout_s + EXIT_GRACE_S
        for child in self.children:
            if child.process is None:
                continue
            try:
                child.process.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                logger.error("node: %s did not stop in time; killing it", child.name)
                child.process.kill()
                child.process.wait()
        logger.info("node: all workers stopped")
        return 0


def _relay(name: str, stream: IO[bytes]) -> None:
    """A worker's output on the node's, each line prefixed with the worker's name."""
    out = sys.stdout.buffer
    prefix = f"[{name}] ".encode()
    for line in stream:
        out.write(prefix + line)
        out.flush()
