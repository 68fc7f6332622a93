"""`refinery` processes forked from one that imported their modules once.

A worker spends 5-9 s of CPU importing torch, diffusers and transformers before it
serves, and a `refinery` command 0.5 s (4 s for `train` and `eval`); the test suite starts
about a hundred of each. The stack starts both from multiprocessing's fork server instead,
which imports those modules once per process that uses the stack. Each is still a process
of its own, running `refinery`'s main with its own arguments, environment, working
directory, output and signal handling, as a spawned one would; only the imports are done
before the fork.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

from tqdm import tqdm

# What `refinery worker` imports before it serves (worker.models and worker.tiny_flux
# bring diffusers, transformers and torch); nothing here reads settings at import.
PRELOAD = ["cli", "worker.app", "worker.lifecycle", "worker.models", "worker.tiny_flux", "refiner"]
# And what it imports where first used (celery.bin.celery brings the Celery command's
# plugins, Flower's and click-repl's). Without these, a forked worker imported some 350
# modules itself: a model worker started in 0.83-0.96 s of CPU, now 0.67-0.78 s; a
# callbacks worker in 0.32 s, now 0.12-0.17 s.
PRELOAD += """
    worker.main worker.handlers.generate worker.handlers.refine worker.handlers.pair
    celery.bin.celery celery.apps.worker celery.concurrency.thread kombu.transport.redis
    celery.worker.components celery.worker.consumer celery.worker.strategy celery.worker.loops
    celery.worker.autoscale celery.app.amqp celery.app.control celery.app.log celery.fixups.django
    boto3.s3.transfer diffusers.guiders
""".split()

_context = multiprocessing.get_context("forkserver")
_context.set_forkserver_preload(PRELOAD)


def _run_refinery(args: list[str], env: dict[str, str], cwd: str, log: str, errors: str) -> None:
    """The forked process's main: what `python -m cli ARGS` does, with stdout appended to
    ``log`` and stderr to ``errors`` unbuffered (as PYTHONUNBUFFERED=1 makes a spawned one)."""
    for path, stream in ((log, 1), (errors, 2)):
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
        os.dup2(fd, stream)
        os.close(fd)
    sys.stdout.reconfigure(write_through=True)  # type: ignore[union-attr]
    sys.stderr.reconfigure(write_through=True)  # type: ignore[union-attr]
    os.chdir(cwd)
    os.environ.clear()
    os.environ.update(env)
    # torch read OMP_NUM_THREADS when the fork server imported it; a spawned process reads its own.
    if "OMP_NUM_THREADS" in env:
        import torch  # preloaded: only looked up

        torch.set_num_threads(int(env["OMP_NUM_THREADS"]))
    sys.argv = ["refinery", *args]
    # tqdm's default lock (diffusers' progress bars take it) is a multiprocessing one, which
    # this process would register with the parent's resource tracker and never release:
    # the parent would warn of a leaked semaphore when it exits.
    tqdm.set_lock(threading.RLock())
    from cli import main

    main()


class ForkedProcess:
    """A `refinery` command run in a forked process, with the part of `subprocess.Popen`'s
    interface the stack and its tests use (pid, poll, wait, send_signal, kill, returncode)."""

    def __init__(self, args: list[str], env: dict[str, str], cwd: Path, log: Path, errors: Path | None = None) -> None:
        """Runs `refinery ARGS`, its stdout appended to ``log``, its stderr to ``errors``
        (default: ``log`` too)."""
        self.args = args
        streams = (str(log), str(errors or log))
        # Daemonic: a test process that ends without stopping its stack takes these along.
        self._process = _context.Process(target=_run_refinery, args=(args, env, str(cwd), *streams), daemon=True)
        self._process.start()
        self.pid: int = self._process.pid  # type: ignore[assignment]

    @property
    def returncode(self) -> int | None:
        """As Popen's: the exit status, or minus the signal that ended the process."""
        return self._process.exitcode

    def poll(self) -> int | None:
        return self._process.exitcode

    def wait(self, timeout: float | None = None) -> int:
        self._process.join(timeout)
        if self._process.exitcode is None:
            raise subprocess.TimeoutExpired(self.args, timeout or 0)
        return self._process.exitcode

    def send_signal(self, sig: int) -> None:
        if self._process.exitcode is None:
            os.kill(self.pid, sig)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)
