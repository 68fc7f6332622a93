"""worker.metrics: job records in, Prometheus samples out (and over HTTP)."""

from __future__ import annotations

import httpx
import pytest
from prometheus_client import REGISTRY
from prometheus_client.parser import text_string_to_metric_families

from devstack.stack import free_port
from shared.contract import GenerateSpec, JobRecord, JobState, RefineSpec
from worker import metrics


def record(state: JobState, timings_ms: dict[str, float], *, refine: bool = False) -> JobRecord:
    if refine:
        return JobRecord(
            job_id="r1",
            kind="refine_only",
            spec=RefineSpec(input_uri="s3://bucket/in.png"),
            state=state,
            timings_ms=timings_ms,
        )
    return JobRecord(
        job_id="g1", kind="generate_and_refine", spec=GenerateSpec(prompt="x"), state=state, timings_ms=timings_ms
    )


def sample(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


GENERATE_TIMINGS = {
    "queue_wait": 1500.0,
    "generate": 800.0,
    "refine": 20.0,
    "encode": 30.0,
    "upload": 50.0,
    "total": 900.0,
}


def test_observe_job_counts_terminal_jobs_and_records_stage_timings() -> None:
    kind = {"kind": "generate_and_refine"}
    before = {
        "ok": sample("refinery_jobs_total", state="succeeded", **kind),
        "failed": sample("refinery_jobs_total", state="failed", **kind),
        "wait_count": sample("refinery_queue_wait_seconds_count", **kind),
        "wait_sum": sample("refinery_queue_wait_seconds_sum", **kind),
        "generate_sum": sample("refinery_stage_seconds_sum", stage="generate", **kind),
        "upload_count": sample("refinery_stage_seconds_count", stage="upload", **kind),
        "total_sum": sample("refinery_job_seconds_sum", **kind),
        "batch_sum": sample("refinery_batch_size_sum", **kind),
    }

    metrics.observe_job(record(JobState.succeeded, GENERATE_TIMINGS))
    # The batch size the record carries (the runner writes it); 1 when it has none.
    metrics.observe_job(record(JobState.succeeded, GENERATE_TIMINGS).model_copy(update={"batch_size": 4}))
    metrics.observe_job(record(JobState.succeeded, GENERATE_TIMINGS).model_copy(update={"batch_size": 3}))
    # A job that failed in generate has no upload timing; only what ran is recorded.
    metrics.observe_job(record(JobState.failed, {"queue_wait": 500.0, "generate": 100.0, "total": 100.0}))
    # Not terminal: ignored, so a job is never counted twice.
    metrics.observe_job(record(JobState.running, {"queue_wait": 99999.0}))

    def delta(name: str, **labels: str) -> float:
        return sample(name, **labels, **kind)

    assert delta("refinery_jobs_total", state="succeeded") - before["ok"] == 3
    assert delta("refinery_jobs_total", state="failed") - before["failed"] == 1
    assert delta("refinery_queue_wait_seconds_count") - before["wait_count"] == 4
    assert delta("refinery_queue_wait_seconds_sum") - before["wait_sum"] == pytest.approx(5.0)
    assert delta("refinery_stage_seconds_sum", stage="generate") - before["generate_sum"] == pytest.approx(2.5)
    assert delta("refinery_stage_seconds_count", stage="upload") - before["upload_count"] == 3
    assert delta("refinery_job_seconds_sum") - before["total_sum"] == pytest.approx(2.8)
    assert delta("refinery_batch_size_sum") - before["batch_sum"] == 1 + 4 + 3 + 1
    # Milliseconds became seconds in the right bucket: 0.8 s fits le=1 but not le=0.5.
    assert sample("refinery_stage_seconds_bucket", stage="generate", le="1.0", **kind) >= 3


def test_refine_only_jobs_are_labelled_by_their_own_kind() -> None:
    labels = {"kind": "refine_only", "state": "succeeded"}
    before = sample("refinery_jobs_total", **labels)
    metrics.observe_job(
        record(JobState.succeeded, {"queue_wait": 10.0, "load_input": 40.0, "refine": 5.0}, refine=True)
    )
    assert sample("refinery_jobs_total", **labels) - before == 1
    assert sample("refinery_stage_seconds_count", kind="refine_only", stage="load_input") >= 1


def test_worker_info_model_load_and_gpu_memory(monkeypatch: pytest.MonkeyPatch) -> None:
    # The numbers given, not this process's own CUDA memory (should it have any).
    monkeypatch.setattr(metrics, "update_gpu_memory", lambda: None)
    metrics.set_worker_info(
        {
            "preset": "tiny-schnell",
            "device": "cuda",
            "dtype": "bfloat16",
            "refiner": "identity",
            "load_seconds": {"tiny-schnell": 2.5},
            "batch_invariant": True,
            "gpu_memory_allocated_bytes": 3 * 2**20,
            "gpu_memory_reserved_bytes": 4 * 2**20,
        }
    )
    info = {"preset": "tiny-schnell", "device": "cuda", "dtype": "bfloat16", "refiner": "identity"}
    assert REGISTRY.get_sample_value("refinery_worker_info", info) == 1
    assert REGISTRY.get_sample_value("refinery_model_load_seconds", {"model": "tiny-schnell"}) == 2.5
    assert REGISTRY.get_sample_value("refinery_gpu_memory_bytes", {"kind": "allocated"}) == 3 * 2**20
    assert REGISTRY.get_sample_value("refinery_gpu_memory_bytes", {"kind": "reserved"}) == 4 * 2**20


def test_metrics_server_serves_the_samples_over_http() -> None:
    metrics.start_metrics_server(0)  # disabled: must not bind anything
    port = free_port()
    metrics.start_metrics_server(port, host="127.0.0.1")
    try:
        metrics.observe_job(record(JobState.succeeded, GENERATE_TIMINGS))
        response = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10)
        assert response.status_code == 200
        served = {
            (s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(response.text)
            for s in family.samples
        }
        key = ("refinery_jobs_total", (("kind", "generate_and_refine"), ("state", "succeeded")))
        assert served[key] == sample("refinery_jobs_total", kind="generate_and_refine", state="succeeded") >= 1
        assert ("refinery_stage_seconds_count", (("kind", "generate_and_refine"), ("stage", "generate"))) in served
        assert any(name == "refinery_queue_wait_seconds_bucket" for name, _ in served)
    finally:
        metrics.stop_metrics_server()
