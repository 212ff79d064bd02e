"""Statistics for comparisons: seeds, evaluation documents, passkey prompts, power.

A comparison runs every row with the same seeds, so two rows are compared *paired*: seed ``s``
of row ``a`` and seed ``s`` of row ``b`` share the data order and (for same-shaped adapters)
the initialisation. The per-seed difference ``d_s = a_s - b_s`` removes the seed-to-seed
spread both rows share; its mean and Student-t 95% interval say whether the rows differ::

    d_s = a_s - b_s  (seeds run by both)      mean(d) ± t_{0.975, n-1} · sd(d) / sqrt(n)
    "resolved" when the interval excludes 0; with one common seed nothing is resolved.

Every row is also scored on the *same* evaluation documents, whose sampling error the seeds
do not see (two untrained rows have zero seed spread). :func:`hierarchical_bootstrap`
resamples seeds and documents, one draw shared by both rows; :func:`hierarchical_t_interval`
adds the seeds' t-based variance to the documents' bootstrap variance (right with few seeds,
where a bootstrap over seeds is too narrow). The rest of the module: Holm's
step-down over a declared family of contrasts (:func:`holm`), the exact McNemar test for
per-prompt passkey outcomes (:func:`mcnemar_exact`), the verdict of a contrast
(:func:`contrast_verdict`: floor and ceiling before "not resolved"), the minimum detectable
effect of a paired design (:func:`minimum_detectable_effect`, :func:`seeds_for_mde`) and the
training loss of a run (:func:`final_loss`). docs/statistics.md gives every formula.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from numpy.typing import ArrayLike
from scipy import stats as scipy_stats

__all__ = [
    "MIN_PASSKEY_PROMPTS",
    "BootstrapResult",
    "HolmAdjusted",
    "McNemarResult",
    "PairedDifference",
    "bootstrap_interval",
    "check_passkey_prompts",
    "contrast_verdict",
    "final_loss",
    "hierarchical_bootstrap",
    "hierarchical_t_interval",
    "holm",
    "holm_family",
    "mcnemar_exact",
    "mde_from_se",
    "mean_ci",
    "min_max",
    "minimum_detectable_effect",
    "paired_difference",
    "paired_power",
    "perplexity_of_sums",
    "seeds_for_mde",
]


def _t975(dof: int) -> float:
    return float(scipy_stats.t.ppf(0.975, dof))


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


# --------------------------------------------------------------------------------------------
# Hierarchical bootstrap over seeds and evaluation documents


def perplexity_of_sums(sums: np.ndarray) -> np.ndarray:
    """``exp(sum NLL / sum tokens)``: the perplexity of pooled per-document sums.

    Args:
        sums: ``(..., 2)``; ``[..., 0]`` summed NLL in nats, ``[..., 1]`` the tokens scored.

    Returns:
        ``(...)`` perplexities.
    """
    return np.exp(sums[..., 0] / sums[..., 1])


@dataclass(frozen=True)
class BootstrapResult:
    """A bootstrap estimate: ``statistic(a) - statistic(b)``, or ``statistic(a)`` for one row.

    Attributes:
        estimate: the statistic on the data as observed (every seed and document once).
        low, high: the percentile interval of the resampled statistics.
        se: standard deviation of the resampled statistics (the bootstrap standard error).
        p_value: two-sided bootstrap p-value for "the difference is 0" (``nan`` for one row).
        resamples: the number of resamples ``B``.
        confidence: the interval's coverage, e.g. 0.95.
        dof: degrees of freedom of the t interval (:func:`hierarchical_t_interval`); ``inf``
            for the percentile bootstrap. ``mde_from_se(se, dof=dof)`` is the contrast's MDE.
    """

    estimate: float
    low: float
    high: float
    se: float
    p_value: float
    resamples: int
    confidence: float
    dof: float = math.inf


def _sums_array(x: ArrayLike, name: str) -> np.ndarray:
    """``x`` as a float64 ``(seeds, documents, k)`` array: 2-D input is one seed."""
    arr = np.asarray(x, dtype=np.float64)
    if arr.ndim == 2:
        arr = arr[None]
    if arr.ndim != 3 or 0 in arr.shape:
        raise ValueError(
            f"{name} must have shape (seeds, documents, k) or (documents, k), got {arr.shape}"
        )
    if not np.isfinite(arr).all():
        raise ValueError(f"{name} holds non-finite values")
    return np.ascontiguousarray(arr)


def _resampled(
    rows: Sequence[np.ndarray],
    statistic: Callable[[np.ndarray], np.ndarray],
    resamples: int,
    seed: int,
) -> np.ndarray:
    """``(B, len(rows))``: the statistic of each row under ``B`` shared resamples.

    Resample ``b`` draws seeds with replacement (multiplicity ``w[b, s]``) and, independently,
    documents with replacement (``v[b, d]``); row ``r``'s pooled sums are
    ``sum_{s,d} w[b, s] · v[b, d] · x_r[s, d, :]``. Seeds and documents are crossed (every
    seed scores the same documents), so one document draw serves every seed of a resample;
    the same ``(w, v)`` serve every row, which makes the contrast paired.
    """
    n_seeds, n_docs, k = rows[0].shape
    rng = np.random.default_rng(seed)
    # (documents, seeds * k): one matrix product per row sums every document draw per seed
    by_doc = [x.transpose(1, 0, 2).reshape(n_docs, n_seeds * k) for x in rows]
    # resamples per chunk: keeps the (chunk, documents) document weights near 32 MiB
    chunk = max(1, min(resamples, (1 << 22) // n_docs))
    out = np.empty((resamples, len(rows)))
    for start in range(0, resamples, chunk):
        size = min(chunk, resamples - start)
        w = rng.multinomial(n_seeds, np.full(n_seeds, 1 / n_seeds), size=size).astype(float)
        v = rng.multinomial(n_docs, np.full(n_docs, 1 / n_docs), size=size).astype(float)
        for r, x in enumerate(by_doc):
            per_seed = (v @ x).reshape(size, n_seeds, k)  # sum_d v[b, d] x[s, d, :]
            sums = (per_seed * w[:, :, None]).sum(axis=1)  # sum_s w[b, s] (...)
            out[start : start + size, r] = statistic(sums)
    return out


def _check_bootstrap_args(resamples: int, confidence: float) -> None:
    if not isinstance(resamples, int | np.integer) or resamples < 1:
        raise ValueError(f"resamples must be a positive integer, got {resamples!r}")
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence!r}")


def hierarchical_bootstrap(
    a: ArrayLike,
    b: ArrayLike,
    statistic: Callable[[np.ndarray], np.ndarray] = perplexity_of_sums,
    resamples: int = 4000,
    confidence: float = 0.95,
    seed: int = 0,
) -> BootstrapResult:
    """Paired bootstrap of ``statistic(a) - statistic(b)`` over seeds, then documents.

    Each row holds additive per-(seed, document) sums (e.g. summed NLL and tokens scored);
    the statistic is computed from the sums pooled over the resampled seeds and documents, so
    perplexity is ``exp(sum NLL / sum tokens)`` of each resample, not a mean of per-document
    perplexities. Both rows see the same resample, so two untrained rows scored on the same
    documents get an interval from document sampling alone::

        resample b:  seeds s*_1..s*_S ~ U{seeds},  documents d*_1..d*_D ~ U{documents}
        Δ*_b = f(Σ_{s*,d*} a[s*, d*]) - f(Σ_{s*,d*} b[s*, d*])
        CI = [q_{(1-c)/2}(Δ*), q_{(1+c)/2}(Δ*)]
        p  = min(1, 2 · min(1 + #{Δ*_b ≤ 0}, 1 + #{Δ*_b ≥ 0}) / (B + 1))

    Args:
        a, b: ``(seeds, documents, k)`` arrays (``(documents, k)`` for one seed), the same
            shape; seed ``s`` and document ``d`` mean the same seed and document in both.
        statistic: maps pooled sums ``(..., k)`` to ``(...)``; default
            :func:`perplexity_of_sums` (``k = 2``: NLL, tokens).
        resamples: ``B``; 2000-10000 take well under a second for 3 seeds x 100 documents.
        confidence: coverage of the percentile interval.
        seed: seeds the ``numpy`` Generator; the same inputs and seed give the same result.

    Returns:
        A :class:`BootstrapResult`. Identical rows give exactly ``[0, 0]`` and ``p = 1``.

    Raises:
        ValueError: shapes differ or are not 2-/3-D, values are non-finite, or ``resamples``
            / ``confidence`` are out of range.
    """
    _check_bootstrap_args(resamples, confidence)
    xa, xb = _sums_array(a, "a"), _sums_array(b, "b")
    if xa.shape != xb.shape:
        raise ValueError(f"a and b must have the same shape, got {xa.shape} and {xb.shape}")
    if np.array_equal(xa, xb):
        xb = xa  # one array: the difference is exactly 0, not rounding noise
    estimate = float(statistic(xa.sum(axis=(0, 1))) - statistic(xb.sum(axis=(0, 1))))
    stats = _resampled([xa, xb], statistic, resamples, seed)
    diffs = stats[:, 0] - stats[:, 1]
    tail = (1 - confidence) / 2
    low, high = np.quantile(diffs, [tail, 1 - tail])
    below, above = int((diffs <= 0).sum()), int((diffs >= 0).sum())
    p = min(1.0, 2 * (1 + min(below, above)) / (resamples + 1))
    se = float(diffs.std(ddof=1)) if resamples > 1 else float("nan")
    return BootstrapResult(estimate, float(low), float(high), se, p, resamples, confidence)


def hierarchical_t_interval(
    a: ArrayLike,
    b: ArrayLike,
    statistic: Callable[[np.ndarray], np.ndarray] = perplexity_of_sums,
    resamples: int = 4000,
    confidence: float = 0.95,
    seed: int = 0,
) -> BootstrapResult:
    """``statistic(a) - statistic(b)`` with a t interval that adds seed and document variance.

    The percentile bootstrap over few seeds is too narrow (3 seeds: 79% coverage of a nominal
    95%, docs/statistics.md). This interval takes the seed part from the per-seed contrasts,
    with Student-t tails, and the document part from a paired bootstrap over documents (every
    seed's sums pooled, one document draw shared by both rows)::

        Δ   = f(Σ_{s,d} a) - f(Σ_{s,d} b)            Δ_s = f(Σ_d a[s]) - f(Σ_d b[s])
        V_seed = var(Δ_s) / S  (0 for one seed)      V_doc = var*(Δ*)  (documents resampled)
        se = sqrt(V_seed + V_doc),   ν = se^4 / (V_seed^2 / (S - 1))  (Satterthwaite; ∞ if
        V_seed = 0, the document part counting as known)
        CI = Δ ± t_{(1+c)/2, ν} · se,   p = 2 · P(T_ν > |Δ| / se)

    Args:
        a, b, statistic, resamples, confidence, seed: as in :func:`hierarchical_bootstrap`.

    Returns:
        A :class:`BootstrapResult` (``se`` as above). Identical rows give ``[0, 0]`` and
        ``p = 1``; a non-zero difference with nothing to resample (one seed, one document)
        gives ``p = nan``.
    """
    _check_bootstrap_args(resamples, confidence)
    xa, xb = _sums_array(a, "a"), _sums_array(b, "b")
    if xa.shape != xb.shape:
        raise ValueError(f"a and b must have the same shape, got {xa.shape} and {xb.shape}")
    if np.array_equal(xa, xb):
        xb = xa
    n_seeds = xa.shape[0]
    estimate = float(statistic(xa.sum(axis=(0, 1))) - statistic(xb.sum(axis=(0, 1))))
    per_seed = statistic(xa.sum(axis=1)) - statistic(xb.sum(axis=1))  # (S,)
    v_seed = float(per_seed.var(ddof=1)) / n_seeds if n_seeds > 1 else 0.0
    pooled = _resampled([xa.sum(axis=0)[None], xb.sum(axis=0)[None]], statistic, resamples, seed)
    v_doc = float((pooled[:, 0] - pooled[:, 1]).var(ddof=1)) if resamples > 1 else 0.0
    se = math.sqrt(v_seed + v_doc)
    dof = (v_seed + v_doc) ** 2 / (v_seed**2 / (n_seeds - 1)) if v_seed > 0 else math.inf
    tail = scipy_stats.t(dof) if math.isfinite(dof) else scipy_stats.norm()
    half = float(tail.ppf((1 + confidence) / 2)) * se
    if se > 0:
        p = min(1.0, float(2 * tail.sf(abs(estimate) / se)))
    else:
        p = 1.0 if estimate == 0 else float("nan")
    return BootstrapResult(
        estimate, estimate - half, estimate + half, se, p, resamples, confidence, dof
    )


def bootstrap_interval(
    a: ArrayLike,
    statistic: Callable[[np.ndarray], np.ndarray] = perplexity_of_sums,
    resamples: int = 4000,
    confidence: float = 0.95,
    seed: int = 0,
) -> BootstrapResult:
    """The interval of one row's statistic under the same resampling as
    :func:`hierarchical_bootstrap` (``p_value`` is ``nan``).

    Args:
        a: ``(seeds, documents, k)`` or ``(documents, k)`` per-(seed, document) sums.
        statistic, resamples, confidence, seed: as in :func:`hierarchical_bootstrap`.
    """
    _check_bootstrap_args(resamples, confidence)
    xa = _sums_array(a, "a")
    estimate = float(statistic(xa.sum(axis=(0, 1))))
    values = _resampled([xa], statistic, resamples, seed)[:, 0]
    tail = (1 - confidence) / 2
    low, high = np.quantile(values, [tail, 1 - tail])
    se = float(values.std(ddof=1)) if resamples > 1 else float("nan")
    return BootstrapResult(
        estimate, float(low), float(high), se, float("nan"), resamples, confidence
    )


# --------------------------------------------------------------------------------------------
# Multiple comparisons


def _check_p(p: float, where: str) -> float:
    p = float(p)
    if not 0 <= p <= 1:  # also refuses nan
        raise ValueError(f"{where} must be a p-value in [0, 1], got {p!r}")
    return p


def holm(p_values: Sequence[float]) -> list[float]:
    """Holm's step-down adjusted p-values (Holm 1979), in the input order.

    With ``m`` p-values sorted ascending, ``p_(1) ≤ ... ≤ p_(m)``::

        adj_(i) = max_{j ≤ i} min(1, (m - j + 1) · p_(j))

    Rejecting every hypothesis with ``adj ≤ alpha`` controls the family-wise error rate at
    ``alpha`` under any dependence between the tests.

    Args:
        p_values: the raw p-values of one declared family, ``(m,)``.

    Returns:
        ``(m,)`` adjusted p-values, each at least its raw value.

    Raises:
        ValueError: a value outside ``[0, 1]`` (or ``nan``).
    """
    raw = [_check_p(p, f"p_values[{i}]") for i, p in enumerate(p_values)]
    m = len(raw)
    adjusted = [0.0] * m
    running = 0.0
    for rank, i in enumerate(sorted(range(m), key=lambda i: raw[i])):
        running = max(running, min(1.0, (m - rank) * raw[i]))
        adjusted[i] = running
    return adjusted


@dataclass(frozen=True)
class HolmAdjusted:
    """One member of a Holm family: its raw and adjusted p-value, and the family size."""

    raw: float
    adjusted: float
    family_size: int


def holm_family(p_values: Mapping[str, float]) -> dict[str, HolmAdjusted]:
    """:func:`holm` over a named family: ``{contrast: p}`` -> ``{contrast: HolmAdjusted}``."""
    names = list(p_values)
    adjusted = holm([p_values[n] for n in names])
    return {
        n: HolmAdjusted(float(p_values[n]), adj, len(names))
        for n, adj in zip(names, adjusted, strict=True)
    }


# --------------------------------------------------------------------------------------------
# Passkey: paired per-prompt outcomes

MIN_PASSKEY_PROMPTS = 100
"""The fewest prompts per (row, length) for which a passkey verdict is printed: with fewer,
even a 10-point difference in accuracy is rarely detectable (docs/statistics.md)."""


def check_passkey_prompts(n: int) -> None:
    """Refuse, in one line, a passkey verdict on fewer than :data:`MIN_PASSKEY_PROMPTS`."""
    if n < MIN_PASSKEY_PROMPTS:
        raise ValueError(
            f"a passkey verdict needs at least {MIN_PASSKEY_PROMPTS} prompts per row and "
            f"length, got {n}"
        )


@dataclass(frozen=True)
class McNemarResult:
    """Exact McNemar test of two rows' per-prompt outcomes on the same prompts.

    Attributes:
        n: prompts scored by both rows.
        a_only: prompts ``a`` got right and ``b`` wrong (``n10``).
        b_only: prompts ``b`` got right and ``a`` wrong (``n01``).
        difference: ``acc(a) - acc(b) = (n10 - n01) / n``.
        low, high: the Agresti-Min interval of the difference.
        p_value: two-sided exact binomial p-value of ``n10`` out of ``n10 + n01`` at 1/2
            (1 without a discordant pair).
        enough_prompts: ``n >= MIN_PASSKEY_PROMPTS`` (else print no verdict).
    """

    n: int
    a_only: int
    b_only: int
    difference: float
    low: float
    high: float
    p_value: float
    enough_prompts: bool


def _outcomes(x: ArrayLike, name: str) -> np.ndarray:
    arr = np.asarray(x)
    if arr.ndim != 1 or arr.size == 0:
        raise ValueError(f"{name} must be a non-empty 1-D sequence of outcomes")
    if not np.isin(arr, (0, 1)).all():
        raise ValueError(f"{name} must hold only correct/incorrect (True/False or 1/0)")
    return arr.astype(bool)


def mcnemar_exact(
    a_correct: ArrayLike, b_correct: ArrayLike, confidence: float = 0.95
) -> McNemarResult:
    """Exact McNemar test and a difference-in-proportions interval for paired outcomes.

    Prompt ``i`` is the same prompt (key, depth, length) for both rows. Only discordant
    prompts carry information about the difference; under "no difference" each is equally
    likely to favour either row::

        n10 = #{a right, b wrong},  n01 = #{a wrong, b right}
        p   = P_binom(n10 + n01, 1/2)(as or more extreme than n10), two-sided
        Δ   = (n10 - n01) / n
        CI  (Agresti & Min 2005: 1/2 added to each of the four cells, n~ = n + 2)
            Δ~ = (n10 - n01) / n~,
            se = sqrt((n10 + n01 + 1) - (n10 - n01)^2 / n~) / n~,   Δ~ ± z_{(1+c)/2} · se

    The adjusted interval keeps a width when no prompt is discordant (0 of 100 discordant
    does not prove the accuracies equal).

    Args:
        a_correct, b_correct: ``(n,)`` booleans (or 0/1), prompt ``i`` in both.
        confidence: coverage of the interval.

    Returns:
        A :class:`McNemarResult`.

    Raises:
        ValueError: lengths differ, inputs are empty or not 0/1, or ``confidence`` is
            outside ``(0, 1)``.
    """
    a, b = _outcomes(a_correct, "a_correct"), _outcomes(b_correct, "b_correct")
    if a.shape != b.shape:
        raise ValueError(f"a_correct and b_correct differ in length: {a.size} and {b.size}")
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence!r}")
    n = int(a.size)
    n10, n01 = int((a & ~b).sum()), int((~a & b).sum())
    discordant = n10 + n01
    p = float(scipy_stats.binomtest(n10, discordant, 0.5).pvalue) if discordant else 1.0
    n_adj = n + 2
    d_adj = (n10 - n01) / n_adj
    se = math.sqrt(max(0.0, (discordant + 1) - (n10 - n01) ** 2 / n_adj)) / n_adj
    z = float(scipy_stats.norm.ppf((1 + confidence) / 2))
    low, high = max(-1.0, d_adj - z * se), min(1.0, d_adj + z * se)
    return McNemarResult(
        n, n10, n01, (n10 - n01) / n, low, high, min(1.0, p), n >= MIN_PASSKEY_PROMPTS
    )


# --------------------------------------------------------------------------------------------
# Verdicts and power


def contrast_verdict(
    a: float,
    b: float,
    p_adjusted: float,
    *,
    alpha: float = 0.05,
    floor: float | None = None,
    ceiling: float | None = None,
    mde: float | None = None,
) -> str:
    """The verdict of one contrast ``a - b`` after Holm.

    In order: both rows at or below ``floor`` -> ``"uninformative (floor)"``; both at or above
    ``ceiling`` -> ``"uninformative (ceiling)"`` (a metric pinned at its bound cannot show a
    difference, so "not resolved" would read as evidence of equality); ``p_adjusted ≤ alpha``
    -> ``"resolved"``; else ``"not resolved"``, with ``" (MDE x)"`` when ``mde`` is given.
    The decision uses the Holm-adjusted p only: the interval printed beside it is per
    contrast, and reading it as a test would undo the family's correction.

    Args:
        a, b: the two rows' values (e.g. passkey accuracies).
        p_adjusted: the contrast's Holm-adjusted p-value (``nan``: no test was possible).
        alpha: the family-wise error rate.
        floor, ceiling: the metric's bounds (e.g. 0 or chance accuracy, and 1), or None.
        mde: the minimum detectable effect at 80% power, in the contrast's units.

    Returns:
        The verdict string.
    """
    if floor is not None and a <= floor and b <= floor:
        return "uninformative (floor)"
    if ceiling is not None and a >= ceiling and b >= ceiling:
        return "uninformative (ceiling)"
    if math.isfinite(p_adjusted) and p_adjusted <= alpha:
        return "resolved"
    if mde is not None and math.isfinite(mde):
        return f"not resolved (MDE {mde:.3g})"
    return "not resolved"


def _check_power_args(alpha: float, power: float) -> None:
    if not 0 < alpha < 1:
        raise ValueError(f"alpha must be in (0, 1), got {alpha!r}")
    if not 0 < power < 1:
        raise ValueError(f"power must be in (0, 1), got {power!r}")


def mde_from_se(
    se: float, alpha: float = 0.05, power: float = 0.8, dof: float | None = None
) -> float:
    """Minimum detectable effect of a two-sided test with standard error ``se``::

        MDE = (q_{1 - alpha/2} + q_{power}) · se

    with ``q`` the Student-t quantile on ``dof`` degrees of freedom (may be fractional, e.g.
    Satterthwaite's), or the normal quantile when ``dof`` is None or infinite (``se`` from
    :func:`hierarchical_bootstrap` over many documents).
    """
    _check_power_args(alpha, power)
    if dof is None or math.isinf(dof):
        q = scipy_stats.norm.ppf(1 - alpha / 2) + scipy_stats.norm.ppf(power)
    else:
        if not dof > 0:
            raise ValueError(f"dof must be positive, got {dof}")
        q = scipy_stats.t.ppf(1 - alpha / 2, dof) + scipy_stats.t.ppf(power, dof)
    return float(q * se)


def minimum_detectable_effect(sd: float, n: int, alpha: float = 0.05, power: float = 0.8) -> float:
    """Smallest true mean difference a paired t-test detects with probability ``power``::

        MDE = (t_{1 - alpha/2, n-1} + t_{power, n-1}) · sd / sqrt(n)

    The standard approximation to the noncentral-t power (its exact power at this MDE is
    :func:`paired_power`: 0.77 at ``n = 3``, 0.79 at 5, 0.80 from 10 on, at alpha 0.05).

    Args:
        sd: standard deviation of the paired differences (per seed, or per seed x document).
        n: the number of pairs (seeds, or seeds x documents), at least 2.
        alpha: two-sided level; pass the Holm-adjusted level of the contrast's rank for a
            conservative family-wise figure (e.g. ``alpha / m`` for the smallest p).
        power: the target power, e.g. 0.8.

    Returns:
        The MDE in the units of ``sd``.
    """
    if n < 2:
        raise ValueError(f"n must be at least 2 for a paired t-test, got {n}")
    if not sd >= 0:
        raise ValueError(f"sd must be a non-negative number, got {sd!r}")
    return mde_from_se(sd / math.sqrt(n), alpha, power, dof=n - 1)


def paired_power(effect: float, sd: float, n: int, alpha: float = 0.05) -> float:
    """Exact power of the two-sided paired t-test, from the noncentral t distribution::

        power = P(|T| > t_{1-alpha/2, n-1}),  T ~ t'(n - 1, ncp = effect · sqrt(n) / sd)

    Args:
        effect: the true mean paired difference.
        sd: standard deviation of the paired differences, positive.
        n: the number of pairs, at least 2.
        alpha: two-sided level.
    """
    if n < 2:
        raise ValueError(f"n must be at least 2 for a paired t-test, got {n}")
    if not sd > 0:
        raise ValueError(f"sd must be positive, got {sd!r}")
    crit = scipy_stats.t.ppf(1 - alpha / 2, n - 1)
    ncp = effect * math.sqrt(n) / sd
    dist = scipy_stats.nct(n - 1, ncp)
    return float(dist.sf(crit) + dist.cdf(-crit))


def seeds_for_mde(
    sd: float, target: float, alpha: float = 0.05, power: float = 0.8, max_n: int = 100_000
) -> int:
    """The smallest ``n ≥ 2`` with ``minimum_detectable_effect(sd, n, alpha, power) ≤ target``
    (sizes a study from a pilot's sd of paired differences).

    Raises:
        ValueError: ``target`` not positive, or not reachable within ``max_n``.
    """
    if not target > 0:
        raise ValueError(f"target must be a positive effect, got {target!r}")
    _check_power_args(alpha, power)
    if sd == 0:
        return 2
    # the normal approximation is a lower bound (t quantiles exceed normal ones)
    z = scipy_stats.norm.ppf(1 - alpha / 2) + scipy_stats.norm.ppf(power)
    n = max(2, math.floor((z * sd / target) ** 2))
    while minimum_detectable_effect(sd, n, alpha, power) > target:
        n += 1
        if n > max_n:
            raise ValueError(f"an MDE of {target} needs more than {max_n} pairs at sd {sd}")
    return n


# --------------------------------------------------------------------------------------------
# Training loss


def final_loss(losses: Sequence[float], fraction: float = 0.1) -> float:
    """Training loss of a run: the mean of its last ``ceil(fraction · steps)`` logged steps
    (at least one), so one noisy step does not stand for the run.

    Args:
        losses: ``(steps,)`` per-step losses in step order.
        fraction: share of the steps averaged, in ``(0, 1]``.

    Raises:
        ValueError: no loss, or ``fraction`` out of range.
    """
    if not 0 < fraction <= 1:
        raise ValueError(f"fraction must be in (0, 1], got {fraction!r}")
    values = [float(v) for v in losses]
    if not values:
        raise ValueError("final_loss needs at least one logged step")
    k = max(1, math.ceil(fraction * len(values)))
    return sum(values[-k:]) / k
