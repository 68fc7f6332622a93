"""What a `LocalStack` costs to start and stop (redis-server and S3, no workers): with an S3
server of its own (``private_s3``) against a bucket on the process's shared moto server.

    python benchmarks/stack_start.py [--rounds 6]

The test suite starts some 45 stacks, so this is its cost per stack. The two kinds alternate,
``--rounds`` stacks of each per pass, two passes; the first shared stack, which starts the
shared server, is reported apart. CPU counts this process, its reaped children (redis-server,
a private moto) and the shared server. Writes benchmarks/results/stack_start.json.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import tempfile
import time
from pathlib import Path

import psutil
from rich.console import Console

from devstack.stack import LocalStack, shared_s3

RESULTS = Path(__file__).parent / "results" / "stack_start.json"
console = Console()


def cpu_s() -> float:
    """This process's CPU, its reaped children's and the shared S3 server's, in seconds."""
    own = resource.getrusage(resource.RUSAGE_SELF)
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    total = own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime
    if shared_s3.process is not None:
        times = psutil.Process(shared_s3.process.pid).cpu_times()
        total += times.user + times.system
    return total


def one_stack(private_s3: bool) -> dict[str, float]:
    with tempfile.TemporaryDirectory(prefix="refinery-stack-start-") as tmp:
        cpu, started = cpu_s(), time.monotonic()
        with LocalStack(Path(tmp), private_s3=private_s3):
            up_s = time.monotonic() - started
        return {"up_s": up_s, "up_and_down_s": time.monotonic() - started, "cpu_s": cpu_s() - cpu}


def summary(rows: list[dict[str, float]]) -> dict[str, float]:
    return {f"median_{name}": round(statistics.median(row[name] for row in rows), 3) for name in rows[0]}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=6, help="stacks of each kind per pass")
    args = parser.parse_args(argv)
    rows: dict[str, list[dict[str, float]]] = {"private": [], "shared": []}
    first_shared = None
    for _ in range(2):
        for kind in rows:
            for _ in range(args.rounds):
                row = one_stack(private_s3=kind == "private")
                if kind == "shared" and first_shared is None:
                    first_shared = row  # it started the shared server
                else:
                    rows[kind].append(row)
            console.log(f"{kind}: {len(rows[kind])} stacks")
    run = {
        "rounds": args.rounds,
        "private_s3": summary(rows["private"]),
        "shared_s3": summary(rows["shared"]),
        "first_shared_s3_stack": {name: round(value, 3) for name, value in (first_shared or {}).items()},
    }
    private, shared = run["private_s3"], run["shared_s3"]
    run["saved_per_stack"] = {name: round(private[name] - shared[name], 3) for name in private}
    console.print_json(data=run)
    RESULTS.write_text(json.dumps(run, indent=2) + "\n")


if __name__ == "__main__":
    main()
