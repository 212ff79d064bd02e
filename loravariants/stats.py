"""Small statistics over seeds: mean with a 95% confidence interval, paired differences.

A comparison runs every row with the same seeds, so two rows are compared *paired*: seed ``s``
of row ``a`` and seed ``s`` of row ``b`` share the data order and (for same-shaped adapters)
the initialisation. The per-seed difference ``d_s = a_s - b_s`` removes the seed-to-seed
spread both rows share; its mean and Student-t 95% interval say whether the rows differ::

    d_s = a_s - b_s  (seeds run by both)      mean(d) ± t_{0.975, n-1} · sd(d) / sqrt(n)
    "resolved" when the interval excludes 0; with one common seed nothing is resolved.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

__all__ = ["PairedDifference", "mean_ci", "min_max", "paired_difference"]


def _t975(dof: int) -> float:
    from scipy.stats import t

    return float(t.ppf(0.975, dof))


def _finite(values: Sequence[float | None]) -> list[float]:
    return [float(v) for v in values if v is not None and math.isfinite(float(v))]


def mean_ci(values: Sequence[float | None]) -> tuple[float, float]:
    """Mean and the half-width of its 95% confidence interval (Student t; 0 for one value).

    ``None`` and non-finite values are dropped; no value left gives ``(nan, nan)``.
    """
    values = _finite(values)
    if not values:
        return float("nan"), float("nan")
    n = len(values)
    mean = sum(values) / n
    if n == 1:
        return mean, 0.0
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    return mean, _t975(n - 1) * sd / math.sqrt(n)


def min_max(values: Sequence[float | None]) -> tuple[float, float]:
    """``(min, max)`` of the finite values; ``(nan, nan)`` when there are none."""
    values = _finite(values)
    return (min(values), max(values)) if values else (float("nan"), float("nan"))


@dataclass(frozen=True)
class PairedDifference:
    """``a - b`` over the seeds both rows ran.

    Attributes:
        seeds: the common seeds used, ascending.
        differences: ``a_s - b_s`` per seed, in ``seeds`` order.
        mean: mean difference (``nan`` without a common seed).
        half_width: half-width of the 95% Student-t interval (``nan`` with fewer than 2 seeds).
        resolved: the interval excludes 0 (needs at least 2 seeds).
    """

    seeds: tuple[int, ...]
    differences: tuple[float, ...]
    mean: float
    half_width: float
    resolved: bool

    @property
    def low(self) -> float:
        return self.mean - self.half_width

    @property
    def high(self) -> float:
        return self.mean + self.half_width

    def describe(self, pattern: str = "{:+.3f}") -> str:
        """One phrase: ``+1.234 [0.5, 2.0] over 3 seeds, resolved``."""
        n = len(self.seeds)
        if n == 0:
            return "no common seed"
        if n == 1:
            return f"{pattern.format(self.mean)} from one seed: not resolved (needs 2+ seeds)"
        verdict = "resolved" if self.resolved else "not resolved (CI contains 0)"
        return (
            f"{pattern.format(self.mean)} [{pattern.format(self.low)}, "
            f"{pattern.format(self.high)}] over {n} seeds: {verdict}"
        )


def paired_difference(a: Mapping[int, float], b: Mapping[int, float]) -> PairedDifference:
    """Per-seed paired difference ``a - b`` of one metric, with its 95% CI.

    Args:
        a, b: ``{seed: metric value}`` of two rows; seeds missing from either row, and
            non-finite values, are left out.

    Returns:
        A :class:`PairedDifference`; ``resolved`` is True only with 2+ common seeds and a
        95% interval that excludes 0.
    """
    seeds = sorted(
        s
        for s in set(a) & set(b)
        if a[s] is not None
        and b[s] is not None
        and math.isfinite(float(a[s]))
        and math.isfinite(float(b[s]))
    )
    diffs = tuple(float(a[s]) - float(b[s]) for s in seeds)
    if not diffs:
        return PairedDifference((), (), float("nan"), float("nan"), False)
    mean, half = mean_ci(diffs)
    if len(diffs) < 2:
        return PairedDifference(tuple(seeds), diffs, mean, float("nan"), False)
    return PairedDifference(tuple(seeds), diffs, mean, half, mean - half > 0 or mean + half < 0)
