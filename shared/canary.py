"""When a canary refiner is worse than stable: the rule the workers apply to live traffic.

Every refined job carries a quality mark (``worker/quality.py``): its detail ratio and
whether it was flagged. Workers add each job's mark to its version's tally in Redis
(``shared.refiner_channels``), so the tallies count every worker's jobs. The canary is
rolled back when, with at least ``min_jobs`` jobs in each arm since it started, either

- its flagged rate is higher than stable's by at least ``flag_margin`` (absolute) and by
  ``z`` standard errors (two-proportion z statistic, pooled), or
- its mean detail ratio is lower than stable's by at least ``detail_margin`` (relative to
  stable's mean) and by ``z`` standard errors (Welch's z statistic).

Both conditions of a signal must hold: ``z`` guards against noise in small samples, the
margin against rolling back a canary that is worse by a statistically clear but negligible
amount in large ones. The rule is applied again after every few jobs, which inflates the
false-rollback rate of a plain test; ``benchmarks/canary_rule.py`` measures the rate of the
rule as applied (after every job) on canaries as good as stable, and its power on worse ones.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from shared.settings import Settings


@dataclass(frozen=True)
class Tally:
    """One version's quality marks since the canary started: sums, so workers can add to it."""

    jobs: int = 0
    flagged: int = 0
    detail_sum: float = 0.0
    detail_sum_sq: float = 0.0

    @property
    def flagged_rate(self) -> float:
        return self.flagged / self.jobs if self.jobs else 0.0

    @property
    def detail_mean(self) -> float:
        return self.detail_sum / self.jobs if self.jobs else 0.0

    @property
    def detail_variance(self) -> float:
        """The sample variance (n - 1), never negative despite float cancellation."""
        if self.jobs < 2:
            return 0.0
        return max(0.0, (self.detail_sum_sq - self.jobs * self.detail_mean**2) / (self.jobs - 1))

    def add(self, detail_ratio: float, flagged: bool) -> Tally:
        return Tally(
            self.jobs + 1,
            self.flagged + flagged,
            self.detail_sum + detail_ratio,
            self.detail_sum_sq + detail_ratio**2,
        )

    def summary(self) -> dict[str, float | int]:
        return {
            "jobs": self.jobs,
            "flagged_rate": round(self.flagged_rate, 4),
            "detail_mean": round(self.detail_mean, 4),
            "detail_sd": round(math.sqrt(self.detail_variance), 4),
        }


@dataclass(frozen=True)
class CanaryRule:
    min_jobs: int = 50
    z: float = 3.5
    flag_margin: float = 0.05
    detail_margin: float = 0.05

    @classmethod
    def from_settings(cls, settings: Settings) -> CanaryRule:
        return cls(
            settings.canary_min_jobs, settings.canary_z, settings.canary_flag_margin, settings.canary_detail_margin
        )

    def verdict(self, stable: Tally, canary: Tally) -> str | None:
        """Why the canary is worse than stable, or None while it is not (or too few jobs)."""
        if min(stable.jobs, canary.jobs) < self.min_jobs:
            return None
        flag_gap = canary.flagged_rate - stable.flagged_rate
        pooled = (stable.flagged + canary.flagged) / (stable.jobs + canary.jobs)
        flag_se = math.sqrt(pooled * (1 - pooled) * (1 / stable.jobs + 1 / canary.jobs))
        if flag_gap >= self.flag_margin and _z(flag_gap, flag_se) >= self.z:
            return (
                f"flagged rate {canary.flagged_rate:.1%} against stable's {stable.flagged_rate:.1%} "
                f"(z = {_z(flag_gap, flag_se):.1f}; {canary.jobs} and {stable.jobs} jobs)"
            )
        detail_gap = stable.detail_mean - canary.detail_mean
        detail_se = math.sqrt(stable.detail_variance / stable.jobs + canary.detail_variance / canary.jobs)
        if detail_gap >= self.detail_margin * abs(stable.detail_mean) and _z(detail_gap, detail_se) >= self.z:
            return (
                f"mean detail ratio {canary.detail_mean:.3f} against stable's {stable.detail_mean:.3f} "
                f"(z = {_z(detail_gap, detail_se):.1f}; {canary.jobs} and {stable.jobs} jobs)"
            )
        return None


def _z(gap: float, standard_error: float) -> float:
    """``gap`` in standard errors; a gap with no spread at all is infinitely clear."""
    if standard_error > 0:
        return gap / standard_error
    return math.inf if gap > 0 else 0.0
