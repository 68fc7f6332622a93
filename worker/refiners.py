"""The refiner versions a worker serves, and which one each job runs.

``REFINERY_REFINER`` names where they come from:

- a directory, ``identity`` or ``noop``: one refiner, loaded at start, for every job
  (``FixedRefiner``);
- ``registry:NAME``: the versions of NAME in the bucket (``shared.refiner_registry``) that its
  channels name (``shared.refiner_channels``), followed while the worker runs
  (``RegistryRefiners``).

Following works like this. A thread reads the channels every ``refiner_poll_s``, and every
job reads their revision before it draws, so a job submitted after a promotion or rollback
runs what the channels name then. When they change, the worker downloads each new version, checks every file against its published digest,
loads it and runs it once, beside the versions already resident, and only then adopts the
new channels: jobs prepared from then on draw from them, jobs already prepared keep the
version they drew (it is part of their batch key), so a swap drops no job and no batch
mixes versions. A version that fails any step is never served; the worker keeps what it
has and reports the failure (log, Prometheus, its worker record, so ``refinery doctor``).
The same thread applies the canary rule (``shared.canary``) to the tallies every worker
adds to, and rolls a worse canary back.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import socket
import threading
from abc import ABC, abstractmethod
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import redis
import torch

from refiner import Refiner, load_refiner
from shared.callbacks import CallbackFailed, deliver
from shared.canary import CanaryRule
from shared.contract import Quality, utcnow
from shared.errors import RefinerUnavailable, RefineryError, StorageUnavailable
from shared.refiner_channels import Channels, ChannelStore
from shared.refiner_registry import RefinerRegistry, check_name, parse_ref
from shared.settings import Settings
from worker import metrics

logger = logging.getLogger(__name__)

REGISTRY_SCHEME = "registry:"


class RefinerSource(ABC):
    """What the worker asks of its refiners, whichever way they are provided."""

    @abstractmethod
    def choose(self, job_id: str, pin: str | None) -> str:
        """The version a job runs (``pin``: the one it asked for), resident once this returns.
        Raises ``RefinerUnavailable`` when this worker cannot run it."""

    @abstractmethod
    def get(self, version: str) -> Refiner:
        """The resident refiner of a version ``choose`` returned."""

    def record(self, version: str, marks: list[Quality]) -> None:
        """Quality marks of jobs that drew ``version`` (pinned jobs are left out: not a random
        draw, they would bias the comparison), for whatever compares versions."""

    def start(self, on_change: Callable[[], None]) -> None:
        """Begin following, once the worker is ready to serve; ``on_change`` is called after
        the worker adopts new channels (to publish its worker record at once)."""

    def stop(self) -> None:
        """Stop following (the worker is shutting down)."""

    @abstractmethod
    def describe(self) -> dict[str, Any]:
        """What this worker serves, for its worker record and ``refinery doctor``."""


class FixedRefiner(RefinerSource):
    def __init__(self, refiner: Refiner) -> None:
        self.refiner = refiner

    def choose(self, job_id: str, pin: str | None) -> str:
        if pin is not None and pin != self.refiner.version:
            raise RefinerUnavailable(
                f"this worker serves only {self.refiner.version}, not {pin}", field="refiner_version"
            )
        return self.refiner.version

    def get(self, version: str) -> Refiner:
        return self.refiner

    def describe(self) -> dict[str, Any]:
        return {"refiner": self.refiner.version}


class RegistryRefiners(RefinerSource):
    def __init__(
        self,
        name: str,
        settings: Settings,
        channels: ChannelStore,
        registry: RefinerRegistry,
        device: torch.device,
        dtype: torch.dtype,
        warm_side: int,
    ) -> None:
        self.name = name
        self.settings = settings
        self.channels = channels
        self.registry = registry
        self.device, self.dtype, self.warm_side = device, dtype, warm_side
        self.rule = CanaryRule.from_settings(settings)
        # Per process: workers on one node judge the same tallies, and each must tell its own
        # rollback from its neighbour's (one announcement, one count in the metrics).
        self.by = f"system:{socket.gethostname()}:{os.getpid()}"
        self._resident: OrderedDict[str, Refiner] = OrderedDict()  # ref -> refiner, least recently used first
        self._failed: dict[str, str] = {}  # ref -> why it is never served
        self._adopted: Channels | None = None
        self._complete = False  # whether the adopted revision loaded all it could (no S3 outage)
        self._lock = threading.RLock()  # resident, failed, adopted
        self._loading = threading.Lock()  # one download and load at a time
        self._syncing = threading.Lock()  # one adoption at a time (the follower, or a job)
        self._stopped = threading.Event()
        self._thread: threading.Thread | None = None
        self._on_change: Callable[[], None] = lambda: None
        self.sync()  # the first versions load before the worker takes jobs

    # -- what jobs use --------------------------------------------------------------------

    def choose(self, job_id: str, pin: str | None) -> str:
        if pin is not None:
            name, version = parse_ref(pin, field="refiner_version")
            if name != self.name:
                raise RefinerUnavailable(f"this worker serves {self.name}, not {pin}", field="refiner_version")
            return self._ensure(version)
        self._catch_up()
        with self._lock:
            adopted = self._adopted
        drawn = adopted.draw(job_id) if adopted is not None else None
        if drawn is None:
            raise RefinerUnavailable(
                f"refiner {self.name} has no stable version this worker can serve; "
                f"promote one with `refinery refiner promote {self.name}@VERSION`",
                field="refiner",
            )
        return self._ensure(drawn)

    def get(self, version: str) -> Refiner:
        with self._lock:
            refiner = self._resident.get(version)
            if refiner is not None:
                self._resident.move_to_end(version)
                return refiner
        # Evicted since its job chose it (a burst of pins): load it again.
        return self._resident_or_load(parse_ref(version)[1])

    def record(self, version: str, marks: list[Quality]) -> None:
        with self._lock:
            adopted = self._adopted
        if not marks or adopted is None or adopted.canary_epoch is None:
            return
        if version not in (adopted.ref(adopted.canary or ""), adopted.ref(adopted.stable or "")):
            return
        try:
            self.channels.add_marks(
                self.name, adopted.canary_epoch, [(version, mark.detail_ratio, mark.flagged) for mark in marks]
            )
        except redis.RedisError:  # a lost mark only delays a verdict; the jobs themselves succeeded
            logger.warning("could not tally the quality of %s", version, exc_info=True)

    def _catch_up(self) -> None:
        """Adopt a change the follower has not seen yet (one small GET per job)."""
        try:
            revision = self.channels.revision(self.name)
        except redis.RedisError:
            return  # the job runs what is adopted; the follower keeps trying
        with self._lock:
            adopted = self._adopted
        if revision is not None and (adopted is None or revision != adopted.revision):
            self.sync()

    def _ensure(self, version: str) -> str:
        ref = f"{self.name}@{version}"
        with self._lock:
            if ref in self._failed:
                raise RefinerUnavailable(f"{ref} is not served: {self._failed[ref]}", field="refiner_version")
            if ref in self._resident:
                return ref
        self._resident_or_load(version)
        return ref

    # -- following the channels ----------------------------------------------------------

    def start(self, on_change: Callable[[], None]) -> None:
        self._on_change = on_change
        self._thread = threading.Thread(target=self._follow, name="refiner-follower", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stopped.set()

    def _follow(self) -> None:
        while not self._stopped.wait(self.settings.refiner_poll_s):
            try:
                self.sync()
                self.judge()
            except Exception:  # Redis or S3 away for a moment: the next round tries again
                logger.warning("following refiner %s failed", self.name, exc_info=True)

    def sync(self) -> None:
        """Adopt the channels as they are now, loading their versions first."""
        with self._syncing:
            self._sync()

    def _sync(self) -> None:
        channels = self.channels.find(self.name)
        with self._lock:
            adopted = self._adopted
        if channels is None or (adopted is not None and channels.revision == adopted.revision and self._complete):
            return
        served, complete = channels.model_copy(), True
        for channel in ("stable", "canary"):
            version = getattr(channels, channel)
            if version is None:
                continue
            try:
                self._ensure(version)
            except (RefinerUnavailable, StorageUnavailable) as exc:
                complete = complete and isinstance(exc, RefinerUnavailable)  # an outage: try again next round
                logger.error("refiner %s: %s; keeping what this worker serves", channels.ref(version), exc.message)
                # Keep serving what is loaded: the previous stable, or no canary.
                setattr(served, channel, adopted.stable if channel == "stable" and adopted else None)
        if served.canary is None:
            served.canary_fraction = 0.0
        with self._lock:
            self._adopted, self._complete = served, complete
            keep = {served.ref(v) for v in (served.stable, served.canary) if v is not None}
            while len(self._resident) > max(self.settings.refiner_max_resident, len(keep)):
                oldest = next(ref for ref in self._resident if ref not in keep)
                del self._resident[oldest]
                metrics.REFINER_RESIDENT.labels(oldest).set(0)
        self._on_change()
        logger.info(
            "refiner %s revision %d: stable %s, canary %s at %.0f%%",
            self.name,
            served.revision,
            served.stable,
            served.canary,
            100 * served.canary_fraction,
        )

    def judge(self) -> None:
        """Roll the canary back if the rule finds it worse than stable, across all workers' jobs."""
        with self._lock:
            adopted = self._adopted
        if adopted is None or adopted.canary is None or adopted.stable is None or adopted.canary_epoch is None:
            return
        tallies = self.channels.tallies(self.name, adopted.canary_epoch)
        stable, canary = tallies.get(adopted.ref(adopted.stable)), tallies.get(adopted.ref(adopted.canary))
        if stable is None or canary is None:
            return
        reason = self.rule.verdict(stable, canary)
        if reason is None:
            return
        summary = {"stable": stable.summary(), "canary": canary.summary()}
        after = self.channels.rollback(self.name, self.by, reason, canary=adopted.canary, tallies=summary)
        last = after.history[-1] if after.history else None
        if last is None or last.revision <= adopted.revision or last.action != "rollback" or last.by != self.by:
            return  # another worker (or a person) acted first
        logger.warning("refiner %s: canary %s rolled back: %s", self.name, adopted.canary, reason)
        metrics.REFINER_ROLLBACKS.labels(self.name).inc()
        self._announce_rollback(after, adopted.ref(adopted.canary), reason, summary)
        self.sync()

    def _announce_rollback(self, after: Channels, canary: str, reason: str, tallies: dict[str, Any]) -> None:
        url = self.settings.refiner_events_url
        if url is None:
            return
        payload = {
            "type": "refiner.rolled_back",
            "timestamp": utcnow().isoformat(),
            "data": {
                "name": self.name,
                "version": canary,
                "stable": after.ref(after.stable or ""),
                "reason": reason,
                "tallies": tallies,
                "revision": after.revision,
            },
        }
        threading.Thread(target=self._deliver, args=(url, payload, after.revision), daemon=True).start()

    def _deliver(self, url: str, payload: dict[str, Any], revision: int) -> None:
        secret = self.settings.callback_secret.get_secret_value() if self.settings.callback_secret else None
        for attempt in range(self.settings.callback_max_retries + 1):
            try:
                deliver(
                    url,
                    payload,
                    msg_id=f"msg_refiner_{self.name}_{revision}",
                    secret=secret,
                    timeout_s=self.settings.callback_timeout_s,
                    allowlist=self.settings.callback_allowlist,
                )
                return
            except CallbackFailed as exc:
                logger.warning("refiner event to %s failed (%s); attempt %d", url, exc, attempt + 1)
            except RefineryError as exc:  # refused: a private address, a malformed URL
                logger.error("refiner event to %s refused: %s", url, exc)
                return
            if self._stopped.wait(min(self.settings.callback_backoff_max_s, 2**attempt)):
                return

    # -- loading --------------------------------------------------------------------------

    def _resident_or_load(self, version: str) -> Refiner:
        ref = f"{self.name}@{version}"
        with self._loading:
            with self._lock:
                if ref in self._resident:
                    return self._resident[ref]
            try:
                refiner = self._load(version)
            except StorageUnavailable:
                raise  # the bucket is away, the version may well be fine: not marked failed
            except RefineryError as exc:
                self._fail(ref, exc.message)
                raise RefinerUnavailable(f"{ref} is not served: {exc.message}", field="refiner_version") from None
            except Exception as exc:  # a file that verifies but does not load (a bad config)
                self._fail(ref, f"{type(exc).__name__}: {exc}")
                raise RefinerUnavailable(f"{ref} failed to load: {exc}", field="refiner_version") from None
            with self._lock:
                self._resident[ref] = refiner
            metrics.REFINER_RESIDENT.labels(ref).set(1)
            return refiner

    def _load(self, version: str) -> Refiner:
        directory: Path = self.registry.download(self.name, version, self.settings.model_cache_dir / "refiners")
        refiner = dataclasses.replace(
            load_refiner(directory, self.device, self.dtype), version=f"{self.name}@{version}"
        )
        return _warmed(refiner, self.warm_side)

    def _fail(self, ref: str, reason: str) -> None:
        with self._lock:
            self._failed[ref] = reason
        metrics.REFINER_FAILURES.labels(ref).inc()
        logger.error("refiner %s will not be served: %s", ref, reason)

    def describe(self) -> dict[str, Any]:
        with self._lock:
            adopted = self._adopted
            return {
                "refiner": adopted.ref(adopted.stable) if adopted and adopted.stable else None,
                "refiner_channels": {
                    "name": self.name,
                    "revision": adopted.revision if adopted else None,
                    "stable": adopted.stable if adopted else None,
                    "canary": adopted.canary if adopted else None,
                    "canary_fraction": adopted.canary_fraction if adopted else 0.0,
                },
                "refiner_resident": list(self._resident),
                "refiner_failures": dict(self._failed),
            }


def refiner_source(settings: Settings, device: torch.device, dtype: torch.dtype, warm_side: int) -> RefinerSource:
    """The worker's refiners, as ``REFINERY_REFINER`` names them."""
    setting = settings.refiner
    if setting is not None and setting.startswith(REGISTRY_SCHEME):
        from shared.objects import ObjectStore
        from shared.redis_client import connect

        name = check_name(setting.removeprefix(REGISTRY_SCHEME))
        registry = RefinerRegistry(ObjectStore(settings))
        return RegistryRefiners(name, settings, ChannelStore(connect(settings)), registry, device, dtype, warm_side)
    return FixedRefiner(_warmed(load_refiner(setting, device, dtype), warm_side))


def _warmed(refiner: Refiner, side: int) -> Refiner:
    """Run it once, before any job: the first call pays for kernel selection and allocation."""
    refiner.refine_and_score(torch.zeros(1, 3, side, side, device=refiner.network.device))
    logger.info("refiner %s loaded and warmed up", refiner.version)
    return refiner
