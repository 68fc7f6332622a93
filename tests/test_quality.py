"""The per-job quality signal: a detail ratio that tells a refiner that restores detail from
one that blurs, judged against fixed bounds and the refiner's running distribution, and a
broken refiner flagged through a real worker (record, callback, Prometheus)."""

from __future__ import annotations

import io
import json
from pathlib import Path

import httpx
import pytest
import torch
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

from devstack.refiner_doubles import blur, blurring_refiner_network
from devstack.stack import LocalStack, free_port
from producer.client import Client
from refiner.export import Refiner
from refiner.networks import RefinerUNet
from shared.contract import JobState
from shared.settings import Settings
from worker.quality import QualityMonitor


@pytest.fixture(scope="module")
def blurring_refiner_dir(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("blurring-refiner")
    blurring_refiner_network().save_pretrained(path)
    return path


def test_detail_ratio_separates_restored_detail_from_blur(blurring_refiner_dir):
    detailed = torch.rand(4, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    soft = blur(detailed, sigma=1.0)
    # A refiner that restores detail: what it outputs has more detail than what it got.
    restoring = Refiner(RefinerUNet().eval(), "restoring")
    restoring.network.forward = lambda x: x + (detailed - soft)  # the detail soft lost
    _, restored = restoring.refine_and_score(soft)
    blurring = Refiner(RefinerUNet.from_pretrained(blurring_refiner_dir).eval(), "blurring")
    _, blurred = blurring.refine_and_score(detailed)
    identity = Refiner(RefinerUNet().eval(), "identity")
    _, unchanged = identity.refine_and_score(detailed)

    assert (restored > 2).all()
    assert (blurred < 0.3).all()
    assert torch.allclose(unchanged, torch.ones(4))


def test_monitor_flags_bounds_then_outliers_of_the_running_distribution():
    monitor = QualityMonitor(
        Settings(_env_file=None, quality_min_samples=20, quality_window=100, quality_max_detail_ratio=4.0)
    )
    low = monitor.judge("v1", 0.5)
    assert low.flagged and "removed detail" in low.reason
    assert monitor.judge("v1", 5.0).flagged
    # A healthy refiner's scores: nothing flagged while the window fills, nor after.
    healthy = [1.30 + 0.01 * (i % 7) for i in range(40)]
    assert not any(monitor.judge("v2", score).flagged for score in healthy)
    # Within the fixed bounds but far from what this version usually scores: flagged.
    drifted = monitor.judge("v2", 1.05)
    assert drifted.flagged and "robust sigmas" in drifted.reason
    # Another version has its own distribution (still filling): the same score is fine there.
    assert not monitor.judge("v3", 1.05).flagged
    # The identity scores exactly 1 every time: no spread, and no false alarm.
    assert not any(monitor.judge("identity", 1.0).flagged for _ in range(60))


def _flagged_count(metrics_url: str, refiner: str) -> float:
    families = text_string_to_metric_families(httpx.get(metrics_url, timeout=10).text)
    return sum(
        sample.value
        for family in families
        for sample in family.samples
        if sample.name == "refinery_quality_flagged_total" and sample.labels.get("refiner") == refiner
    )


@pytest.mark.integration
def test_a_blurring_refiner_is_flagged_through_a_real_worker(client, tmp_path, blurring_refiner_dir, make_receiver):
    receiver = make_receiver()
    port = free_port()
    source = Image.effect_noise((64, 64), 60).convert("RGB")
    data = io.BytesIO()
    source.save(data, "PNG")
    with LocalStack(tmp_path) as stack:
        stack.start_worker("broken", metrics_port=port, env={"REFINERY_REFINER": str(blurring_refiner_dir)})
        stack.start_worker("callbacks", [stack.settings.queue_callbacks])
        broken = Client(stack.settings)
        refined = broken.submit_refine(image=data.getvalue(), callback_url=receiver.url).wait(60)
        generated = broken.submit_generate("portrait", seed=1, width=64, height=64).wait(60)
        _, _, body = receiver.next()
        flagged = _flagged_count(f"http://127.0.0.1:{port}/metrics", refined.refiner)

    for record in (refined, generated):
        assert record.state is JobState.succeeded  # flagged, still delivered
        assert record.quality.flagged and record.quality.detail_ratio < 0.9
        assert "removed detail" in record.quality.reason
    assert json.loads(body)["data"]["quality"]["flagged"] is True
    assert flagged == 2

    # The session's worker serves the identity refiner: the same input is not flagged.
    healthy = client.submit_refine(image=data.getvalue()).wait(60)
    assert healthy.quality.detail_ratio == pytest.approx(1.0) and not healthy.quality.flagged
