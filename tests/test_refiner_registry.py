"""The refiner registry (versions in the bucket), its channels (stable and canary in Redis)
and the canary rule, against a real redis-server and S3 server, without workers."""

from __future__ import annotations

import json
import random
import shutil
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import redis

from devstack.s3_proxy import S3Proxy
from devstack.stack import LocalStack
from refiner import export
from shared.canary import CanaryRule, Tally
from shared.errors import InvalidInput, RefinerConflict, RefinerUnavailable, UnknownRefiner
from shared.objects import ObjectStore
from shared.refiner_channels import ChannelStore
from shared.refiner_registry import CARD_NAME, CONFIG_NAME, WEIGHTS_NAME, RefinerRegistry, parse_ref

DEMO_REFINER = Path(__file__).parents[1] / "devstack" / "demo_refiner"

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def services(tmp_path_factory) -> Iterator[LocalStack]:
    with LocalStack(tmp_path_factory.mktemp("registry")) as stack:
        yield stack


@pytest.fixture
def registry(services: LocalStack) -> RefinerRegistry:
    return RefinerRegistry(ObjectStore(services.settings))


@pytest.fixture
def channels(services: LocalStack) -> ChannelStore:
    client = redis.Redis(port=services.redis_port)
    client.flushdb()
    return ChannelStore(client)


def copy_refiner(tmp_path: Path, evaluation: dict | None = None) -> Path:
    directory = tmp_path / "demo"
    shutil.copytree(DEMO_REFINER, directory)
    if evaluation is not None:
        card = json.loads((directory / CARD_NAME).read_text())
        (directory / CARD_NAME).write_text(json.dumps({**card, "evaluation": evaluation}))
    return directory


def test_file_names_are_the_exporters():
    assert (CONFIG_NAME, WEIGHTS_NAME, CARD_NAME) == (export.CONFIG_NAME, export.WEIGHTS_NAME, export.CARD_NAME)


def test_publish_is_immutable_and_idempotent(registry, tmp_path):
    directory = copy_refiner(tmp_path, {"detail_ratio": 0.97, "gap_closed": 0.81, "l1_vs_student": 0.36})
    published, created = registry.publish(directory, "immutable")
    assert created and published.evaluated
    # The version is the digest the worker computes for the same weights.
    assert export.load_refiner(directory).version.endswith(f"@{published.version}")
    assert published.metrics == {"detail_ratio": 0.97, "gap_closed": 0.81, "l1_vs_student": 0.36}

    again, created = registry.publish(directory, "immutable")
    assert not created and again == published

    card = json.loads((directory / CARD_NAME).read_text())
    (directory / CARD_NAME).write_text(json.dumps({**card, "note": "other bytes, same weights"}))
    with pytest.raises(RefinerConflict, match="refiner.json differ"):
        registry.publish(directory, "immutable")
    assert [v.ref for v in registry.versions("immutable")] == [published.ref]


def test_a_card_without_evaluation_needs_no_eval(registry, tmp_path):
    directory = copy_refiner(tmp_path)
    with pytest.raises(InvalidInput, match="no evaluation metrics") as refused:
        registry.publish(directory, "uneval")
    assert refused.value.field == "card"
    assert registry.versions("uneval") == []
    published, _ = registry.publish(directory, "uneval", require_eval=False)
    assert not published.evaluated and published.metrics == dict.fromkeys(published.metrics)


def test_download_verifies_every_file(registry, services, tmp_path):
    published, _ = registry.publish(copy_refiner(tmp_path), "verified", require_eval=False)
    local = registry.download("verified", published.version, tmp_path / "cache")
    assert (local / WEIGHTS_NAME).read_bytes() == (DEMO_REFINER / WEIGHTS_NAME).read_bytes()

    key = f"{services.settings.s3_prefix}/refiners/verified/{published.version}/{WEIGHTS_NAME}"
    tampered = bytearray((DEMO_REFINER / WEIGHTS_NAME).read_bytes())
    tampered[-1] ^= 0xFF
    registry.objects.client.put_object(Bucket=services.settings.s3_bucket, Key=key, Body=bytes(tampered))
    with pytest.raises(RefinerUnavailable, match="altered after publishing"):
        registry.download("verified", published.version, tmp_path / "elsewhere")
    with pytest.raises(RefinerUnavailable, match=WEIGHTS_NAME):
        registry.verify("verified", published.version)
    # The verified local copy stays usable; a tampered one is detected on disk too.
    (local / CONFIG_NAME).write_text("{}")
    with pytest.raises(RefinerUnavailable):
        registry.download("verified", published.version, tmp_path / "cache")


def test_workers_sharing_a_cache_download_the_same_version_at_once(registry, tmp_path):
    """Two workers on a node share the model cache and adopt a promotion together: neither may
    remove or replace the copy the other is loading (the rollout test served a stale stable
    when one did)."""
    published, _ = registry.publish(copy_refiner(tmp_path), "shared", require_eval=False)
    for round_ in range(5):
        cache = tmp_path / f"cache{round_}"
        with ThreadPoolExecutor(6) as workers:
            loads = list(
                workers.map(
                    lambda _: export.load_refiner(registry.download("shared", published.version, cache)).version,
                    range(6),
                )
            )
        assert len(loads) == 6 and all(version.endswith(f"@{published.version}") for version in loads)
        assert [p.name for p in (cache / "shared").iterdir()] == [published.version], "no staging left behind"


def test_reads_ride_out_a_short_s3_outage(registry, services, tmp_path, caplog):
    """A worker following the channels downloads each promoted version: an S3 outage shorter
    than ``s3_retry_budget_s`` delays that read instead of failing it (a failed read left the
    worker serving its revision without the canary until the next round). One botocore
    attempt per try, so that only the registry's own retries can carry it through."""
    published, _ = registry.publish(copy_refiner(tmp_path), "blip", require_eval=False)
    proxy = S3Proxy()
    proxy.upstream_port = services.s3_port
    endpoint = {"s3_endpoint_url": f"http://127.0.0.1:{proxy.port}", "s3_max_attempts": 1}
    through_proxy = RefinerRegistry(ObjectStore(services.settings.model_copy(update=endpoint)))
    outage = threading.Thread(target=proxy.outage, args=(2.0,))
    try:
        outage.start()
        assert proxy.down.wait(10)
        local = through_proxy.download("blip", published.version, tmp_path / "cache")
    finally:
        outage.join()
        proxy.close()
    assert (local / WEIGHTS_NAME).read_bytes() == (DEMO_REFINER / WEIGHTS_NAME).read_bytes()
    assert any("failed" in r.getMessage() and "retrying" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize(
    ("prepare", "field", "message"),
    [
        (lambda d: shutil.rmtree(d), "directory", "not a directory"),
        (lambda d: (d / WEIGHTS_NAME).unlink(), "directory", "missing diffusion_pytorch_model.safetensors"),
        (lambda d: (d / CARD_NAME).write_text("{not json"), "card", "is not JSON"),
        (lambda d: (d / CARD_NAME).write_text("[1, 2]"), "card", "not a JSON object"),
    ],
)
def test_what_is_not_a_refiner_is_refused(registry, tmp_path, prepare, field, message):
    directory = copy_refiner(tmp_path)
    prepare(directory)
    with pytest.raises(InvalidInput, match=message) as refused:
        registry.publish(directory, "bad", require_eval=False)
    assert refused.value.field == field


@pytest.mark.parametrize("ref", ["demo", "demo@", "demo@xyz", "Demo@0123456789ab", "@0123456789ab", "a b@0123456789ab"])
def test_malformed_refs_are_refused(ref):
    with pytest.raises(InvalidInput):
        parse_ref(ref)


def test_unknown_versions(registry):
    with pytest.raises(UnknownRefiner):
        registry.get("nothing", "0123456789ab")


def test_promote_canary_and_rollback(channels):
    with pytest.raises(UnknownRefiner):
        channels.get("r")
    with pytest.raises(InvalidInput, match="no stable version"):
        channels.promote("r", "aaaaaaaaaaaa", "test", canary=0.5)
    channels.promote("r", "aaaaaaaaaaaa", "test")
    assert channels.promote("r", "aaaaaaaaaaaa", "test").revision == 1, "promoting stable again changes nothing"
    for fraction in (-0.1, 1.5, float("nan")):
        with pytest.raises(InvalidInput, match="between 0 and 1"):
            channels.promote("r", "bbbbbbbbbbbb", "test", canary=fraction)
    current = channels.promote("r", "bbbbbbbbbbbb", "test", canary=0.25)
    assert (current.stable, current.canary, current.canary_fraction, current.canary_epoch) == (
        "aaaaaaaaaaaa",
        "bbbbbbbbbbbb",
        0.25,
        2,
    )
    ids = [f"job-{i}" for i in range(4000)]
    drawn = [current.draw(job_id) for job_id in ids]
    assert drawn == [current.draw(job_id) for job_id in ids], "the draw is a function of the job id"
    assert drawn.count("bbbbbbbbbbbb") / len(ids) == pytest.approx(0.25, abs=0.03)

    # The system's rollback applies only to the canary it judged.
    assert channels.rollback("r", "system", "worse", canary="cccccccccccc").revision == 2
    current = channels.rollback("r", "system", "worse", canary="bbbbbbbbbbbb")
    assert (current.stable, current.canary, current.canary_fraction) == ("aaaaaaaaaaaa", None, 0.0)
    assert (current.history[-1].action, current.history[-1].channel, current.history[-1].reason) == (
        "rollback",
        "canary",
        "worse",
    )
    assert {current.draw(job_id) for job_id in ids} == {"aaaaaaaaaaaa"}

    # Promoting a canary to stable ends the canary; rolling stable back walks back the promotions.
    channels.promote("r", "cccccccccccc", "test", canary=0.5)
    current = channels.promote("r", "cccccccccccc", "test")
    assert (current.stable, current.canary) == ("cccccccccccc", None)
    channels.promote("r", "dddddddddddd", "test")
    assert channels.rollback("r", "test").stable == "cccccccccccc"
    assert channels.rollback("r", "test").stable == "aaaaaaaaaaaa"
    with pytest.raises(InvalidInput, match="nothing|no canary and no earlier"):
        channels.rollback("r", "test")


def test_tallies_sum_every_workers_marks(channels):
    channels.add_marks("r", 3, [("r@a", 1.2, False), ("r@b", 0.5, True)])
    channels.add_marks("r", 3, [("r@a", 1.0, False)])
    tallies = channels.tallies("r", 3)
    assert tallies["r@a"] == Tally(2, 0, pytest.approx(2.2), pytest.approx(2.44))
    assert tallies["r@b"].flagged_rate == 1.0
    assert channels.tallies("r", 4) == {}


def _stream(rule: CanaryRule, rng: random.Random, canary_mean: float, jobs: int, flag_rate: float) -> bool:
    """Whether the rule, applied after every job of a 50/50 split, ever rolls the canary back."""
    stable, canary = Tally(), Tally()
    for _ in range(jobs):
        if rng.random() < 0.5:
            stable = stable.add(rng.gauss(9.0, 1.5), rng.random() < flag_rate)
        else:
            ratio = rng.gauss(canary_mean, 1.5)
            canary = canary.add(ratio, ratio < 0.9 or rng.random() < flag_rate)
        if rule.verdict(stable, canary):
            return True
    return False


def test_rule_needs_enough_jobs_and_catches_a_blurring_canary():
    rule = CanaryRule()
    blurry = Tally()
    for _ in range(rule.min_jobs - 1):
        blurry = blurry.add(0.5, True)
    good = Tally(rule.min_jobs, 0, 9.0 * rule.min_jobs, 81.0 * rule.min_jobs)
    assert rule.verdict(good, blurry) is None, "too few canary jobs"
    assert "flagged rate" in (rule.verdict(good, blurry.add(0.5, True)) or "")
    rng = random.Random(0)
    assert all(_stream(rule, rng, 0.6, 400, 0.02) for _ in range(20))


def test_rule_leaves_an_equal_canary_alone():
    """200 equal canaries, the rule applied after each of 400 jobs: no rollback. A canary 20%
    less detailed is caught in most such streams, for contrast."""
    rule, rng = CanaryRule(), random.Random(1)
    assert not any(_stream(rule, rng, 9.0, 400, 0.02) for _ in range(200))
    assert sum(_stream(rule, rng, 7.2, 400, 0.02) for _ in range(50)) >= 40
