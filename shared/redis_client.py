"""The one place a redis-py client is made from the settings: straight to a Redis URL, or
to the primary that Redis Sentinel names (``sentinel://h1:26379;sentinel://h2:26379/0``,
the way Celery spells it, with ``redis_sentinel_master``).

Either way the client rides out a failover or a restart by itself: a call that meets a
lost connection, a timeout or a demoted primary (``READONLY``) reconnects (behind
Sentinel, to whichever node is primary now) and runs again, for up to ``redis_retry_s``.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar, cast
from urllib.parse import unquote, urlsplit

import redis
from redis.backoff import EqualJitterBackoff, NoBackoff
from redis.exceptions import ReadOnlyError
from redis.retry import Retry
from redis.sentinel import Sentinel, SentinelManagedConnection

from shared.errors import InvalidInput
from shared.settings import Settings

T = TypeVar("T")

# A peer that vanishes without closing the socket (a host lost, a partition) must not hang
# a call forever: it times out, and the retry reconnects.
SOCKET_TIMEOUT_S = 10.0
SENTINEL_TIMEOUT_S = 1.0


class DeadlineRetry(Retry):
    """redis-py's Retry, bounded by time instead of a count.

    redis-py retries at two levels that nest (the command, and the connect inside it), so
    a count multiplies; a deadline does not: the outer call gives up once its own time is
    spent, whatever the inner one did meanwhile. The first failure is always retried, at
    once: a pooled connection that Redis closed (a restart) just reconnects."""

    def __init__(self, budget_s: float) -> None:
        errors = (redis.ConnectionError, redis.TimeoutError, socket.timeout, ReadOnlyError)
        super().__init__(EqualJitterBackoff(cap=1.0, base=0.05), retries=-1, supported_errors=errors)
        self.budget_s = budget_s

    def call_with_retry(
        self,
        do: Callable[[], T],
        fail: Callable[..., Any],
        is_retryable: Callable[[Exception], bool] | None = None,
        with_failure_count: bool = False,
    ) -> T:
        deadline = time.monotonic() + self.budget_s
        failures = 0
        while True:
            try:
                return do()
            except self._supported_errors as error:
                # A wrong password does not get better with time.
                if isinstance(error, redis.AuthenticationError):
                    raise
                if is_retryable is not None and not is_retryable(error):
                    raise
                failures += 1
                if with_failure_count:
                    fail(error, failures)
                else:
                    fail(error)
                if failures == 1:
                    continue
                left = deadline - time.monotonic()
                if left <= 0:
                    raise
                time.sleep(min(self._backoff.compute(failures), left))


class PrimaryConnection(SentinelManagedConnection):
    """A connection to the node the Sentinels name as primary, that checks it is one.

    Two ways redis-py (8.2) can land on a replica after a failover, both seen in
    tests/test_failover.py as a job that read as unknown: a command retried on a broken
    connection reconnects to the address it had (``send_packed_command`` calls
    ``connect_check_health``, not ``connect``), which may be the old primary restarted as a
    replica and still empty; and a Sentinel that has not yet learnt of the failover names
    the old primary. So every reconnect goes through the Sentinels, and the role is checked
    once per connection as the Sentinel client guidelines ask; a replica is a connection
    error, which the retry answers by asking the Sentinels again."""

    def send_packed_command(self, command: Any, check_health: bool = True) -> None:
        if not self._sock:
            self.connect()
        super().send_packed_command(command, check_health)

    def connect_to(self, address: tuple[str, int]) -> None:
        super().connect_to(address)
        self.send_command("ROLE")
        role = self.read_response()
        if not (isinstance(role, list) and role and role[0] in (b"master", "master")):
            self.disconnect()
            raise redis.ConnectionError(f"{address[0]}:{address[1]} is not the primary (a Sentinel named it late)")


@dataclass(frozen=True)
class SentinelAddress:
    """What a ``sentinel://`` URL says: the Sentinels, the data nodes' login, the db."""

    sentinels: list[tuple[str, int]]
    username: str | None
    password: str | None
    db: int


def is_sentinel(settings: Settings) -> bool:
    return settings.redis_url.startswith("sentinel://")


def parse_sentinel_url(url: str) -> SentinelAddress:
    """``sentinel://[user:password@]host:port;sentinel://host:port/db``: the login from the
    first address that has one (as kombu takes it). kombu reads the db from whichever
    address it is connected through, so a db other than 0 must be on every address."""
    sentinels: list[tuple[str, int]] = []
    dbs: set[str] = set()
    username = password = None
    for part in url.split(";"):
        parts = urlsplit(part.strip())
        if parts.scheme != "sentinel" or not parts.hostname:
            raise InvalidInput(f"{part!r} is not sentinel://host:port", field="redis_url")
        sentinels.append((parts.hostname, parts.port or 26379))
        if parts.password is not None and password is None:
            username = unquote(parts.username) if parts.username else None
            password = unquote(parts.password)
        dbs.add(parts.path.strip("/") or "0")
    if len(dbs) > 1 or not all(db.isdigit() for db in dbs):
        raise InvalidInput(f"give one db number, the same on every Sentinel address: {url!r}", field="redis_url")
    return SentinelAddress(sentinels, username, password, int(dbs.pop()))


def sentinel_master(settings: Settings) -> str:
    """The monitored primary's name; a ``sentinel://`` URL without one is refused at startup."""
    if not settings.redis_sentinel_master:
        raise InvalidInput(
            "a sentinel:// redis_url needs the name of the primary the Sentinels monitor (e.g. mymaster)",
            field="redis_sentinel_master",
        )
    return settings.redis_sentinel_master


def sentinel_kwargs(settings: Settings) -> dict[str, Any]:
    """How to reach the Sentinels themselves: their password and TLS, short timeouts, and
    no retries (an unreachable Sentinel is skipped for the next one)."""
    kwargs: dict[str, Any] = {
        "socket_timeout": SENTINEL_TIMEOUT_S,
        "socket_connect_timeout": SENTINEL_TIMEOUT_S,
        "retry": Retry(NoBackoff(), 0),
    }
    if settings.redis_sentinel_password is not None:
        kwargs["password"] = settings.redis_sentinel_password.get_secret_value()
    if settings.redis_sentinel_tls:
        kwargs["ssl"] = True
    return kwargs


def min_replicas_ack(settings: Settings) -> int:
    """Replicas a submitted job must reach before submit returns (see ``shared.records``)."""
    if settings.redis_min_replicas_ack is not None:
        return settings.redis_min_replicas_ack
    return 1 if is_sentinel(settings) else 0


def retry_budget_s(settings: Settings) -> float:
    """Seconds a call keeps retrying: long enough for Sentinel to promote a replica."""
    if settings.redis_retry_s is not None:
        return settings.redis_retry_s
    return 30.0 if is_sentinel(settings) else 0.0


def _sentinel(settings: Settings) -> Sentinel:
    return Sentinel(parse_sentinel_url(settings.redis_url).sentinels, sentinel_kwargs=sentinel_kwargs(settings))


def connect(settings: Settings) -> redis.Redis:
    """A client for the primary. Replies are bytes (no ``decode_responses``)."""
    options: dict[str, Any] = {
        "health_check_interval": 30,
        "socket_timeout": SOCKET_TIMEOUT_S,
        "socket_connect_timeout": SOCKET_TIMEOUT_S,
        "retry": DeadlineRetry(retry_budget_s(settings)),
    }
    if not is_sentinel(settings):
        return redis.Redis.from_url(settings.redis_url, **options)
    master = sentinel_master(settings)
    address = parse_sentinel_url(settings.redis_url)
    login: dict[str, Any] = {"username": address.username, "password": address.password}
    if settings.redis_sentinel_tls:
        options["ssl"] = True
    return _sentinel(settings).master_for(master, db=address.db, connection_class=PrimaryConnection, **login, **options)


def sentinel_topology(settings: Settings) -> dict[str, Any]:
    """What the Sentinels say about the primary, for ``refinery doctor``: its address, its
    replicas and their link state, how many Sentinels agree, the quorum and whether it is
    reachable (``SENTINEL CKQUORUM``). Raises ``redis.ConnectionError`` when no Sentinel
    answers."""
    master = sentinel_master(settings)
    sentinels = _sentinel(settings)
    errors: list[str] = []
    for node in sentinels.sentinels:
        try:
            state = cast(dict[str, Any], node.sentinel_master(master))
            replicas = node.sentinel_slaves(master)
            try:
                node.sentinel_ckquorum(master)
                quorum_ok, quorum_note = True, "ok"
            except redis.ResponseError as exc:
                quorum_ok, quorum_note = False, str(exc)
        except (redis.ConnectionError, redis.TimeoutError) as exc:
            errors.append(str(exc))
            continue
        return {
            "master_name": master,
            "primary": f"{state['ip']}:{state['port']}",
            "primary_ok": state["is_master"] and not (state["is_sdown"] or state["is_odown"]),
            "replicas": [
                {"address": f"{r['ip']}:{r['port']}", "ok": not (r["is_sdown"] or r["is_odown"])} for r in replicas
            ],
            "sentinels": state["num-other-sentinels"] + 1,
            "quorum": state["quorum"],
            "quorum_ok": quorum_ok,
            "quorum_note": quorum_note,
        }
    raise redis.ConnectionError(f"no Sentinel answered for {master!r}: {'; '.join(errors)}")
