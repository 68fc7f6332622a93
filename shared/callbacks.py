"""Status callbacks: refusing private targets, signing, and one delivery attempt.

A callback URL is chosen by whoever submits a job, so an unchecked one would let them make
the worker call internal services (cloud metadata, Redis, admin ports). URLs are checked at
submit time and again before every delivery, and a delivery connects only to an address
that check approved (no second DNS lookup, no proxy). Bodies are signed per Standard Webhooks
(https://www.standardwebhooks.com/) so receivers can verify them with any of its libraries.
"""

from __future__ import annotations

import functools
import ipaddress
import json
import socket
import ssl
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlsplit

import httpx
from standardwebhooks import Webhook

from shared.errors import CallbackRefused

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
_NAT64 = ipaddress.ip_network("64:ff9b::/96")


def check_callback_url(
    url: str,
    allowlist: list[str],
    *,
    resolve: Callable[..., list[tuple[Any, ...]]] = socket.getaddrinfo,
) -> None:
    """Raise ``CallbackRefused`` unless ``url`` is http(s) and reaches only public addresses.

    ``allowlist`` entries are host names (exact, case-insensitive) or IP networks/addresses;
    a listed name, or an address inside a listed network, is let through.
    """
    _checked_addresses(url, allowlist, resolve, resolve_listed_names=False)


def _checked_addresses(
    url: str,
    allowlist: list[str],
    resolve: Callable[..., list[tuple[Any, ...]]],
    *,
    resolve_listed_names: bool,
) -> list[IPAddress]:
    """The addresses ``url`` may be connected to, in the resolver's order, each one checked.

    An allowlisted name is trusted as a whole: its addresses are returned unchecked, and
    only resolved at all when ``resolve_listed_names`` (delivery needs them, submit not).
    """
    try:
        parts = urlsplit(url)
        port = parts.port  # raises ValueError for a port that is not a number in range
    except ValueError as exc:
        raise CallbackRefused(f"is not a valid URL: {exc}", field="callback_url") from None
    if parts.scheme not in ("http", "https"):  # urlsplit lower-cases the scheme
        raise CallbackRefused("must be an http:// or https:// URL", field="callback_url")
    host = (parts.hostname or "").rstrip(".")  # hostname is already lower-case, unbracketed
    if not host:
        raise CallbackRefused("has no host", field="callback_url")

    names, networks = _parse_allowlist(allowlist)
    listed_name = host in names
    if listed_name and not resolve_listed_names:
        return []
    try:
        addresses = [ipaddress.ip_address(host)]
    except ValueError:
        # Every address counts, not just the first: the HTTP client may try any of them.
        try:
            infos = resolve(host, port, type=socket.SOCK_STREAM)
            # dict.fromkeys: unique, in the resolver's (RFC 6724) order.
            addresses = list(dict.fromkeys(ipaddress.ip_address(info[4][0]) for info in infos))
        except (OSError, UnicodeError, ValueError) as exc:
            raise CallbackRefused(f"host {host!r} does not resolve: {exc}", field="callback_url") from None
        if not addresses:
            raise CallbackRefused(f"host {host!r} does not resolve", field="callback_url")
    if listed_name:
        return addresses
    for address in addresses:
        if not any(address in network for network in networks) and not _is_public(address):
            raise CallbackRefused(
                f"host {host!r} resolves to non-public address {address}; "
                "allowlist it in REFINERY_CALLBACK_ALLOWLIST if that is intended",
                field="callback_url",
            )
    return addresses


def _parse_allowlist(allowlist: list[str]) -> tuple[set[str], list[IPNetwork]]:
    names: set[str] = set()
    networks: list[IPNetwork] = []
    for entry in allowlist:
        try:
            networks.append(ipaddress.ip_network(entry.strip(), strict=False))
        except ValueError:
            names.add(entry.strip().lower().rstrip("."))
    return names, networks


def _is_public(address: IPAddress) -> bool:
    # IPv6 forms that carry an IPv4 address (mapped, NAT64, 6to4) reach that IPv4 address,
    # so judge it instead: ::ffff:127.0.0.1 is loopback.
    if address.version == 6:
        if address.ipv4_mapped:
            address = address.ipv4_mapped
        elif address in _NAT64:
            address = ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
        elif address.sixtofour:
            address = address.sixtofour
    # is_global misses multicast, reserved and deprecated site-local (fec0::/10) ranges.
    return (
        address.is_global
        and not address.is_multicast
        and not address.is_reserved
        and not (address.version == 6 and address.is_site_local)
    )


def sign_headers(body: bytes, *, secret: str, msg_id: str, timestamp: datetime) -> dict[str, str]:
    """Standard Webhooks headers for ``body``; ``secret`` is a ``whsec_<base64>`` secret."""
    if timestamp.tzinfo is None:
        raise ValueError("timestamp must be timezone-aware")
    # Webhook.sign() replaces (not converts) the tzinfo with UTC, so convert first or a
    # non-UTC timestamp would be signed as a different instant than the header states.
    timestamp = timestamp.astimezone(UTC)
    return {
        "webhook-id": msg_id,
        "webhook-timestamp": str(int(timestamp.timestamp())),
        "webhook-signature": Webhook(secret).sign(msg_id, timestamp, body.decode()),
        "content-type": "application/json",
    }


class CallbackFailed(Exception):
    """A delivery attempt that may succeed if retried: network error, timeout, non-2xx."""

    def __init__(self, message: str, status: int | None = None) -> None:
        # Both in args so the exception survives pickling (Celery retries pickle it).
        super().__init__(message, status)
        self.message = message
        self.status = status

    def __str__(self) -> str:
        return self.message


@functools.cache
def _tls_context() -> ssl.SSLContext:
    """One TLS context for every delivery of the process: httpx builds a new one for each
    client it makes, loading certifi's CA bundle each time, which cost 42 ms of CPU per
    callback and capped a callbacks worker at about 24 a second (benchmarks/callback_cost.py).
    A context is safe to share between threads."""
    return httpx.create_ssl_context(trust_env=False)


def deliver(
    url: str,
    payload: dict[str, Any],
    *,
    msg_id: str,
    secret: str | None,
    timeout_s: float,
    allowlist: list[str],
    resolve: Callable[..., list[tuple[Any, ...]]] = socket.getaddrinfo,
) -> int:
    """POST ``payload`` once; return the 2xx status or raise ``CallbackFailed``.

    ``CallbackRefused`` (the URL now resolves somewhere private) is not worth retrying and
    propagates. ``msg_id`` stays the same across retries so receivers can deduplicate.

    The host is resolved exactly once, every address is checked, and the connection goes to
    one of those checked addresses (the request keeps the original Host header, and the
    original name for TLS SNI and certificate checks). Letting the HTTP client resolve the
    name again would open a DNS rebinding window: public at check time, 127.0.0.1 at
    connect time. Proxy variables from the environment are ignored for the same reason: a
    proxy would resolve and connect on its own, past the check.
    """
    # DNS may have changed since the job was submitted, so the check runs again here.
    addresses = _checked_addresses(url, allowlist, resolve, resolve_listed_names=True)
    try:
        target = httpx.URL(url)
        host_header = target.netloc.decode("ascii")  # host[:port], IDNA-encoded, no userinfo
    except (httpx.InvalidURL, UnicodeError) as exc:
        raise CallbackRefused(f"is not a valid URL: {exc}", field="callback_url") from None
    extensions: dict[str, Any] = {}
    if target.scheme == "https":
        extensions["sni_hostname"] = target.raw_host.decode("ascii")
    # Serialise once: the signature covers exactly these bytes.
    body = json.dumps(payload, separators=(",", ":")).encode()
    if secret:
        headers = sign_headers(body, secret=secret, msg_id=msg_id, timestamp=datetime.now(UTC))
    else:
        headers = {"webhook-id": msg_id, "content-type": "application/json"}
    headers["host"] = host_header

    connect_errors: list[str] = []
    with httpx.Client(timeout=timeout_s, follow_redirects=False, trust_env=False, verify=_tls_context()) as client:
        for address in addresses:
            try:
                pinned = target.copy_with(host=str(address))
            except httpx.InvalidURL as exc:
                raise CallbackRefused(f"cannot address {address}: {exc}", field="callback_url") from None
            try:
                # Streamed and never read: only the status matters, and a hostile receiver
                # could answer with an endless body. A redirect could point anywhere, so it
                # is not followed.
                with client.stream("POST", pinned, content=body, headers=headers, extensions=extensions) as response:
                    status = response.status_code
                    location = response.headers.get("location")
                break
            except httpx.ConnectError as exc:  # nothing was sent: try the next checked address
                connect_errors.append(f"{address}: {exc}")
            except httpx.HTTPError as exc:
                raise CallbackFailed(f"{type(exc).__name__}: {exc}") from None
        else:
            raise CallbackFailed(f"ConnectError: {'; '.join(connect_errors)}")
    if 200 <= status < 300:
        return status
    if 300 <= status < 400:
        raise CallbackFailed(f"answered {status} redirecting to {location!r}; redirects are not followed", status)
    raise CallbackFailed(f"answered {status}", status)
