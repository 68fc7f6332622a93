"""Unit tests for shared.callbacks: the private-address refusal, signing and delivery.

Delivery tests talk to real HTTP servers on 127.0.0.1 (allowlisted): conftest's ``CallbackReceiver``.
"""

from __future__ import annotations

import base64
import ipaddress
import json
import pickle
import socket
import threading
from collections.abc import Callable
from datetime import UTC, datetime, timedelta, timezone
from typing import TYPE_CHECKING

import pytest
from standardwebhooks import Webhook
from standardwebhooks.webhooks import WebhookVerificationError

from shared.callbacks import CallbackFailed, check_callback_url, deliver, sign_headers
from shared.errors import CallbackRefused

if TYPE_CHECKING:
    from conftest import CallbackReceiver

SECRET = "whsec_" + base64.b64encode(b"0123456789abcdef0123456789abcdef").decode()
LOCAL = ["127.0.0.1"]


def fake_dns(*addresses: str):
    """A resolver answering every name with ``addresses``, shaped like getaddrinfo's result."""

    def resolve(host: str, port: int | None, **_: object) -> list[tuple[object, ...]]:
        family = {4: socket.AF_INET, 6: socket.AF_INET6}
        return [(family[ipaddress.ip_address(a).version], socket.SOCK_STREAM, 6, "", (a, port or 0)) for a in addresses]

    return resolve


def no_dns(host: str, port: int | None, **_: object) -> list[tuple[object, ...]]:
    raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")


# --- check_callback_url -------------------------------------------------------------------


@pytest.mark.parametrize(
    "url",
    [
        "http://127.0.0.1/hook",
        "http://127.8.9.10:8080/hook",
        "http://[::1]/hook",
        "http://169.254.169.254/latest/meta-data/",
        "http://10.1.2.3/",
        "http://192.168.1.1/",
        "http://172.16.0.1/",
        "http://0.0.0.0/",
        "http://[::]/",
        "http://100.64.0.1/",  # carrier-grade NAT
        "http://224.0.0.1/",  # multicast: is_global alone lets it through
        "http://[ff02::1]/",
        "http://[fe80::1%25eth0]/",
        "http://[fec0::1]/",  # site-local: is_global alone lets it through
        "http://[fd00::1]/",  # unique-local
        "http://[::ffff:127.0.0.1]/",  # IPv4-mapped loopback
        "http://[::ffff:169.254.169.254]/",
        "http://[64:ff9b::a9fe:a9fe]/",  # NAT64 of 169.254.169.254
        "http://[2002:a00:1::1]/",  # 6to4 of 10.0.0.1
        "http://240.0.0.1/",  # reserved
        "https://255.255.255.255/",
    ],
)
def test_non_public_literal_addresses_are_refused(url: str) -> None:
    with pytest.raises(CallbackRefused, match="non-public address") as caught:
        check_callback_url(url, [])
    assert caught.value.field == "callback_url"
    assert caught.value.code == "callback_url_refused"


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("ftp://example.com/x", "http:// or https://"),
        ("file:///etc/passwd", "http:// or https://"),
        ("gopher://127.0.0.1:6379/_INFO", "http:// or https://"),
        ("javascript:alert(1)", "http:// or https://"),
        ("http:///path-only", "no host"),
        ("http://example.com:99999/", "not a valid URL"),
        ("example.com/hook", "http:// or https://"),
    ],
)
def test_malformed_and_non_http_urls_are_refused(url: str, message: str) -> None:
    with pytest.raises(CallbackRefused, match=message):
        check_callback_url(url, [], resolve=fake_dns("93.184.215.14"))


def test_localhost_is_refused_through_the_real_resolver() -> None:
    with pytest.raises(CallbackRefused, match="localhost"):
        check_callback_url("http://localhost:8000/hook", [])


def test_numeric_ipv4_spellings_are_judged_by_what_they_resolve_to() -> None:
    # 2130706433 is 127.0.0.1 to inet_aton; the real resolver turns it into that address.
    with pytest.raises(CallbackRefused, match="127.0.0.1"):
        check_callback_url("http://2130706433/", [])


def test_public_literal_addresses_pass() -> None:
    check_callback_url("https://8.8.8.8/hook", [])
    check_callback_url("https://[2606:4700:4700::1111]:8443/hook", [])
    check_callback_url("https://[::ffff:8.8.8.8]/hook", [])  # mapped public IPv4


def test_public_name_passes_with_every_address_public() -> None:
    public = fake_dns("93.184.215.14", "2606:2800:21f:cb07::1")
    check_callback_url("https://hooks.example.com/x", [], resolve=public)


def test_public_looking_name_resolving_privately_is_refused() -> None:
    with pytest.raises(CallbackRefused, match="10.0.0.5"):
        check_callback_url("https://hooks.example.com/x", [], resolve=fake_dns("10.0.0.5"))


def test_one_private_address_among_public_ones_is_refused() -> None:
    with pytest.raises(CallbackRefused, match="169.254.169.254"):
        mixed = fake_dns("93.184.215.14", "169.254.169.254")
        check_callback_url("https://hooks.example.com/", [], resolve=mixed)


def test_unresolvable_host_is_refused() -> None:
    with pytest.raises(CallbackRefused, match="does not resolve"):
        check_callback_url("https://no-such-host.invalid/", [], resolve=no_dns)
    with pytest.raises(CallbackRefused, match="does not resolve"):
        check_callback_url("https://empty.example/", [], resolve=fake_dns())


@pytest.mark.parametrize(
    ("url", "allowlist"),
    [
        ("http://127.0.0.1:9000/hook", ["127.0.0.1"]),
        ("http://10.1.2.3/hook", ["10.0.0.0/8"]),
        ("http://[::1]/hook", ["::1"]),
        ("http://[fd12::7]/hook", ["fd12::/16"]),
        ("http://hooks.internal/hook", ["hooks.internal"]),
        ("http://HOOKS.Internal./hook", [" Hooks.INTERNAL "]),  # case, trailing dot, spaces
        ("http://svc.cluster.local/hook", ["10.0.0.0/8"]),  # resolves inside an allowed network
    ],
)
def test_allowlist_lets_exact_entries_through(url: str, allowlist: list[str]) -> None:
    check_callback_url(url, allowlist, resolve=fake_dns("10.9.8.7"))


@pytest.mark.parametrize(
    ("url", "allowlist"),
    [
        ("http://10.1.2.3/", ["10.2.0.0/16"]),  # outside the network
        ("http://evil.hooks.internal/", ["hooks.internal"]),  # names are exact, not suffixes
        ("http://hooks.internal.evil.com/", ["hooks.internal"]),
        ("http://127.0.0.2/", ["127.0.0.1"]),
        ("http://mixed.example/", ["10.0.0.0/8"]),  # 10.x allowed, but 192.168.x is not
    ],
)
def test_allowlist_admits_nothing_else(url: str, allowlist: list[str]) -> None:
    with pytest.raises(CallbackRefused):
        check_callback_url(url, allowlist, resolve=fake_dns("10.9.8.7", "192.168.0.1"))


# --- sign_headers -------------------------------------------------------------------------


def test_signature_verifies_with_the_reference_library() -> None:
    body = b'{"job_id":"j1","state":"succeeded"}'
    headers = sign_headers(body, secret=SECRET, msg_id="msg_1", timestamp=datetime.now(UTC))

    assert headers["content-type"] == "application/json"
    assert headers["webhook-id"] == "msg_1"
    assert Webhook(SECRET).verify(body, headers) == {"job_id": "j1", "state": "succeeded"}
    with pytest.raises(WebhookVerificationError):
        Webhook(SECRET).verify(body + b" ", headers)


def test_non_utc_timestamps_sign_the_instant_they_name() -> None:
    now = datetime.now(UTC)
    body = b"{}"
    elsewhere = now.astimezone(timezone(timedelta(hours=5, minutes=30)))

    headers = sign_headers(body, secret=SECRET, msg_id="m", timestamp=elsewhere)

    assert headers == sign_headers(body, secret=SECRET, msg_id="m", timestamp=now)
    Webhook(SECRET).verify(body, headers)


def test_naive_timestamps_are_rejected() -> None:
    with pytest.raises(ValueError, match="timezone-aware"):
        sign_headers(b"{}", secret=SECRET, msg_id="m", timestamp=datetime.now())


# --- deliver ------------------------------------------------------------------------------


PAYLOAD = {"job_id": "j1", "state": "succeeded", "note": "naïve ✓"}


def send(
    url: str,
    secret: str | None = SECRET,
    timeout_s: float = 5,
    *,
    allowlist: list[str] = LOCAL,
    resolve: Callable[..., list[tuple[object, ...]]] = socket.getaddrinfo,
) -> int:
    """``deliver`` ``PAYLOAD`` to ``url``, as msg_42; by default with 127.0.0.1 allowlisted."""
    return deliver(
        url, PAYLOAD, msg_id="msg_42", secret=secret, timeout_s=timeout_s, allowlist=allowlist, resolve=resolve
    )


@pytest.fixture
def ok_receiver(make_receiver) -> CallbackReceiver:
    """A local receiver answering 200 to every request."""
    return make_receiver(status=200)


def test_delivery_is_signed_and_verifiable(ok_receiver) -> None:
    assert send(f"{ok_receiver.url}/ok") == 200

    [(path, headers, body)] = ok_receiver.received
    assert path == "/ok"
    assert json.loads(body) == PAYLOAD
    assert body == json.dumps(PAYLOAD, separators=(",", ":")).encode()  # compact, sent as signed
    assert headers["webhook-id"] == "msg_42"
    assert Webhook(SECRET).verify(body, headers) == PAYLOAD
    wrong = "whsec_" + base64.b64encode(b"another secret of 32 bytes......").decode()
    with pytest.raises(WebhookVerificationError):
        Webhook(wrong).verify(body, headers)


def test_delivery_without_a_secret_is_unsigned(ok_receiver) -> None:
    assert send(f"{ok_receiver.url}/ok", secret=None) == 200

    [(_, headers, _)] = ok_receiver.received
    assert "webhook-signature" not in {k.lower() for k in headers}
    assert headers["webhook-id"] == "msg_42"


def test_server_error_is_a_retryable_failure(make_receiver) -> None:
    failing = make_receiver(status=500)
    with pytest.raises(CallbackFailed, match="500") as caught:
        send(f"{failing.url}/fail")
    assert caught.value.status == 500


def test_redirect_is_a_failure_and_not_followed(make_receiver) -> None:
    redirector = make_receiver(status=302, location="/target")

    with pytest.raises(CallbackFailed, match="redirect") as caught:
        send(f"{redirector.url}/redirect")

    assert caught.value.status == 302
    assert [path for path, _, _ in redirector.received] == ["/redirect"]


def test_connection_refused_is_a_retryable_failure() -> None:
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
    with pytest.raises(CallbackFailed, match="ConnectError") as caught:
        send(f"http://127.0.0.1:{port}/ok")
    assert caught.value.status is None


def test_timeout_is_a_retryable_failure(make_receiver) -> None:
    slow = make_receiver(status=200, delay_s=2)
    with pytest.raises(CallbackFailed, match="Timeout"):
        send(f"{slow.url}/slow", timeout_s=0.2)


def test_private_target_is_refused_at_delivery_time(ok_receiver) -> None:
    with pytest.raises(CallbackRefused):
        send(f"{ok_receiver.url}/ok", allowlist=[])
    assert ok_receiver.received == []


def test_callback_failed_survives_pickling() -> None:
    copy = pickle.loads(pickle.dumps(CallbackFailed("answered 503", 503)))
    assert (str(copy), copy.status) == ("answered 503", 503)


# --- delivery connects only where the check looked -----------------------------------------

PUBLIC = "93.184.215.14"  # a public address: what the hostile name claims at check time


class RebindingDNS:
    """A name that answers a public address on the first lookup and 127.0.0.1 after it:
    the classic DNS rebinding attack on check-then-connect. IP literals resolve as usual."""

    def __init__(self, real) -> None:
        self.real = real
        self.lookups: list[str] = []

    def __call__(self, host, port, *args, **kwargs):
        try:
            ipaddress.ip_address(host)
            return self.real(host, port, *args, **kwargs)
        except ValueError:
            pass
        self.lookups.append(host)
        address = PUBLIC if len(self.lookups) == 1 else "127.0.0.1"
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (address, port or 0))]


@pytest.fixture
def connects(monkeypatch):
    """Records every TCP connect; ``connects.route`` maps an address to where it really goes
    (None: refused, as an unreachable public host would be)."""

    real = socket.create_connection

    class Recorder(list):
        def __init__(self) -> None:
            super().__init__()
            self.route: dict[str, tuple[str, int] | None] = {}

    recorder = Recorder()

    def create_connection(address, *args, **kwargs):
        recorder.append(tuple(address))
        if address[0] in recorder.route:
            routed = recorder.route[address[0]]
            if routed is None:
                raise ConnectionRefusedError(111, "Connection refused (test)")
            address = routed
        return real(address, *args, **kwargs)

    monkeypatch.setattr(socket, "create_connection", create_connection)
    return recorder


def test_dns_rebinding_cannot_redirect_delivery_to_a_private_address(ok_receiver, connects, monkeypatch) -> None:
    port = ok_receiver.port
    dns = RebindingDNS(socket.getaddrinfo)
    # The HTTP client resolving the name itself would get the second answer, 127.0.0.1,
    # where the local receiver listens: that must never happen.
    monkeypatch.setattr(socket, "getaddrinfo", dns)
    connects.route[PUBLIC] = None  # the checked public host does not answer

    with pytest.raises(CallbackFailed, match="ConnectError"):
        send(f"http://hooks.example.com:{port}/ok", allowlist=[], resolve=dns)

    assert dns.lookups == ["hooks.example.com"]  # resolved once, for the check
    assert connects == [(PUBLIC, port)]  # connected only to the checked address
    assert ok_receiver.received == []


def test_delivery_goes_to_the_checked_address_with_the_original_host_header(ok_receiver, connects) -> None:
    port = ok_receiver.port
    connects.route[PUBLIC] = ("127.0.0.1", port)  # the "public" host is the local receiver

    status = send(f"http://hooks.example.com:{port}/ok?x=1", allowlist=[], resolve=fake_dns(PUBLIC))

    assert status == 200
    assert connects == [(PUBLIC, port)]
    [(path, headers, body)] = ok_receiver.received
    assert path == "/ok?x=1"
    assert headers["host"] == f"hooks.example.com:{port}"
    assert Webhook(SECRET).verify(body, headers) == PAYLOAD


def test_each_checked_address_is_tried_in_resolver_order(ok_receiver, connects) -> None:
    port = ok_receiver.port
    connects.route.update({PUBLIC: None, "93.184.215.15": ("127.0.0.1", port)})

    status = send(
        f"http://hooks.example.com:{port}/ok", secret=None, allowlist=[], resolve=fake_dns(PUBLIC, "93.184.215.15")
    )

    assert status == 200
    assert connects == [(PUBLIC, port), ("93.184.215.15", port)]
    assert len(ok_receiver.received) == 1


def test_one_private_answer_refuses_delivery_before_any_connect(ok_receiver, connects) -> None:
    with pytest.raises(CallbackRefused, match="127.0.0.1"):
        send(f"http://hooks.example.com:{ok_receiver.port}/ok", allowlist=[], resolve=fake_dns(PUBLIC, "127.0.0.1"))
    assert connects == [] and ok_receiver.received == []


def test_allowlisted_name_is_resolved_once_and_keeps_its_host_header(ok_receiver) -> None:
    port = ok_receiver.port
    calls: list[str] = []

    def resolve(host, port_, **kwargs):
        calls.append(host)
        return fake_dns("127.0.0.1")(host, port_, **kwargs)

    status = send(f"http://hooks.internal:{port}/ok", secret=None, allowlist=["hooks.internal"], resolve=resolve)

    assert status == 200 and calls == ["hooks.internal"]
    assert ok_receiver.received[0][1]["host"] == f"hooks.internal:{port}"


def test_https_delivery_sends_the_original_name_for_sni(connects, tmp_path) -> None:
    """The connection goes to the checked IP, but TLS still names the host (SNI and the
    certificate check), so an https receiver behind a shared IP gets the right certificate."""
    import ssl

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "hooks.example.com")])
    now = datetime.now(UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=5))
        .not_valid_after(now + timedelta(hours=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName("hooks.example.com")]), critical=False)
        .sign(key, hashes.SHA256())
    )
    (tmp_path / "cert.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (tmp_path / "key.pem").write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(tmp_path / "cert.pem", tmp_path / "key.pem")
    server_names: list[str | None] = []
    context.sni_callback = lambda sock, server_name, ctx: server_names.append(server_name)

    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        listener.settimeout(5)
        port = listener.getsockname()[1]

        def accept_one() -> None:
            try:
                conn, _ = listener.accept()
                with context.wrap_socket(conn, server_side=True):
                    pass
            except (OSError, ssl.SSLError):
                pass  # the client refuses the self-signed certificate; the SNI is what counts

        thread = threading.Thread(target=accept_one, daemon=True)
        thread.start()
        connects.route[PUBLIC] = ("127.0.0.1", port)
        # The self-signed certificate is not trusted, so the delivery fails after the
        # handshake began; it proves the certificate is still checked, too.
        with pytest.raises(CallbackFailed):
            send(f"https://hooks.example.com:{port}/ok", secret=None, allowlist=[], resolve=fake_dns(PUBLIC))
        thread.join(5)

    assert connects == [(PUBLIC, port)]
    assert server_names == ["hooks.example.com"]


def test_proxy_environment_variables_are_ignored(ok_receiver, make_receiver, monkeypatch) -> None:
    """A proxy resolves and connects on its own, past the address check: never use one."""
    proxy = make_receiver(status=200)
    for name in ("HTTP_PROXY", "http_proxy", "HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.setenv(name, proxy.url)
    for name in ("NO_PROXY", "no_proxy"):
        monkeypatch.delenv(name, raising=False)

    assert send(f"{ok_receiver.url}/ok") == 200

    assert proxy.received == []
    assert [path for path, _, _ in ok_receiver.received] == ["/ok"]


def test_redirect_to_a_private_address_is_not_followed(make_receiver) -> None:
    private = make_receiver(status=200)
    redirector = make_receiver(status=302, location=f"{private.url}/latest/meta-data/")

    with pytest.raises(CallbackFailed, match="redirects are not followed") as caught:
        send(f"{redirector.url}/redirect")

    assert caught.value.status == 302
    assert [path for path, _, _ in redirector.received] == ["/redirect"]
    assert private.received == []


def test_a_record_out_of_reach_in_the_bucket_is_a_retryable_failure() -> None:
    # The record left Redis (its linger) and S3 is down for a moment: the delivery is
    # retried like a receiver's failure, not dropped (benchmarks/soak.py lost 422 of 2,000
    # terminal callbacks this way during a 6 s outage, with a 5 s linger).
    from shared.archive import RecordArchive
    from shared.errors import StorageUnavailable
    from shared.settings import Settings
    from worker.notify import deliver_job_callback

    class Unreachable(RecordArchive):
        def __init__(self) -> None:
            pass

        def get(self, job_id: str):
            raise StorageUnavailable(f"download of s3://bucket/jobs/{job_id}/job.json failed")

    with pytest.raises(CallbackFailed, match="could not be read"):
        deliver_job_callback(Settings(_env_file=None), Unreachable(), "j1", "succeeded")
