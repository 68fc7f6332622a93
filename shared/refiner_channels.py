"""Which refiner versions serve traffic: the ``stable`` and ``canary`` channels of a refiner
name, their history, and the quality tallies that decide a canary's fate.

One Redis document per name, changed only inside WATCH/MULTI transactions, so a promotion
from the CLI and an automatic rollback by a worker cannot both win::

    refinery:refiner:<name>                 Channels (JSON), history included
    refinery:refiner:<name>:revision        its revision alone, read by workers for every job
    refinery:refiner:<name>:tally:<epoch>   hash: "<version>:jobs|flagged|sum|sum_sq"

A canary's epoch is the revision that made it canary: tallies restart with every canary, so
stable's jobs are compared with the canary's over the same stretch of traffic. Workers read
the document (``worker/refiners.py``); the producer checks pins against the registry.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from datetime import datetime
from typing import Literal

import redis
from pydantic import BaseModel, Field

from shared import keys
from shared.canary import Tally
from shared.contract import utcnow
from shared.errors import InvalidInput, UnknownRefiner

HISTORY_MAX = 100
TALLY_TTL_S = 30 * 24 * 3600


class Change(BaseModel):
    revision: int
    at: datetime = Field(default_factory=utcnow)
    action: Literal["promote", "canary", "rollback"]
    channel: Literal["stable", "canary"]
    version: str
    by: str
    reason: str | None = None
    # For a rollback by the system: each arm's tally when it decided.
    tallies: dict[str, dict[str, float | int]] | None = None


class Channels(BaseModel):
    name: str
    stable: str | None = None
    canary: str | None = None
    canary_fraction: float = 0.0
    canary_epoch: int | None = None
    revision: int = 0
    history: list[Change] = Field(default_factory=list)

    def ref(self, version: str) -> str:
        return f"{self.name}@{version}"

    def draw(self, job_id: str) -> str | None:
        """The version an unpinned job runs: canary for a ``canary_fraction`` share of job
        ids, stable for the rest. A function of the id, so a redelivered job draws the same."""
        if self.canary is not None and _unit(job_id) < self.canary_fraction:
            return self.canary
        return self.stable

    def _changed(self, change: Change) -> None:
        self.revision = change.revision
        self.history = [*self.history, change][-HISTORY_MAX:]

    def previous_stable(self) -> str | None:
        """The stable version before the current one: promotions stack up, and each rollback
        of stable takes the top one off."""
        stack: list[str] = []
        for change in self.history:
            if change.action == "promote" and (not stack or stack[-1] != change.version):
                stack.append(change.version)
            elif change.action == "rollback" and change.channel == "stable" and stack:
                stack.pop()
        return stack[-2] if len(stack) > 1 else None


def _unit(job_id: str) -> float:
    """A job id's uniform draw in [0, 1)."""
    return int.from_bytes(hashlib.sha256(job_id.encode()).digest()[:8], "big") / 2**64


def check_fraction(fraction: float) -> float:
    if not 0.0 <= fraction <= 1.0:  # also refuses NaN
        raise InvalidInput(f"must be between 0 and 1, got {fraction}", field="canary")
    return fraction


class ChannelStore:
    def __init__(self, client: redis.Redis) -> None:
        self.redis = client

    def get(self, name: str) -> Channels:
        raw = self.redis.get(keys.refiner_channels_key(name))
        if raw is None:
            raise UnknownRefiner(f"refiner {name!r} has no channels: promote a version first", field="name")
        return Channels.model_validate_json(raw)

    def revision(self, name: str) -> int | None:
        raw = self.redis.get(keys.refiner_revision_key(name))
        return int(raw) if raw is not None else None

    def find(self, name: str) -> Channels | None:
        try:
            return self.get(name)
        except UnknownRefiner:
            return None

    def promote(self, name: str, version: str, by: str, canary: float | None = None) -> Channels:
        """Make ``version`` stable, or with ``canary`` the canary taking that share of traffic.
        Promoting the canary to stable ends the canary."""

        def change(channels: Channels) -> Channels:
            if canary is None:
                if channels.stable == version and channels.canary is None:
                    return channels
                if channels.canary == version:
                    channels.canary, channels.canary_fraction, channels.canary_epoch = None, 0.0, None
                channels.stable = version
                channels._changed(
                    Change(revision=channels.revision + 1, action="promote", channel="stable", version=version, by=by)
                )
                return channels
            check_fraction(canary)
            if channels.stable is None:
                raise InvalidInput(f"{name} has no stable version to compare a canary with", field="canary")
            if channels.stable == version:
                raise InvalidInput(f"{name}@{version} is already stable", field="canary")
            if channels.canary != version:
                channels.canary_epoch = channels.revision + 1  # a new canary: new tallies
            channels.canary, channels.canary_fraction = version, canary
            channels._changed(
                Change(
                    revision=channels.revision + 1,
                    action="canary",
                    channel="canary",
                    version=version,
                    by=by,
                    reason=f"{canary:.0%} of traffic",
                )
            )
            return channels

        return self._transact(name, change)

    def rollback(
        self,
        name: str,
        by: str,
        reason: str | None = None,
        *,
        canary: str | None = None,
        tallies: dict[str, dict[str, float | int]] | None = None,
    ) -> Channels:
        """End the canary, or with none, go back to the previous stable. With ``canary``
        (the system's own rollback), only if that version is still the canary."""

        def change(channels: Channels) -> Channels:
            if canary is not None and channels.canary != canary:
                return channels  # promoted, rolled back or replaced meanwhile: nothing to undo
            if channels.canary is not None:
                version = channels.canary
                channels.canary, channels.canary_fraction, channels.canary_epoch = None, 0.0, None
                channels._changed(
                    Change(
                        revision=channels.revision + 1,
                        action="rollback",
                        channel="canary",
                        version=version,
                        by=by,
                        reason=reason,
                        tallies=tallies,
                    )
                )
                return channels
            previous = channels.previous_stable()
            if previous is None:
                raise InvalidInput(f"{name} has no canary and no earlier stable version to roll back to", field="name")
            assert channels.stable is not None
            rolled_back = channels.stable
            channels.stable = previous
            channels._changed(
                Change(
                    revision=channels.revision + 1,
                    action="rollback",
                    channel="stable",
                    version=rolled_back,
                    by=by,
                    reason=reason or f"back to {previous}",
                )
            )
            return channels

        return self._transact(name, change)

    def _transact(self, name: str, change: Callable[[Channels], Channels]) -> Channels:
        key = keys.refiner_channels_key(name)
        result: list[Channels] = []

        def attempt(pipe: redis.client.Pipeline) -> None:
            raw = pipe.get(key)
            channels = Channels.model_validate_json(raw) if raw else Channels(name=name)
            revision = channels.revision
            channels = change(channels)
            result[:] = [channels]
            if channels.revision != revision:
                pipe.multi()
                pipe.set(key, channels.model_dump_json())
                pipe.set(keys.refiner_revision_key(name), channels.revision)

        self.redis.transaction(attempt, key)
        return result[0]

    # -- quality tallies ------------------------------------------------------------------

    def add_marks(self, name: str, epoch: int, marks: list[tuple[str, float, bool]]) -> None:
        """Add refined jobs' (version, detail ratio, flagged) to the canary epoch's tallies."""
        key = keys.refiner_tally_key(name, epoch)
        pipe = self.redis.pipeline(transaction=True)
        for version, ratio, flagged in marks:
            pipe.hincrby(key, f"{version}:jobs", 1)
            pipe.hincrby(key, f"{version}:flagged", int(flagged))
            pipe.hincrbyfloat(key, f"{version}:sum", ratio)
            pipe.hincrbyfloat(key, f"{version}:sum_sq", ratio * ratio)
        pipe.expire(key, TALLY_TTL_S)
        pipe.execute()

    def tallies(self, name: str, epoch: int) -> dict[str, Tally]:
        raw = {k.decode(): float(v) for k, v in self.redis.hgetall(keys.refiner_tally_key(name, epoch)).items()}  # type: ignore[union-attr]
        versions = {field.rpartition(":")[0] for field in raw}
        return {
            version: Tally(
                int(raw.get(f"{version}:jobs", 0)),
                int(raw.get(f"{version}:flagged", 0)),
                raw.get(f"{version}:sum", 0.0),
                raw.get(f"{version}:sum_sq", 0.0),
            )
            for version in versions
        }
