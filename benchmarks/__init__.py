"""Benchmarks: scripts that measure the system and write benchmarks/results/. Run each from
the repository root (``python benchmarks/throughput.py``, ``python -m benchmarks.gpu``)."""
