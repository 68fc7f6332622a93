"""`refinery doctor` and `refinery status` against one real stack (redis-server with AOF,
as compose runs it; moto's S3 server; a model worker and a callbacks worker), broken one
way at a time and repaired. The tests run in file order: the last ones take workers and
Redis away for good."""

from __future__ import annotations

import json
import re
import signal
import uuid
from collections.abc import Iterator
from datetime import datetime, timedelta
from pathlib import Path

import pytest
import redis

from devstack.stack import LocalStack
from producer.client import Client
from shared.broker import callback_push
from shared.contract import GenerateSpec, JobRecord, JobState, utcnow

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalStack]:
    with LocalStack(tmp_path_factory.mktemp("doctor"), redis_aof=True, private_s3=True) as local:
        local.start_worker("model")
        local.start_worker("callbacks", [local.settings.queue_callbacks])
        yield local


@pytest.fixture(scope="module")
def broker(stack: LocalStack) -> redis.Redis:
    return redis.Redis(port=stack.redis_port)


def doctor(stack: LocalStack, *args: str, **env: str) -> tuple[int, dict[str, tuple[str, str]]]:
    """Exit status, and check name -> (status, detail); ``env``: settings for this run."""
    run = stack.refinery("doctor", "--json", *args, timeout_s=120, env=env)
    assert "Traceback" not in run.stderr, run.stderr
    report = json.loads(run.stdout)
    checks = {check["name"]: (check["status"], check["detail"]) for check in report["checks"]}
    assert report["status"] == ("fail" if run.returncode else report["status"])
    return run.returncode, checks


def failing(checks: dict[str, tuple[str, str]]) -> set[str]:
    return {name for name, (status, _) in checks.items() if status == "fail"}


def test_a_healthy_stack_passes(stack: LocalStack) -> None:
    code, checks = doctor(stack)
    assert code == 0, checks
    assert failing(checks) == set()
    assert checks["redis"] == ("ok", f"reachable at redis://127.0.0.1:{stack.redis_port}/0")
    assert checks["redis persistence"] == ("ok", "AOF on")
    assert checks["redis eviction"][0] == "ok"
    assert checks["clock skew"][0] == "ok"
    assert checks["s3 bucket"][0] == "ok"
    assert checks["s3 retention"] == (
        "ok",
        f"s3://{stack.settings.s3_bucket}/refinery/jobs/: objects expire after 7 days",
    )
    status, detail = checks["worker model@localstack"]
    assert status == "ok"
    assert "preset tiny-schnell" in detail and "refiner identity" in detail and "device cpu" in detail
    assert "weights cached at " + str(stack.settings.model_cache_dir) in detail
    assert checks["worker callbacks@localstack"][0] == "ok"
    for queue in ("generate", "refine", "callbacks"):
        assert checks[f"queue {queue}"] == ("ok", "0 waiting (limit 10000)")
    assert checks["queue pairs"] == ("ok", "0 waiting (limit 10000); no worker, none required")
    # The probe object is gone again.
    listed = Client(stack.settings).storage.client.list_objects_v2(
        Bucket=stack.settings.s3_bucket, Prefix="refinery/doctor/"
    )
    assert listed.get("KeyCount", 0) == 0
    # The table, for people: exit 0 too.
    table = stack.refinery("doctor")
    assert table.returncode == 0 and "refinery doctor" in table.stdout and "s3 bucket" in table.stdout


@pytest.mark.parametrize(
    ("setting", "broken", "repaired", "check", "why"),
    [
        ("maxmemory-policy", "allkeys-lru", "noeviction", "redis eviction", "deletes keys, queued job messages"),
        ("appendonly", "no", "yes", "redis persistence", "a restart loses every queued job"),
    ],
    ids=["evicting", "not-persistent"],
)
def test_a_misconfigured_redis_fails(
    stack: LocalStack, broker: redis.Redis, setting: str, broken: str, repaired: str, check: str, why: str
) -> None:
    broker.config_set(setting, broken)
    try:
        code, checks = doctor(stack)
    finally:
        broker.config_set(setting, repaired)
    assert code == 2
    assert failing(checks) == {check}
    assert why in checks[check][1]


def test_a_missing_or_different_retention_rule_warns_with_the_command_that_fixes_it(stack: LocalStack) -> None:
    storage = Client(stack.settings).storage
    storage.client.delete_bucket_lifecycle(Bucket=stack.settings.s3_bucket)
    code, missing = doctor(stack)
    applied = stack.refinery("retention", "--apply", "--json")
    _, fixed = doctor(stack)
    _, other = doctor(stack, REFINERY_RETENTION_DAYS="30")  # the bucket's 7 days against 30

    assert code == 0 and missing["s3 retention"][0] == "warn", "a warning: results kept longer, nothing lost"
    assert "no retention rule" in missing["s3 retention"][1]
    assert "refinery retention --apply" in missing["s3 retention"][1]
    assert applied.returncode == 0 and json.loads(applied.stdout)["ok"], applied.stderr
    assert fixed["s3 retention"][0] == "ok"
    assert other["s3 retention"][0] == "warn" and "a rule other than the settings'" in other["s3 retention"][1]


def test_s3_down_fails(stack: LocalStack) -> None:
    stack.stop_process("s3")
    try:
        code, checks = doctor(stack)
    finally:
        stack.start_s3()
    assert code == 2
    assert failing(checks) == {"s3 bucket"}
    assert "write failed" in checks["s3 bucket"][1]
    assert doctor(stack)[0] == 0


def _waited(pattern: str, text: str) -> int:
    found = re.search(pattern, text)
    assert found, text
    return int(found[1])


def _since(moment: datetime) -> float:
    """Seconds since ``moment``: the most a wait reported after it can be (a loaded machine
    takes longer to start the CLI, so no fixed bound)."""
    return (utcnow() - moment).total_seconds() + 1


def test_callbacks_waiting_with_no_consumer_fail(stack: LocalStack) -> None:
    client = Client(stack.settings)
    stack.stop_process("callbacks")  # a graceful stop: it deregisters
    # A job that succeeded two minutes ago, its callback still queued: what a lone model
    # worker leaves behind.
    spec = GenerateSpec(prompt="a portrait", callback_url="http://127.0.0.1:9/hook")
    finished = utcnow() - timedelta(seconds=120)
    record = JobRecord(
        job_id=uuid.uuid4().hex,
        kind="generate_and_refine",
        spec=spec,
        state=JobState.succeeded,
        created_at=finished - timedelta(seconds=5),
        finished_at=finished,
    )
    client.store.create(record)
    callback = callback_push(client.celery, record.job_id, JobState.succeeded.value, client.settings)
    client.store.redis.lpush(callback.list, callback.message)

    code, checks = doctor(stack, "--queues", "generate,refine")
    assert code == 2
    assert failing(checks) == {"callbacks", "queue callbacks"}
    detail = checks["callbacks"][1]
    assert detail.startswith("1 waiting; no live callbacks worker; terminal ones waiting over 60 s: 1 ")
    assert 120 <= _waited(rf"oldest: job {record.job_id}, succeeded, (\d+) s", detail) <= _since(finished)

    # Within the alarm's limit the wait is not stale yet; the unserved queue still fails.
    code, checks = doctor(stack, "--queues", "generate,refine", REFINERY_CALLBACK_WAIT_ALARM_S="600")
    assert failing(checks) == {"queue callbacks"}
    assert checks["callbacks"] == ("ok", "1 waiting; no live callbacks worker")

    run = stack.refinery("status", record.job_id)
    assert run.returncode == 0
    assert re.fullmatch(r"warning: callback succeeded waiting \d+ s: no live callbacks worker .*\n", run.stderr)
    assert 120 <= _waited(r"waiting (\d+) s", run.stderr) <= _since(finished)
    overview = stack.refinery("status", "--json")
    assert overview.returncode == 0
    rows = {check["name"]: check["status"] for check in json.loads(overview.stdout)["checks"]}
    assert rows["callbacks"] == "fail" and rows["worker model@localstack"] == "ok"


def test_a_killed_worker_leaves_its_queues_unserved(stack: LocalStack) -> None:
    stack.stop_process("model", signal.SIGKILL)  # no shutdown: its record stays behind
    code, checks = doctor(stack)
    assert code == 2
    assert {"queue generate", "queue refine"} <= failing(checks)
    assert checks["worker model@localstack"][0] == "warn"
    assert "no answer to ping" in checks["worker model@localstack"][1]
    assert "no live worker consumes it" in checks["queue generate"][1]


def test_redis_down_is_one_failed_check(stack: LocalStack, tmp_path: Path) -> None:
    stack.stop_process("redis")
    code, checks = doctor(stack)
    assert code == 2
    assert checks["redis"][0] == "fail" and "unreachable" in checks["redis"][1]
    assert checks["s3 bucket"][0] == "ok"
    run = stack.refinery("status", "some-job")
    assert run.returncode == 2 and "Traceback" not in run.stderr
    assert run.stderr.startswith("error [broker_unavailable]") and len(run.stderr.strip().splitlines()) == 1
