"""The walking skeleton end to end: producer -> Redis -> worker process -> S3 -> record.

Everything here talks to the session's real stack (tests/conftest.py): redis-server and
moto's S3 server on loopback ports, ``refinery worker`` subprocesses.
"""

from __future__ import annotations

import io
import json
import uuid

import httpx
import pytest
import standardwebhooks
from PIL import Image
from standardwebhooks.webhooks import WebhookVerificationError

from devstack.stack import wait_until
from shared import keys
from shared.archive import RECORD_NAME, RecordArchive
from shared.broker import callback_push, job_push
from shared.contract import CallbackStatus, GenerateSpec, JobRecord, JobState, utcnow
from shared.errors import CallbackRefused, InputNotFound, InvalidInput
from shared.images import TRAINED_ALGORITHMIC_MEDIA, read_provenance

pytestmark = pytest.mark.integration

SIZE = 64


def _pixels(data: bytes) -> bytes:
    return Image.open(io.BytesIO(data)).convert("RGB").tobytes()


def test_generate_lands_in_s3_with_provenance(client):
    record = client.submit_generate(
        "portrait of a woman with freckles", seed=11, width=96, height=64, keep_raw=True
    ).wait(60)

    assert record.state is JobState.succeeded, record.error
    assert record.attempts == 1
    assert record.generator == "tiny-schnell" and record.refiner == "identity"
    assert record.result.uri.endswith(f"/jobs/{record.job_id}/refined.png")
    data = client.storage.get(record.result.uri)
    image = Image.open(io.BytesIO(data))
    assert image.format == "PNG" and image.size == (96, 64)
    provenance = read_provenance(data)
    assert provenance["job_id"] == record.job_id
    assert provenance["seed"] == "11"
    assert provenance["digital_source_type"] == TRAINED_ALGORITHMIC_MEDIA
    # The presigned URL serves the same object without credentials.
    assert httpx.get(record.result.url).content == data
    assert record.result.raw_uri.endswith("/raw.png")


def test_same_seed_same_image_and_seed_recorded_when_absent(client):
    first = client.submit_generate("portrait of an old man", seed=5, width=SIZE, height=SIZE).wait(60)
    second = client.submit_generate("portrait of an old man", seed=5, width=SIZE, height=SIZE).wait(60)
    other = client.submit_generate("portrait of an old man", seed=6, width=SIZE, height=SIZE).wait(60)
    drawn = client.submit_generate("portrait of an old man", width=SIZE, height=SIZE).wait(60)

    images = [_pixels(client.storage.get(r.result.uri)) for r in (first, second, other)]
    assert images[0] == images[1]
    assert images[0] != images[2]
    assert drawn.state is JobState.succeeded and drawn.seed is not None and drawn.spec.seed is None


def test_output_formats(client):
    for fmt, pil_name in (("webp", "WEBP"), ("jpeg", "JPEG")):
        record = client.submit_generate("portrait", seed=1, width=SIZE, height=SIZE, output_format=fmt).wait(60)
        data = client.storage.get(record.result.uri)
        assert Image.open(io.BytesIO(data)).format == pil_name
        assert read_provenance(data)["job_id"] == record.job_id


def test_refine_only_from_s3_object(client):
    source = Image.new("RGB", (80, 48), (120, 90, 60))
    buffer = io.BytesIO()
    source.save(buffer, "PNG")
    uri = f"s3://{client.settings.s3_bucket}/uploads/face.png"
    client.storage.put(uri, buffer.getvalue(), "image/png")

    record = client.submit_refine(input_uri=uri).wait(60)

    assert record.state is JobState.succeeded, record.error
    refined = client.storage.get(record.result.uri)
    # The untrained refiner is the identity: the same pixels come back.
    assert _pixels(refined) == source.tobytes()
    assert (record.result.width, record.result.height) == (80, 48)
    assert "load_input" in record.timings_ms and "generate" not in record.timings_ms


def test_an_uploaded_input_is_deleted_once_its_job_ends_unless_kept(client):
    png = io.BytesIO()
    Image.new("RGB", (64, 64), (10, 200, 30)).save(png, "PNG")
    callers = f"s3://{client.settings.s3_bucket}/uploads/keep-me.png"
    client.storage.put(callers, png.getvalue(), "image/png")

    from_bucket = client.submit_refine(input_uri=callers).wait(60)
    kept = client.submit_refine(image=png.getvalue(), keep_input=True).wait(60)
    uploaded = client.submit_refine(image=png.getvalue()).wait(60)
    assert {r.state for r in (from_bucket, kept, uploaded)} == {JobState.succeeded}

    def exists(uri: str) -> bool:
        try:
            client.storage.get(uri)
        except InputNotFound:
            return False
        return True

    # Deleted once the record is terminal (a redelivery before that still finds it).
    wait_until(lambda: not exists(uploaded.spec.input_uri), timeout_s=30, what="the upload deleted")
    assert exists(uploaded.result.uri), "the result stays: the bucket's retention expires it"
    # The two earlier jobs ended before the last was submitted: theirs are still there.
    assert exists(kept.spec.input_uri) and exists(callers)


def test_refine_only_from_file_through_cli(stack, client, tmp_path):
    path = tmp_path / "face.jpg"
    Image.new("RGB", (64, 64), (200, 150, 120)).save(path, "JPEG")

    done = stack.refinery(
        "submit", "refine", "--file", str(path), "--format", "webp", "--wait", "--timeout", "60", "--json"
    )

    assert done.returncode == 0, done.stderr
    record = json.loads(done.stdout)
    assert record["state"] == "succeeded" and record["kind"] == "refine_only"
    # The inline upload went to the job's own prefix.
    assert record["spec"]["input_uri"].endswith(f"/jobs/{record['job_id']}/input")
    assert Image.open(io.BytesIO(client.storage.get(record["result"]["uri"]))).format == "WEBP"


def test_failed_job_has_error_code_and_worker_keeps_serving(client):
    missing = client.submit_refine(input_uri=f"s3://{client.settings.s3_bucket}/uploads/missing.png").wait(60)
    not_image = f"s3://{client.settings.s3_bucket}/uploads/not-an-image.png"
    client.storage.put(not_image, b"this is not a png", "image/png")
    garbage = client.submit_refine(input_uri=not_image).wait(60)
    after = client.submit_generate("portrait", seed=2, width=SIZE, height=SIZE).wait(60)

    assert missing.state is JobState.failed and missing.error.code == "input_not_found"
    assert garbage.state is JobState.failed and garbage.error.code == "invalid_image"
    assert after.state is JobState.succeeded


def test_idempotency_key_returns_the_same_job(client):
    first = client.submit_generate("portrait", seed=3, width=SIZE, height=SIZE, idempotency_key="order-42")
    again = client.submit_generate("portrait", seed=3, width=SIZE, height=SIZE, idempotency_key="order-42")

    assert again.job_id == first.job_id
    record = first.wait(60)
    assert record.state is JobState.succeeded and record.attempts == 1


def test_signed_callback_on_terminal_state(client, receiver):
    record = client.submit_generate(
        "portrait", seed=8, width=SIZE, height=SIZE, callback_url=f"{receiver.url}/hooks?x=1", metadata={"order": 7}
    ).wait(60)

    path, headers, body = receiver.next(timeout=60)
    assert path == "/hooks?x=1"
    secret = client.settings.callback_secret.get_secret_value()
    payload = standardwebhooks.Webhook(secret).verify(body, headers)
    assert payload["type"] == "job.succeeded"
    assert payload["data"]["job_id"] == record.job_id
    assert payload["data"]["spec"]["metadata"] == {"order": 7}
    with pytest.raises(WebhookVerificationError):
        standardwebhooks.Webhook("whsec_" + "QUJDREVGR0hJSktMTU5PUFFSU1RVVldYWVo=").verify(body, headers)
    # The delivery outcome is recorded on the job, right after the receiver answered.
    wait_until(lambda: client.status(record.job_id).callback is not None, timeout_s=10, what="callback status")
    delivered = client.status(record.job_id)
    assert delivered.callback.delivered and delivered.callback.last_status == 204 and delivered.callback.attempts == 1


def test_a_callback_message_restored_after_its_delivery_sends_nothing(stack, client, receiver):
    """benchmarks/soak.py's duplicates (3 of 100,000, each after a failover): the primary died
    between a delivery and kombu's ack, so kombu restored the message and a worker delivered
    it again. A delivered callback is settled (no longer pending): its message sends nothing."""
    job = client.submit_generate("portrait", seed=10, width=SIZE, height=SIZE, callback_url=receiver.url)
    assert job.wait(60).state is JobState.succeeded
    receiver.next(timeout=60)
    stack.wait_callbacks_settled()
    restored = callback_push(client.celery, job.job_id, "succeeded", client.settings)
    client.store.redis.lpush(restored.list, restored.message)  # as kombu restores an unacked message

    said = f"job {job.job_id}: its succeeded callback was settled already; not sent again"
    wait_until(lambda: said in (stack.logs / "callbacks.log").read_text(), timeout_s=30, what="the restored message")
    assert [json.loads(body)["data"]["job_id"] for body in receiver.requests] == [job.job_id]


def test_an_archive_write_landing_last_with_a_stale_record_keeps_the_callbacks_outcome(client, receiver):
    # The worker that ended a job archives the record as it ended; the callbacks worker
    # archives it again with the delivery on it. Here the worker's write lands last.
    record = client.submit_generate("portrait", seed=10, width=SIZE, height=SIZE, callback_url=receiver.url).wait(60)
    wait_until(lambda: client.store.get(record.job_id).callback.delivered, timeout_s=30, what="the delivery recorded")
    as_ended = client.store.get(record.job_id).model_copy(update={"callback": None})

    RecordArchive(client.store, client.storage).archive(as_ended, client.settings.record_linger_s)

    raw = client.storage.get(client.storage.job_uri(record.job_id, RECORD_NAME))
    assert JobRecord.model_validate_json(raw).callback.delivered


def test_a_finished_record_leaves_redis_and_is_still_found_in_the_bucket(stack, client, receiver):
    handle = client.submit_generate(
        "portrait", seed=9, width=SIZE, height=SIZE, idempotency_key="archived-1", callback_url=receiver.url
    )
    record = handle.wait(60)
    key = keys.job_key(record.job_id)
    archived = f"{client.settings.s3_prefix}/jobs/{record.job_id}/job.json"

    def in_bucket() -> JobRecord:
        raw = client.storage.client.get_object(Bucket=client.settings.s3_bucket, Key=archived)["Body"].read()
        return JobRecord.model_validate_json(raw)

    # Beside its results, with the callback's outcome once the receiver answered.
    wait_until(lambda: (in_bucket().callback or CallbackStatus(url="")).delivered, timeout_s=30, what="archived")
    assert 0 < client.store.redis.ttl(key) <= client.settings.record_linger_s
    client.store.redis.delete(key)  # what REFINERY_RECORD_LINGER_S does, an hour after it ended

    found = client.status(record.job_id)
    assert found.state is JobState.succeeded and found.result == record.result and found.callback.delivered
    assert client.wait(record.job_id, 5) == found and client.cancel(record.job_id) == found
    # The idempotency key still finds the job; so does the CLI.
    again = client.submit_generate("portrait", seed=9, width=SIZE, height=SIZE, idempotency_key="archived-1")
    assert again.job_id == record.job_id and client.store.redis.get(key) is None, "not queued again"
    shown = stack.refinery("status", record.job_id, "--json")
    assert shown.returncode == 0 and json.loads(shown.stdout)["state"] == "succeeded", shown.stderr


@pytest.mark.parametrize(
    ("fields", "field"),
    [
        ({"prompt": ""}, "prompt"),
        ({"prompt": "x" * 2001}, "prompt"),
        ({"prompt": "ok", "width": 100}, "width"),
        ({"prompt": "ok", "height": 4096}, "height"),
        ({"prompt": "ok", "seed": -1}, "seed"),
        ({"prompt": "ok", "steps": 0}, "steps"),
        ({"prompt": "ok", "output_format": "gif"}, "output_format"),
        ({"prompt": "ok", "colour": "red"}, "colour"),
        ({"prompt": "ok", "callback_url": "ftp://example.com/x"}, "callback_url"),
    ],
)
def test_invalid_input_is_refused_at_submit_naming_the_field(client, fields, field):
    prompt = fields.pop("prompt")
    with pytest.raises(InvalidInput) as error:
        client.submit_generate(prompt, **fields)
    assert error.value.field == field


def test_private_callback_url_refused_at_submit(client):
    with pytest.raises(CallbackRefused) as error:
        client.submit_generate("portrait", width=SIZE, height=SIZE, callback_url="http://169.254.169.254/latest")
    assert error.value.field == "callback_url"


def test_cli_reports_invalid_input_with_field_and_exit_code(stack):
    done = stack.refinery("submit", "generate", "--prompt", "ok", "--width", "100", "--json")
    assert done.returncode == 2
    assert "error [invalid_input] width:" in done.stderr
    assert done.stdout == ""


def test_cli_submit_wait_status_json(stack):
    submitted = stack.refinery(
        "submit", "generate", "--prompt", "portrait", "--seed", "9", "--width", "64", "--height", "64", "--json"
    )
    job_id = json.loads(submitted.stdout)["job_id"]
    waited = stack.refinery("wait", job_id, "--timeout", "60", "--json")
    status = stack.refinery("status", job_id, "--json")

    record = json.loads(waited.stdout)
    assert record["state"] == "succeeded" and record["seed"] == 9
    assert json.loads(status.stdout)["result"] == record["result"]
    assert {"job_id", "kind", "state", "attempts", "result", "timings_ms", "error"} <= record.keys()


def test_timings_add_up(client):
    record = client.submit_generate("portrait", seed=10, width=SIZE, height=SIZE).wait(60)
    t = record.timings_ms

    assert {"queue_wait", "generate", "refine", "encode", "upload", "total"} <= t.keys()
    stages = sum(v for k, v in t.items() if k != "total")
    assert all(v >= 0 for v in t.values())
    assert stages <= t["total"]
    # The total is the record's own clock: created -> finished.
    assert t["total"] == pytest.approx((record.finished_at - record.created_at).total_seconds() * 1000, abs=1)
    queue_wait = (record.started_at - record.created_at).total_seconds() * 1000
    assert t["queue_wait"] == pytest.approx(queue_wait, abs=1)


def test_a_late_message_of_a_job_with_no_record_left_runs_nothing_and_the_worker_keeps_serving(stack, client):
    """A job's second message can come after its record left Redis (record_linger_s after it
    ended): the worker says so in one warning and the task ends there. Before, the task
    failed with JobNotFound, an ERROR and a traceback (benchmarks/soak.py counted them)."""
    record = JobRecord(
        job_id=uuid.uuid4().hex,
        kind="generate_and_refine",
        spec=GenerateSpec(prompt="portrait", width=SIZE, height=SIZE),
        state=JobState.queued,
        created_at=utcnow(),
    )
    client.store.push(job_push(client.celery, record, client.settings))  # the message alone
    log = stack.logs / "worker.log"
    # Celery's task id is the job id.
    wait_until(lambda: f"[{record.job_id}] succeeded" in log.read_text(), timeout_s=60, what="the task's end")
    after = client.submit_generate("portrait", seed=3, width=SIZE, height=SIZE).wait(60)

    lines = [line for line in log.read_text().splitlines() if record.job_id in line]
    assert any("not run (no record in Redis: it ended long ago, or expired)" in line for line in lines)
    assert not any("ERROR" in line for line in lines)
    assert after.state is JobState.succeeded
