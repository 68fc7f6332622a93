"""A quality signal in every refined job: its detail ratio, judged against fixed bounds and
against the running distribution of its refiner version's recent scores.

The ratio is the refined image's high-frequency energy over its input's (computed by the
refiner where the images are). A working refiner restores detail and scores above 1; one
that blurs, or a drifted input it no longer suits, shows up as a ratio outside the bounds
or far from what the same weights scored on recent jobs. Flagging marks the job, it does
not fail it: the image is still delivered, and an operator sees the counter rise.
"""

from __future__ import annotations

import statistics
import threading
from collections import defaultdict, deque

from shared.contract import Quality
from shared.settings import Settings

# MAD times this estimates the standard deviation of normally distributed scores.
MAD_TO_SIGMA = 1.4826


class QualityMonitor:
    def __init__(self, settings: Settings) -> None:
        self.low = settings.quality_min_detail_ratio
        self.high = settings.quality_max_detail_ratio
        self.max_sigmas = settings.quality_max_sigmas
        self.min_samples = settings.quality_min_samples
        self._recent: dict[str, deque[float]] = defaultdict(lambda: deque(maxlen=settings.quality_window))
        self._lock = threading.Lock()

    def judge(self, refiner: str, detail_ratio: float) -> Quality:
        """Score one refined image of ``refiner``, then add it to that version's window."""
        with self._lock:
            recent = self._recent[refiner]
            reason = self._outside_bounds(detail_ratio) or self._outlier(recent, detail_ratio)
            recent.append(detail_ratio)
        return Quality(detail_ratio=round(detail_ratio, 4), flagged=reason is not None, reason=reason)

    def _outside_bounds(self, ratio: float) -> str | None:
        if ratio < self.low:
            return f"detail ratio {ratio:.3f} below {self.low}: the refiner removed detail"
        if self.high is not None and ratio > self.high:
            return f"detail ratio {ratio:.3f} above {self.high}: the refiner added noise"
        return None

    def _outlier(self, recent: deque[float], ratio: float) -> str | None:
        if len(recent) < self.min_samples:
            return None
        median = statistics.median(recent)
        # A floor on sigma: a refiner whose scores barely vary (the identity: exactly 1)
        # must not flag rounding noise.
        sigma = max(MAD_TO_SIGMA * statistics.median(abs(x - median) for x in recent), 1e-3 * median, 1e-6)
        if (distance := abs(ratio - median) / sigma) > self.max_sigmas:
            return f"detail ratio {ratio:.3f} is {distance:.1f} robust sigmas from this refiner's median {median:.3f}"
        return None
