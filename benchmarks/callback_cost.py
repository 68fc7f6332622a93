"""What one callback delivery costs the callbacks worker in CPU: ``shared.callbacks.deliver``
with its one TLS context for the process, against a TLS context built for each delivery
(what httpx does for every client it makes, and what ``deliver`` did until it kept one).

    python benchmarks/callback_cost.py [--deliveries 300] [--repeats 5]

Each delivery is a signed POST to a receiver on loopback that answers 204 at once, so the
figure is the sender's own work: the SSRF check, signing, the client, the request. CPU is
this process's (user + system, the receiver's threads included, the same in both), per
delivery, the median of ``--repeats`` runs of ``--deliveries``, the two ways alternated in
one run. ``max_per_core_per_s`` is 1000 / cpu_ms: the most deliveries one core of a
callbacks worker can make before anything else it does (reading the record, recording the
attempt). Writes benchmarks/results/callback_cost.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import threading
import time
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from rich.console import Console

from shared import callbacks
from shared.callbacks import deliver

RESULTS = Path(__file__).parent / "results" / "callback_cost.json"
SECRET = "whsec_" + "MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
console = Console()


class Receiver(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("content-length", 0)))
        self.send_response(204)
        self.end_headers()

    def log_message(self, *_: object) -> None:
        pass


def cpu_ms_per_delivery(url: str, deliveries: int, *, context_per_delivery: bool) -> float:
    payload = {"type": "job.succeeded", "data": {"job_id": "0" * 32, "state": "succeeded"}}
    started = time.process_time()
    for n in range(deliveries):
        if context_per_delivery:
            callbacks._tls_context.cache_clear()
        deliver(url, payload, msg_id=f"msg_{n}", secret=SECRET, timeout_s=5, allowlist=["127.0.0.1"])
    return (time.process_time() - started) / deliveries * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--deliveries", type=int, default=300)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()

    server = ThreadingHTTPServer(("127.0.0.1", 0), Receiver)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}/hook"
    ways = {"one_context_per_process": False, "context_per_delivery": True}
    for way in ways.values():  # warm-up: imports, the first context, the first connection
        cpu_ms_per_delivery(url, 10, context_per_delivery=way)
    runs: dict[str, list[float]] = {name: [] for name in ways}
    for _ in range(args.repeats):
        for name, way in ways.items():
            runs[name].append(cpu_ms_per_delivery(url, args.deliveries, context_per_delivery=way))
    server.shutdown()

    result = {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": platform.processor() or platform.machine(),
        "deliveries": args.deliveries,
        "repeats": args.repeats,
        **{
            name: {
                "cpu_ms": round(statistics.median(values), 3),
                "runs_cpu_ms": [round(v, 3) for v in values],
                "max_per_core_per_s": round(1000 / statistics.median(values)),
            }
            for name, values in runs.items()
        },
    }
    result["cpu_ratio"] = round(
        result["context_per_delivery"]["cpu_ms"] / result["one_context_per_process"]["cpu_ms"], 1
    )
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    console.print_json(json.dumps(result))
    console.print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
