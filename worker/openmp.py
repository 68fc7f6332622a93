"""How torch's OpenMP threads wait in a worker process: asleep between parallel regions.

libgomp's default spins each idle thread for about 300,000 pauses after every parallel
region. A worker runs many small CPU ops (the tensor conversions at each job's edges)
between its job threads' decoding, encoding and S3 calls, so the spin took the cores from
that work (``benchmarks/ceiling.py --spin``; docs/benchmarks.md). libgomp reads its settings
once, when torch loads it: this runs before anything imports torch.
"""

from __future__ import annotations

import os


def idle_threads_sleep() -> None:
    """``OMP_WAIT_POLICY=PASSIVE``, unless it is set already (tests/test_ceiling.py checks
    that it takes in a worker)."""
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
