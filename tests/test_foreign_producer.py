"""A producer in another language: the Redis writes docs/deploy.md documents, made by hand.

The record and message are taken from the documentation itself (so it cannot drift), pushed
with plain redis-py onto a private redis-server, and consumed by kombu and by a real Celery
worker process running the project's own broker configuration.
"""

from __future__ import annotations

import base64
import json
import os
import re
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from devstack.stack import free_port, wait_until
from shared import keys
from shared.broker import PRIORITY_STEPS, make_celery, queue_lists
from shared.contract import JobState, Priority
from shared.records import RecordStore
from shared.settings import Settings

ROOT = Path(__file__).resolve().parent.parent
DOC = (ROOT / "docs" / "deploy.md").read_text()
EMBED = {"callbacks": None, "errbacks": None, "chain": None, "chord": None}


def documented(name: str) -> dict:
    """The JSON block that follows ``<!-- foreign-producer:NAME -->`` in docs/deploy.md."""
    match = re.search(rf"<!-- foreign-producer:{name} -->\s*```json\n(.*?)```", DOC, re.DOTALL)
    assert match, f"docs/deploy.md lost its {name} example"
    return json.loads(match[1])


DOC_RECORD = documented("record")
DOC_MESSAGE = documented("message")


def list_name(queue: str, step: int) -> str:
    """As the documentation says: the queue for step 0, else queue + 0x06 0x16 + step."""
    return queue if step == 0 else f"{queue}\x06\x16{step}"


def foreign_message(task: str, job_id: str, queue: str, step: int) -> dict:
    """A message for another job, built from the documented one and its table of what varies."""
    message = json.loads(json.dumps(DOC_MESSAGE))
    body = json.dumps([[job_id], {}, EMBED]).encode()
    message["body"] = base64.b64encode(body).decode()
    headers, properties = message["headers"], message["properties"]
    headers.update(task=task, id=job_id, root_id=job_id, argsrepr=repr([job_id]), origin="foreign-test@ci")
    properties.update(correlation_id=job_id, priority=step, delivery_tag=str(uuid.uuid4()))
    properties["delivery_info"]["routing_key"] = queue
    return message


def foreign_record(kind: str, job_id: str, priority: str) -> dict:
    record = json.loads(json.dumps(DOC_RECORD))
    record["job_id"] = job_id
    record["spec"]["priority"] = priority
    if kind == "refine_only":
        record["kind"] = "refine_only"
        record["spec"] = {
            "kind": "refine_only",
            "input_uri": "s3://face-refinery/uploads/face.png",
            "priority": priority,
        }
        record["seed"] = None
    return record


@pytest.fixture
def redis_url(tmp_path: Path) -> Iterator[str]:
    port = free_port()
    log = tmp_path / "redis.log"
    with open(log, "wb") as out:
        process = subprocess.Popen(
            [
                "redis-server",
                "--port",
                str(port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                str(tmp_path),
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        wait_until(redis.Redis(port=port).ping, timeout_s=10, what="redis-server", process=process, log=log)
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        process.terminate()
        process.wait(10)


def settings_for(url: str) -> Settings:
    return Settings(_env_file=None, redis_url=url)


def test_documented_rules_match_the_broker() -> None:
    # List names and priority steps as documented, against the broker configuration.
    for priority in Priority:
        assert list_name("generate", priority.rank) == queue_lists("generate")[PRIORITY_STEPS.index(priority.rank)]
    assert {"high": 0, "normal": 3, "low": 6} == {p.value: p.rank for p in Priority}
    # The documented body is the base64 of the documented arguments.
    job_id = DOC_RECORD["job_id"]
    assert json.loads(base64.b64decode(DOC_MESSAGE["body"])) == [[job_id], {}, EMBED]
    assert DOC_MESSAGE["headers"]["task"] == "refinery.generate_and_refine"
    assert DOC_MESSAGE["properties"]["priority"] == Priority(DOC_RECORD["spec"]["priority"]).rank


def test_documented_message_has_the_shape_celery_sends(redis_url: str) -> None:
    """Celery's own message, captured from Redis, has the same fields (catches upgrades)."""
    app = make_celery(settings_for(redis_url))
    app.send_task("refinery.generate_and_refine", args=["abc"], task_id="abc", queue="generate", priority=3)
    (raw,) = redis.Redis.from_url(redis_url).lrange(list_name("generate", 3), 0, -1)
    sent = json.loads(raw)
    assert json.loads(base64.b64decode(sent["body"])) == [["abc"], {}, EMBED]
    assert sent.keys() == DOC_MESSAGE.keys()
    assert sent["headers"].keys() == DOC_MESSAGE["headers"].keys()
    assert sent["properties"].keys() - {"reply_to"} == DOC_MESSAGE["properties"].keys()
    varying = {"id", "root_id", "argsrepr", "origin", "task"}
    for name, value in DOC_MESSAGE["headers"].items():
        if name not in varying:
            assert sent["headers"][name] == value, name
    for name in ("content-type", "content-encoding"):
        assert sent[name] == DOC_MESSAGE[name]
    for name in ("delivery_mode", "delivery_info", "body_encoding", "priority"):
        assert sent["properties"][name] == DOC_MESSAGE["properties"][name], name


def test_kombu_decodes_the_documented_example(redis_url: str) -> None:
    client = redis.Redis.from_url(redis_url)
    job_id = DOC_RECORD["job_id"]
    client.set(keys.job_key(job_id), json.dumps(DOC_RECORD), ex=604800)
    client.lpush(list_name("generate", 3), json.dumps(DOC_MESSAGE))

    # The record is one the producer's and worker's store reads.
    record = RecordStore(client, 604800).get(job_id)
    assert record.state is JobState.queued and record.seed == 7 and record.created_at.tzinfo is not None

    app = make_celery(settings_for(redis_url))
    with app.connection_for_read() as connection:
        queue = connection.SimpleQueue("generate")
        message = queue.get(timeout=5)
        assert message.headers["task"] == "refinery.generate_and_refine"
        assert message.headers["id"] == job_id
        assert message.content_type == "application/json"
        assert message.decode() == [[job_id], {}, EMBED]
        assert message.delivery_info["routing_key"] == "generate"
        message.ack()
        queue.close()


WORKER_APP = '''
"""A Celery worker with the project's broker configuration and stand-ins for the model tasks."""
import json, os
import redis
from shared import keys
from shared.broker import make_celery
from shared.settings import Settings
from shared.records import RecordStore

settings = Settings(_env_file=None, redis_url=os.environ["FOREIGN_REDIS_URL"])
app = make_celery(settings)
client = redis.Redis.from_url(settings.redis_url)

def _seen(task, job_id):
    record = RecordStore(client, settings.job_ttl_s).get(job_id)  # the record must parse
    info = task.request.delivery_info or {}
    client.rpush("seen", json.dumps({"task": task.name, "job_id": job_id, "kind": record.kind, "queue": info.get("routing_key")}))

@app.task(name="refinery.generate_and_refine", bind=True)
def generate_and_refine(self, job_id):
    _seen(self, job_id)

@app.task(name="refinery.refine_only", bind=True)
def refine_only(self, job_id):
    _seen(self, job_id)
'''


@pytest.mark.integration
def test_a_celery_worker_runs_hand_built_messages_in_priority_order(redis_url: str, tmp_path: Path) -> None:
    client = redis.Redis.from_url(redis_url)
    jobs = [  # pushed low first: the worker must still serve high, then normal, then low
        ("generate_and_refine", "refinery.generate_and_refine", "generate", Priority.low),
        ("generate_and_refine", "refinery.generate_and_refine", "generate", Priority.normal),
        ("generate_and_refine", "refinery.generate_and_refine", "generate", Priority.high),
        ("refine_only", "refinery.refine_only", "refine", Priority.normal),
    ]
    ids = {}
    for kind, task, queue, priority in jobs:
        job_id = uuid.uuid4().hex
        ids[(queue, priority)] = job_id
        client.set(keys.job_key(job_id), json.dumps(foreign_record(kind, job_id, priority.value)), ex=604800)
        client.lpush(list_name(queue, priority.rank), json.dumps(foreign_message(task, job_id, queue, priority.rank)))

    (tmp_path / "foreign_app.py").write_text(WORKER_APP)
    log = tmp_path / "worker.log"
    env = {**os.environ, "PYTHONPATH": f"{ROOT}:{tmp_path}", "FOREIGN_REDIS_URL": redis_url}
    argv = [sys.executable, "-m", "celery", "-A", "foreign_app", "worker", "--pool=solo", "--queues=generate"]
    argv += [
        "--hostname=foreign@test",
        "--without-mingle",
        "--without-gossip",
        "--without-heartbeat",
        "--loglevel=INFO",
    ]
    with open(log, "wb") as out:
        worker = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=tmp_path)
    try:
        wait_until(lambda: client.llen("seen") == 3, timeout_s=60, what="generate jobs run", process=worker, log=log)
        seen = [json.loads(item) for item in client.lrange("seen", 0, -1)]
        assert [s["job_id"] for s in seen] == [
            ids[("generate", p)] for p in (Priority.high, Priority.normal, Priority.low)
        ]
        assert all(
            s["task"] == "refinery.generate_and_refine"
            and s["kind"] == "generate_and_refine"
            and s["queue"] == "generate"
            for s in seen
        )
        # The worker consumed only "generate": the refine job still waits on its own list.
        assert client.llen(list_name("refine", Priority.normal.rank)) == 1
    finally:
        worker.terminate()
        worker.wait(20)

    # A refine worker takes the refine-only job.
    argv[argv.index("--queues=generate")] = "--queues=refine"
    with open(log, "ab") as out:
        worker = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=tmp_path)
    try:
        wait_until(lambda: client.llen("seen") == 4, timeout_s=60, what="refine job run", process=worker, log=log)
        last = json.loads(client.lindex("seen", -1))
        assert last == {
            "task": "refinery.refine_only",
            "job_id": ids[("refine", Priority.normal)],
            "kind": "refine_only",
            "queue": "refine",
        }
    finally:
        worker.terminate()
        worker.wait(20)
