"""Security settings, each against real processes: JSON-only messages, a Redis password,
Redis over TLS, and S3 credentials that never reach a log or a record.

(Callback signatures verifiable with the Standard Webhooks reference library:
tests/test_end_to_end.py and tests/test_callbacks.py. Flower's basic auth:
tests/test_compose.py.)
"""

from __future__ import annotations

import datetime as dt
import io
import ipaddress
import json
import logging
import socket
import ssl
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from PIL import Image

from devstack.stack import LocalStack, free_port, wait_until
from producer.client import Client
from shared import keys
from shared.broker import make_celery, queue_depth, queue_lists
from shared.contract import GenerateSpec, JobRecord, JobState
from shared.records import RecordStore
from shared.settings import Settings

pytestmark = pytest.mark.integration

SIZE = 64
PASSWORD = "pw-" + uuid.uuid4().hex


def settings_for(url: str, **fields: object) -> Settings:
    return Settings(_env_file=None, redis_url=url, model_preset="tiny-schnell", **fields)


def start_redis_server(workdir: Path, port: int, *args: str, ping=None) -> subprocess.Popen:
    log = workdir / f"redis-{port}.log"
    argv = ["redis-server", "--bind", "127.0.0.1", "--save", "", "--appendonly", "no", "--dir", str(workdir), *args]
    with open(log, "wb") as out:
        process = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT)
    try:
        wait_until(
            ping or redis.Redis(host="127.0.0.1", port=port, password=PASSWORD).ping,
            timeout_s=10,
            what="redis-server",
            process=process,
            log=log,
        )
    except BaseException:
        process.kill()
        process.wait()
        raise
    return process


def stop(process: subprocess.Popen) -> None:
    process.terminate()
    try:
        process.wait(10)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def png() -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (SIZE, SIZE), (120, 90, 60)).save(out, "PNG")
    return out.getvalue()


# --- JSON only: a pickled message is refused ------------------------------------------------


class WritesAFile:
    """Unpickling this calls open(path, "w"): proof that a pickle was deserialised."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_pickled_message_is_refused_and_the_worker_keeps_serving(stack, client, tmp_path) -> None:
    marker = tmp_path / "unpickled"
    job_id = uuid.uuid4().hex
    spec = GenerateSpec(prompt="portrait", seed=1, width=SIZE, height=SIZE)
    client.store.create(JobRecord(job_id=job_id, kind="generate_and_refine", spec=spec, seed=1))

    # Celery's own pickle message for a real job, built on a staging queue, then placed on
    # the worker's queue as if a hostile producer had sent it there.
    sender = make_celery(stack.settings)
    sender.conf.update(task_serializer="pickle", accept_content=["pickle", "json"])
    staging = f"staging-{job_id}"
    sender.send_task(
        keys.task_name("generate_and_refine"),
        args=[job_id],
        kwargs={"payload": WritesAFile(marker)},
        task_id=job_id,
        queue=staging,
        priority=3,
    )
    r = client.store.redis
    staged = queue_lists(staging)[1]
    (raw,) = r.lrange(staged, 0, -1)
    r.delete(staged)
    message = json.loads(raw)
    assert message["content-type"] == "application/x-python-serialize"
    message["properties"]["delivery_info"]["routing_key"] = stack.settings.queue("generate_and_refine")
    r.lpush(queue_lists(stack.settings.queue("generate_and_refine"))[1], json.dumps(message))

    # The worker takes it off the queue ...
    wait_until(
        lambda: queue_depth(r, stack.settings.queue("generate_and_refine")) == 0,
        timeout_s=30,
        what="pickled message taken",
    )
    # ... and still serves valid jobs.
    after = client.submit_generate("portrait after a pickle", seed=2, width=SIZE, height=SIZE).wait(60)
    assert after.state is JobState.succeeded, after.error

    assert not marker.exists(), "the worker unpickled the message"
    record = client.status(job_id)
    assert record.state is JobState.queued and record.attempts == 0 and record.started_at is None
    # Not parked for redelivery either (unacked messages come back after the visibility timeout).
    assert not any(job_id.encode() in value for value in r.hvals("unacked"))
    logs = "".join(path.read_text(errors="replace") for path in stack.logs.glob("*.log"))
    assert "Refusing to deserialize untrusted content of type pickle" in logs


def test_celery_accepts_json_only() -> None:
    conf = make_celery(settings_for("redis://127.0.0.1:1/0")).conf
    assert list(conf.accept_content) == ["json"]
    assert conf.task_serializer == conf.result_serializer == conf.event_serializer == "json"


# --- Redis password -------------------------------------------------------------------------


@pytest.fixture
def password_redis(tmp_path: Path) -> Iterator[int]:
    port = free_port()
    process = start_redis_server(tmp_path, port, "--port", str(port), "--requirepass", PASSWORD)
    yield port
    stop(process)


def test_redis_password_is_honoured(password_redis: int) -> None:
    port = password_redis
    url = f"redis://:{PASSWORD}@127.0.0.1:{port}/0"

    store = RecordStore.from_settings(settings_for(url))
    assert store.redis.ping()
    # The producer writes its record and its message through the password.
    client = Client(settings_for(url))
    job = client.submit_generate("portrait", seed=1, width=SIZE, height=SIZE)
    assert store.get(job.job_id).state is JobState.queued
    assert queue_depth(store.redis, "generate") == 1
    # And a consumer reads the message through it.
    app = make_celery(settings_for(url))
    with app.connection_for_read() as connection:
        queue = connection.SimpleQueue("generate")
        message = queue.get(timeout=5)
        assert message.headers["id"] == job.job_id
        message.ack()
        queue.close()


@pytest.mark.parametrize("userinfo", [":wrong-password@", ""], ids=["wrong-password", "no-password"])
def test_redis_without_the_right_password_is_an_auth_error(password_redis: int, userinfo: str) -> None:
    url = f"redis://{userinfo}127.0.0.1:{password_redis}/0"

    with pytest.raises(redis.exceptions.AuthenticationError):
        RecordStore.from_settings(settings_for(url)).redis.ping()
    with pytest.raises(redis.exceptions.AuthenticationError):
        Client(settings_for(url)).submit_generate("portrait", seed=1, width=SIZE, height=SIZE)
    app = make_celery(settings_for(url))
    with app.connection_for_write() as connection:
        with pytest.raises(Exception, match="(?i)auth|password"):
            connection.ensure_connection(max_retries=0)


# --- Redis over TLS -------------------------------------------------------------------------


def _certificates(workdir: Path) -> tuple[Path, Path, Path]:
    """A private CA and a server certificate for 127.0.0.1 signed by it: (ca, cert, key)."""
    x509 = pytest.importorskip("cryptography.x509")
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = dt.datetime.now(dt.UTC)

    def build(subject: str, key, issuer_name, issuer_key, *, ca: bool):
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
            .issuer_name(issuer_name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(hours=2))
            .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        )
        if not ca:
            builder = builder.add_extension(
                x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False
            )
        return builder.sign(issuer_key, hashes.SHA256())

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "face-refinery test CA")])
    ca = build("face-refinery test CA", ca_key, ca_name, ca_key, ca=True)
    server_key = ec.generate_private_key(ec.SECP256R1())
    server = build("127.0.0.1", server_key, ca_name, ca_key, ca=False)
    paths = workdir / "ca.pem", workdir / "server.pem", workdir / "server.key"
    paths[0].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    paths[1].write_bytes(server.public_bytes(serialization.Encoding.PEM))
    paths[2].write_bytes(
        server_key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    return paths


@pytest.fixture(scope="module")
def tls_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[int, Path]]:
    """redis-server speaking only TLS (with a password), its certificate from a private CA."""
    workdir = tmp_path_factory.mktemp("tls-redis")
    ca, cert, key = _certificates(workdir)
    port = free_port()
    args = ["--port", "0", "--tls-port", str(port), "--tls-cert-file", str(cert), "--tls-key-file", str(key)]
    args += ["--tls-ca-cert-file", str(ca), "--tls-auth-clients", "no", "--requirepass", PASSWORD]
    ping = redis.Redis(host="127.0.0.1", port=port, password=PASSWORD, ssl=True, ssl_ca_certs=str(ca)).ping
    try:
        process = start_redis_server(workdir, port, *args, ping=ping)
    except RuntimeError as exc:  # a redis-server built without TLS exits on the tls-* flags
        pytest.skip(f"redis-server without TLS support: {exc}")
    yield port, ca
    stop(process)


def test_rediss_url_reaches_redis_over_tls(tls_redis) -> None:
    port, ca = tls_redis
    url = f"rediss://:{PASSWORD}@127.0.0.1:{port}/0?ssl_cert_reqs=required&ssl_ca_certs={ca}"
    settings = settings_for(url)

    # Records, and the producer's message, over TLS ...
    client = Client(settings)
    job = client.submit_generate("portrait", seed=1, width=SIZE, height=SIZE)
    assert client.status(job.job_id).state is JobState.queued
    # ... with the certificate checked on the broker connection too ...
    app = make_celery(settings)
    with app.connection_for_read() as connection:
        assert connection.ssl["ssl_cert_reqs"] == ssl.CERT_REQUIRED
        queue = connection.SimpleQueue("generate")
        message = queue.get(timeout=5)
        assert message.headers["id"] == job.job_id
        message.ack()
        queue.close()
    # ... on a server that speaks nothing but TLS.
    with pytest.raises(redis.exceptions.ConnectionError):
        redis.Redis(host="127.0.0.1", port=port, password=PASSWORD, socket_timeout=2).ping()


def test_rediss_url_job_store_checks_the_server_certificate(tls_redis) -> None:
    """Plain rediss:// (as the README documents it): the server's certificate comes from a
    CA the system does not trust, so the connection must be refused."""
    port, _ = tls_redis
    with pytest.raises(redis.exceptions.ConnectionError, match="CERTIFICATE_VERIFY_FAILED"):
        RecordStore.from_settings(settings_for(f"rediss://:{PASSWORD}@127.0.0.1:{port}/0")).redis.ping()


def test_rediss_url_broker_checks_the_server_certificate(tls_redis) -> None:
    port, _ = tls_redis
    app = make_celery(settings_for(f"rediss://:{PASSWORD}@127.0.0.1:{port}/0"))
    with app.connection_for_write() as connection:
        assert connection.ssl and connection.ssl.get("ssl_cert_reqs") == ssl.CERT_REQUIRED, connection.ssl
        try:
            connection.ensure_connection(max_retries=0)
        except Exception as exc:
            assert "CERTIFICATE_VERIFY_FAILED" in str(exc)
        else:
            raise AssertionError("connected to a server whose certificate nothing vouches for")


# --- S3 credentials never logged ------------------------------------------------------------


class PasswordStack(LocalStack):
    """LocalStack whose redis-server requires a password (so that one is checked too), with
    an S3 server of its own, whose log holds only this stack's requests."""

    def __init__(self, workdir: Path, password: str, **overrides: object) -> None:
        port = free_port()
        redis_url = f"redis://:{password}@127.0.0.1:{port}/0"
        super().__init__(workdir, private_s3=True, redis_url=redis_url, **overrides)
        self.redis_port = port
        self.password = password

    def start_redis(self, *, appendonly: bool = False) -> None:
        argv = ["redis-server", "--port", str(self.redis_port), "--bind", "127.0.0.1", "--save", ""]
        argv += ["--appendonly", "no", "--dir", str(self.workdir), "--requirepass", self.password]
        process = self.spawn("redis", argv)
        client = redis.Redis(port=self.redis_port, password=self.password)
        wait_until(client.ping, timeout_s=10, what="redis-server", process=process, log=self.logs / "redis.log")


def redis_dump(client: redis.Redis) -> bytes:
    """Every key and value in the database, whatever its type."""
    out = []
    for key in client.scan_iter():
        kind = client.type(key).decode()
        value = {
            "string": lambda: [client.get(key)],
            "list": lambda: client.lrange(key, 0, -1),
            "hash": lambda: [v for pair in client.hgetall(key).items() for v in pair],
            "set": lambda: list(client.smembers(key)),
            "zset": lambda: client.zrange(key, 0, -1),
        }.get(kind, list)()
        out += [key, *[v for v in value if v is not None]]
    return b"\n".join(out)


def test_s3_credentials_and_redis_password_are_never_logged(tmp_path, caplog) -> None:
    secret = "s3-secret-" + uuid.uuid4().hex
    access_key = "AKIA" + uuid.uuid4().hex[:16].upper()
    redis_password = "redis-pw-" + uuid.uuid4().hex
    caplog.set_level(logging.DEBUG)
    with PasswordStack(
        tmp_path / "stack", redis_password, s3_access_key_id=access_key, s3_secret_access_key=secret
    ) as stack:
        stack.start_worker("worker")
        stack.start_worker("callbacks", [stack.settings.queue_callbacks])
        client = Client(stack.settings)
        ok = client.submit_generate("portrait", seed=1, width=SIZE, height=SIZE).wait(120)
        refined = client.submit_refine(image=png()).wait(60)
        missing = client.submit_refine(input_uri=f"s3://{stack.settings.s3_bucket}/uploads/missing.png").wait(60)
        # A callback that cannot be delivered (nothing listens there): its error is recorded.
        with socket.socket() as closed:
            closed.bind(("127.0.0.1", 0))
            dead = f"http://127.0.0.1:{closed.getsockname()[1]}/hook"
        hooked = client.submit_generate("portrait", seed=2, width=SIZE, height=SIZE, callback_url=dead).wait(60)
        wait_until(lambda: client.status(hooked.job_id).callback is not None, timeout_s=30, what="callback outcome")
        records = [client.status(r.job_id).model_dump_json() for r in (ok, refined, missing, hooked)]
        dump = redis_dump(client.store.redis)
        # The CLI's view of a job, too.
        cli = stack.refinery("status", ok.job_id, "--json", timeout_s=60)
        assert cli.returncode == 0, cli.stderr
    # The secrets were really in use: the jobs ran against this S3 and this Redis.
    assert ok.state is JobState.succeeded and refined.state is JobState.succeeded, (ok.error, refined.error)
    assert missing.state is JobState.failed and missing.error.code == "input_not_found"
    assert access_key in ok.result.url  # a presigned URL names the key id; never the secret

    logs = {path.name: path.read_text(errors="replace") for path in stack.logs.glob("*.log")}
    assert {"worker.log", "callbacks.log", "s3.log", "redis.log"} <= logs.keys()
    assert "ready" in logs["worker.log"].lower()  # the logs did capture the worker's run
    for name, text in {
        **logs,
        "job records": "\n".join(records),
        "cli": cli.stdout + cli.stderr,
        "test process": caplog.text,
    }.items():
        assert secret not in text, f"the S3 secret key appears in {name}"
        assert redis_password not in text, f"the Redis password appears in {name}"
    assert secret.encode() not in dump, "the S3 secret key is stored in Redis"
    assert redis_password.encode() not in dump, "the Redis password is stored in Redis"
