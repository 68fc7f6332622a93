"""Prometheus metrics a worker serves on ``REFINERY_METRICS_PORT`` (``/metrics``).

Everything is recorded from the job record the runner already writes (``timings_ms`` in
milliseconds), so the metrics and ``refinery status`` never disagree. Workers run Celery's
thread pool: one process per worker, so the default in-process registry is right and no
multiprocess mode is needed.

This module never imports torch: a callbacks worker has none. GPU memory is read only when
the worker process already loaded torch and CUDA is available.
"""

from __future__ import annotations

import errno
import sys
import threading
from typing import Any

from prometheus_client import Counter, Gauge, Histogram, Info, start_http_server

from shared.contract import KINDS, JobRecord
from shared.errors import InvalidInput

# Queue wait spans milliseconds (idle pool) to the visibility timeout (a deep backlog).
_WAIT_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800, 3600)
# Stages: an encode takes milliseconds, a 28-step flux-dev generate tens of seconds.
_STAGE_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 40, 80, 160, 320)
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64)

JOBS = Counter("refinery_jobs", "Jobs that reached a terminal state.", ["kind", "state"])
QUEUE_WAIT = Histogram(
    "refinery_queue_wait_seconds", "Time from submit to a worker starting the job.", ["kind"], buckets=_WAIT_BUCKETS
)
STAGE_SECONDS = Histogram(
    "refinery_stage_seconds", "Time spent in one stage of a job.", ["kind", "stage"], buckets=_STAGE_BUCKETS
)
JOB_SECONDS = Histogram(
    "refinery_job_seconds",
    "Time a worker spent on a job, all stages (timings_ms.total).",
    ["kind"],
    buckets=_STAGE_BUCKETS,
)
ON_MODEL = Gauge("refinery_jobs_on_model", "Jobs in the batch the model is running now (0: idle).")
BATCH_SIZE = Histogram("refinery_batch_size", "Jobs run together in one model call.", ["kind"], buckets=_BATCH_BUCKETS)
MODEL_LOAD = Gauge("refinery_model_load_seconds", "Seconds it took to load a resident model.", ["model"])
GPU_MEMORY = Gauge("refinery_gpu_memory_bytes", "CUDA memory held by this worker's process.", ["kind"])
DETAIL_RATIO = Histogram(
    "refinery_detail_ratio",
    "Refined image's high-frequency energy over its input's, per refiner version.",
    ["refiner"],
    buckets=(0.25, 0.5, 0.75, 0.9, 1.0, 1.1, 1.25, 1.5, 2, 3, 4, 8),
)
QUALITY_FLAGGED = Counter("refinery_quality_flagged", "Refined jobs whose detail ratio looked wrong.", ["refiner"])
REFINER_RESIDENT = Gauge("refinery_refiner_resident", "1 for each refiner version loaded in this worker.", ["refiner"])
REFINER_FAILURES = Counter(
    "refinery_refiner_failures", "Refiner versions this worker refused to serve (digest, load).", ["refiner"]
)
REFINER_ROLLBACKS = Counter("refinery_refiner_rollbacks", "Canaries this worker rolled back by the rule.", ["name"])
WORKER = Info("refinery_worker", "What this worker serves.")

_server_lock = threading.Lock()
_server: Any = None


def start_metrics_server(port: int, span: int = 1, host: str = "0.0.0.0") -> int | None:
    """Serve ``/metrics`` from a daemon thread on the first free port of ``port .. port +
    span - 1``, and return it; port 0 disables it (None). A second call returns the first's.

    Raises ``InvalidInput`` when every port of the span is taken."""
    global _server
    if not port:
        return None
    with _server_lock:
        if _server is None:
            for candidate in range(port, min(port + span, 65536)):
                try:
                    _server = start_http_server(candidate, addr=host)
                    break
                except OSError as exc:
                    if exc.errno != errno.EADDRINUSE:
                        raise
            else:
                raise InvalidInput(f"ports {port}..{port + span - 1} are all in use", field="metrics_port")
        server, _ = _server
        return server.server_port


def stop_metrics_server() -> None:
    """Stop the HTTP server started by ``start_metrics_server`` (tests; workers just exit)."""
    global _server
    with _server_lock:
        if _server is not None:
            server, thread = _server
            server.shutdown()
            server.server_close()
            thread.join(5)
            _server = None


def observe_job(record: JobRecord) -> None:
    """Record one finished job: its terminal state, queue wait, stage timings and batch size.

    Call it once, after the record's final write; records that are not terminal are ignored
    so a job is never counted twice.
    """
    if not record.state.terminal:
        return
    kind = record.kind
    timings = record.timings_ms
    JOBS.labels(kind=kind, state=record.state.value).inc()
    if "queue_wait" in timings:
        # Clocks of producer and worker can disagree by a little; a negative wait is skew.
        QUEUE_WAIT.labels(kind=kind).observe(max(timings["queue_wait"], 0.0) / 1000)
    for stage in KINDS[kind].stages:  # the kind's own (timings_ms also has queue_wait, total, ...)
        if stage in timings:
            STAGE_SECONDS.labels(kind=kind, stage=stage).observe(timings[stage] / 1000)
    if "total" in timings:
        JOB_SECONDS.labels(kind=kind).observe(timings["total"] / 1000)
    BATCH_SIZE.labels(kind=kind).observe(record.batch_size or 1)
    if record.quality is not None and record.refiner is not None:
        DETAIL_RATIO.labels(refiner=record.refiner).observe(record.quality.detail_ratio)
        if record.quality.flagged:
            QUALITY_FLAGGED.labels(refiner=record.refiner).inc()
    update_gpu_memory()


def set_worker_info(info: dict[str, Any]) -> None:
    """Publish ``ModelRegistry.describe()``: preset, device, dtype, refiner, load_seconds and,
    on CUDA, ``gpu_memory_{allocated,reserved}_bytes``.

    A callbacks worker passes ``{"role": "callbacks"}``; labels it lacks are left empty.
    """
    WORKER.info({key: str(info.get(key, "")) for key in ("preset", "device", "dtype", "refiner")})
    for model, seconds in (info.get("load_seconds") or {}).items():
        MODEL_LOAD.labels(model=model).set(seconds)
    for kind in ("allocated", "reserved"):
        if (nbytes := info.get(f"gpu_memory_{kind}_bytes")) is not None:
            GPU_MEMORY.labels(kind=kind).set(nbytes)
    update_gpu_memory()


def update_gpu_memory() -> None:
    """Refresh the GPU memory gauges from torch, when this process runs on CUDA.

    Without CUDA the gauges keep no samples at all, rather than a misleading zero.
    """
    torch = sys.modules.get("torch")  # never import it here: callbacks workers have none
    if torch is None or not torch.cuda.is_available() or not torch.cuda.is_initialized():
        return
    GPU_MEMORY.labels(kind="allocated").set(torch.cuda.memory_allocated())
    GPU_MEMORY.labels(kind="reserved").set(torch.cuda.memory_reserved())
