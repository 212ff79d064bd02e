"""Findings: every contrast (:mod:`.contrasts`) on its headline metrics, each with an interval,
a raw and a Holm-adjusted p-value, and a verdict.

A table of means with confidence intervals invites reading differences the data cannot carry.
The study instead fixes its questions before the run and answers each contrast ``a - b`` on
the headline metrics (:func:`headline_metrics`: perplexity at the longest length evaluated,
passkey accuracy at the longest passkey length, every lm-eval task)::

    perplexity   hierarchical t interval over seeds x documents (stats.hierarchical_t_interval)
                 from the records' per-document NLL (doc_nll), one resample for both rows;
                 records without doc_nll: the paired t over seeds only, said so
    passkey      exact McNemar over the paired prompts (stats.mcnemar_exact): both rows at 0
                 (1) read "uninformative (floor)" ("(ceiling)"); fewer than
                 stats.MIN_PASSKEY_PROMPTS paired prompts: no verdict, and why
    lm-eval      the paired t over seeds
    then         Holm over each family (contrasts.contrast_families) on the raw p-values;
                 verdict = stats.contrast_verdict on the adjusted p (alpha 0.05); every
                 "not resolved" carries the minimum detectable effect at 80% power

Higher is better for passkey and lm-eval, lower for perplexity.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
from scipy import stats as scipy_stats

from ..stats import (
    MIN_PASSKEY_PROMPTS,
    PairedDifference,
    contrast_verdict,
    holm_family,
    mcnemar_exact,
    mde_from_se,
    minimum_detectable_effect,
    paired_difference,
    perplexity_of_sums,
)
from .contrasts import (
    Contrast,
    contrast_families,
    definition_differences,
    planned_contrasts,
)
from .summary import per_seed, t_interval

__all__ = [
    "ALPHA",
    "Contrast",
    "Finding",
    "comparator_warnings",
    "contrasts_by_length",
    "doc_sums",
    "findings",
    "findings_section",
    "headline_metrics",
    "planned_contrasts",
]

ALPHA = 0.05

SEEDS_X_DOCUMENTS = "seeds × documents"
SEEDS_ONLY = "seeds only"
MCNEMAR = "exact McNemar"


@dataclass(frozen=True)
class Finding:
    """A contrast measured on one metric.

    Attributes:
        contrast: the contrast ``a - b``.
        metric: ``ppl@N``, ``passkey@N`` or ``lm_eval@<task>``.
        difference: the paired difference over seeds of the per-run values (always kept).
        family: its Holm family.
        a_value, b_value: the two rows' values (pooled over the seeds both ran).
        estimate, low, high: ``a - b`` and its 95% interval (by ``method``).
        p, p_holm: raw and Holm-adjusted p-values (``nan``: not tested).
        mde: minimum detectable effect at 80% power, in the metric's units, or None.
        method: how the interval and p were computed (empty: not tested).
        verdict: the reading, e.g. ``"resolved"``, ``"not resolved (MDE 3.1)"``.
        note: why a cell was not tested, or what it fell back to.
    """

    contrast: Contrast
    metric: str
    difference: PairedDifference
    family: str = "planned"
    a_value: float = math.nan
    b_value: float = math.nan
    estimate: float = math.nan
    low: float = math.nan
    high: float = math.nan
    p: float = math.nan
    p_holm: float = math.nan
    mde: float | None = None
    method: str = ""
    verdict: str = ""
    note: str = ""
    floor: float | None = field(default=None, repr=False)
    ceiling: float | None = field(default=None, repr=False)

    @property
    def tested(self) -> bool:
        return math.isfinite(self.p)

    @property
    def resolved(self) -> bool:
        return self.verdict == "resolved"

    def to_dict(self) -> dict[str, Any]:
        d = self.difference
        return {
            "a": self.contrast.a,
            "b": self.contrast.b,
            "question": self.contrast.question,
            "metric": self.metric,
            "family": self.family,
            "seeds": list(d.seeds),
            "differences": list(d.differences),
            "a_value": self.a_value,
            "b_value": self.b_value,
            "estimate": self.estimate,
            "low": self.low,
            "high": self.high,
            "p": self.p,
            "p_holm": self.p_holm,
            "mde": self.mde,
            "method": self.method,
            "verdict": self.verdict,
            "note": self.note,
        }


def headline_metrics(config, results: Mapping[str, Mapping[str, Any]]) -> list[str]:
    """``passkey@N`` at the longest passkey length, ``ppl@N`` at the longest length that a
    finished run was scored at (the 4x length in the quickstart), and ``lm_eval@<task>`` for
    every lm-eval task a finished run was scored on; any of them may be absent."""
    ok = [r for r in results.values() if r.get("status") == "ok"]
    metrics = []
    passkey = {int(k) for r in ok for k in r.get("passkey", {})}
    if passkey:
        metrics.append(f"passkey@{max(passkey)}")
    ppl = {int(k) for r in ok for k in r.get("ppl", {})}
    if ppl:
        metrics.append(f"ppl@{max(ppl)}")
    metrics += [f"lm_eval@{t}" for t in sorted({t for r in ok for t in r.get("lm_eval", {})})]
    return metrics


def _finished(results: Mapping[str, Mapping[str, Any]], row: str) -> dict[int, Mapping[str, Any]]:
    return {
        int(r["seed"]): r
        for r in results.values()
        if r.get("row") == row and r.get("status") == "ok"
    }


def doc_sums(results: Mapping[str, Mapping[str, Any]], row: str, length: str) -> dict[int, Any]:
    """``{seed: (documents, 2) array}`` of a row's per-document ``[nll_sum, tokens]`` at
    ``length``, for its finished runs that recorded them (``record["doc_nll"]``)."""
    out = {}
    for seed, record in _finished(results, row).items():
        pairs = (record.get("doc_nll") or {}).get(length)
        if pairs:
            out[seed] = np.asarray(pairs, dtype=np.float64).reshape(len(pairs), 2)
    return out


def _paired_docs(results, a: str, b: str, length: str) -> tuple[Any, Any] | str:
    """``(A, B)``: ``(seeds, documents, 2)`` arrays over the seeds both rows scored per
    document; or why there are none."""
    xa, xb = doc_sums(results, a, length), doc_sums(results, b, length)
    seeds = sorted(set(xa) & set(xb))
    if not seeds:
        return "records without per-document NLL (doc_nll)"
    shapes = {xa[s].shape for s in seeds} | {xb[s].shape for s in seeds}
    if len(shapes) != 1:
        return "the rows were scored on different documents"
    return np.stack([xa[s] for s in seeds]), np.stack([xb[s] for s in seeds])


def _seed_only(f: Finding, note: str = "") -> Finding:
    """The paired t over seeds: interval, p (scipy's one-sample t on the differences), MDE."""
    d = f.difference
    n = len(d.seeds)
    f = replace(f, estimate=d.mean, low=d.low, high=d.high, note=note)
    if n == 0:
        return replace(f, verdict="no common seed")
    if n == 1:
        return replace(f, verdict="not resolved (needs 2+ seeds)")
    sd = float(np.std(d.differences, ddof=1))
    if sd == 0:
        why = "no spread over seeds: untestable without per-document NLL"
        return replace(f, verdict=f"not resolved ({why})")
    p = float(scipy_stats.ttest_1samp(d.differences, 0.0).pvalue)
    mde = minimum_detectable_effect(sd, n, alpha=ALPHA)
    return replace(f, p=p, mde=mde, method=SEEDS_ONLY)


def _mean_over(values: Mapping[int, float], seeds) -> float:
    kept = [values[s] for s in seeds if s in values]
    return sum(kept) / len(kept) if kept else math.nan


def _perplexity(f: Finding, results, length: str) -> Finding:
    docs = _paired_docs(results, f.contrast.a, f.contrast.b, length)
    if isinstance(docs, str):
        return _seed_only(f, note=f"{SEEDS_ONLY}: {docs}")
    a, b = docs
    res = t_interval(a, b)
    mde = mde_from_se(res.se, alpha=ALPHA, dof=res.dof) if res.se > 0 else None
    verdict = "" if math.isfinite(res.p_value) else "not resolved (no seed or document spread)"
    return replace(
        f,
        verdict=verdict,
        a_value=float(perplexity_of_sums(a.sum(axis=(0, 1)))),
        b_value=float(perplexity_of_sums(b.sum(axis=(0, 1)))),
        estimate=res.estimate,
        low=res.low,
        high=res.high,
        p=res.p_value,
        mde=mde,
        method=SEEDS_X_DOCUMENTS,
    )


def _outcomes(results, row: str, length: str) -> dict[int, list[int]]:
    out = {}
    for seed, record in _finished(results, row).items():
        values = (record.get("passkey_outcomes") or {}).get(length)
        if values:
            out[seed] = [int(v) for v in values]
    return out


def _passkey(f: Finding, results, length: str) -> Finding:
    f = replace(f, floor=0.0, ceiling=1.0)
    oa, ob = _outcomes(results, f.contrast.a, length), _outcomes(results, f.contrast.b, length)
    seeds = [s for s in sorted(set(oa) & set(ob)) if len(oa[s]) == len(ob[s])]
    if seeds:
        a = [v for s in seeds for v in oa[s]]
        b = [v for s in seeds for v in ob[s]]
        f = replace(f, a_value=sum(a) / len(a), b_value=sum(b) / len(b))
    else:
        common = f.difference.seeds
        f = replace(
            f,
            a_value=_mean_over(per_seed(results, f.contrast.a, f.metric), common),
            b_value=_mean_over(per_seed(results, f.contrast.b, f.metric), common),
            estimate=f.difference.mean,
        )
    bound = contrast_verdict(f.a_value, f.b_value, math.nan, floor=0.0, ceiling=1.0)
    if bound.startswith("uninformative"):
        return replace(f, verdict=bound, estimate=f.a_value - f.b_value)
    if not f.difference.seeds and not seeds:
        return replace(f, verdict="no common seed")
    if not seeds:
        return replace(f, verdict="no verdict (per-prompt outcomes not recorded)")
    if len(a) < MIN_PASSKEY_PROMPTS:
        return replace(
            f,
            estimate=f.a_value - f.b_value,
            verdict=f"no verdict ({len(a)} paired prompts, fewer than {MIN_PASSKEY_PROMPTS})",
        )
    res = mcnemar_exact(a, b)
    z = float(scipy_stats.norm.ppf(0.975))
    se = (res.high - res.low) / (2 * z)
    return replace(
        f,
        estimate=res.difference,
        low=res.low,
        high=res.high,
        p=res.p_value,
        mde=mde_from_se(se, alpha=ALPHA),
        method=MCNEMAR,
        note=f"{res.n} paired prompts ({res.a_only} only a right, {res.b_only} only b right)",
    )


def _measured(f: Finding, results) -> Finding:
    group, _, key = f.metric.partition("@")
    if group == "ppl":
        return _perplexity(f, results, key)
    if group == "passkey":
        return _passkey(f, results, key)
    return _seed_only(f)


def findings(config, results: Mapping[str, Mapping[str, Any]]) -> list[Finding]:
    """Every planned contrast on every headline metric, in that order, tested and Holm-adjusted
    per family.

    Args:
        config: the ``ExperimentConfig`` of the comparison.
        results: ``{run key: run record}`` as in ``results.json`` (records carry ``row``,
            ``seed``, ``status``, the ``ppl`` / ``passkey`` dicts keyed by length, and where
            recorded ``doc_nll`` and ``passkey_outcomes``).
    """
    metrics = headline_metrics(config, results)
    contrasts = planned_contrasts(config)
    families = contrast_families(config, contrasts)
    found = [
        _measured(
            Finding(
                c,
                m,
                paired_difference(per_seed(results, c.a, m), per_seed(results, c.b, m)),
                family=families[c],
            ),
            results,
        )
        for c in contrasts
        for m in metrics
    ]
    adjusted: dict[int, float] = {}
    for family in dict.fromkeys(families.values()):
        members = {i: f.p for i, f in enumerate(found) if f.family == family and f.tested}
        for i, h in holm_family({str(i): p for i, p in members.items()}).items():
            adjusted[int(i)] = h.adjusted
    out = []
    for i, f in enumerate(found):
        if i in adjusted:
            verdict = contrast_verdict(
                f.a_value,
                f.b_value,
                adjusted[i],
                alpha=ALPHA,
                floor=f.floor,
                ceiling=f.ceiling,
                mde=f.mde,
            )
            f = replace(f, p_holm=adjusted[i], verdict=verdict)
        out.append(f)
    return out


def contrasts_by_length(config, results: Mapping[str, Mapping[str, Any]]) -> list[Finding]:
    """Every contrast's perplexity difference at every evaluated length, with its interval
    (as in :func:`findings`, untested by Holm: the verdicts are the headline length's)."""
    ok = [r for r in results.values() if r.get("status") == "ok"]
    lengths = sorted({k for r in ok for k in r.get("ppl", {})}, key=int)
    out = []
    for c in planned_contrasts(config):
        for length in lengths:
            m = f"ppl@{length}"
            d = paired_difference(per_seed(results, c.a, m), per_seed(results, c.b, m))
            out.append(_perplexity(Finding(c, m, d), results, length))
    return out


def comparator_warnings(config, results: Mapping[str, Mapping[str, Any]]) -> list[str]:
    """One line per contrast whose rows differ in more than one kind of thing (the factor
    under test and something else), naming every kind (:func:`definition_differences`)."""
    lines = []
    for c in planned_contrasts(config):
        kinds = definition_differences(config, results, c.a, c.b)
        if len(kinds) > 1:
            lines.append(f"{c.a} − {c.b} differ in {len(kinds)} things: {', '.join(kinds)}")
    return lines


def _pattern(metric: str) -> str:
    return "{:+.2f}" if metric.startswith("ppl") else "{:+.3f}"


def _cell(f: Finding) -> str:
    pattern = _pattern(f.metric)
    if not math.isfinite(f.estimate):
        return "—"
    if not (math.isfinite(f.low) and math.isfinite(f.high)):
        return pattern.format(f.estimate)
    return f"{pattern.format(f.estimate)} [{pattern.format(f.low)}, {pattern.format(f.high)}]"


def _p(value: float) -> str:
    return f"{value:.3g}" if math.isfinite(value) else "—"


def _verdict(f: Finding) -> str:
    return f"**{f.verdict}**" if f.resolved else f.verdict


def _by_length_table(found: list[Finding]) -> list[str]:
    lengths = list(dict.fromkeys(f.metric for f in found))
    if len(lengths) < 2:  # one length: the Findings table has it already
        return []
    lines = [
        "Perplexity contrasts at every evaluated length (a − b [95% CI], the same intervals; "
        "not corrected for multiplicity: the verdicts above are the headline length's):",
        "",
        "| contrast (a − b) | " + " | ".join(lengths) + " |",
        "|" + "---|" * (len(lengths) + 1),
    ]
    by_contrast: dict[Contrast, dict[str, Finding]] = {}
    for f in found:
        by_contrast.setdefault(f.contrast, {})[f.metric] = f
    for c, cells in by_contrast.items():
        row = " | ".join(_cell(cells[m]) for m in lengths)
        lines.append(f"| {c.a} − {c.b} | {row} |")
    return lines + [""]


def findings_section(config, results: Mapping[str, Mapping[str, Any]]) -> list[str]:
    """The report's "Findings" section as markdown lines (empty without a contrast)."""
    return render_findings(config, results, findings(config, results))


def render_findings(
    config, results: Mapping[str, Mapping[str, Any]], found: list[Finding]
) -> list[str]:
    """:func:`findings_section` of findings already computed."""
    if not found:
        return []
    families = sorted({f.family for f in found})
    lines = [
        "## Findings",
        "",
        "Each contrast a − b (a row against its comparator) on the headline metrics: the "
        "difference with its 95% interval, the raw p-value and the Holm-adjusted one over "
        f"its family ({', '.join(families)}). The verdict reads the adjusted p at "
        f"alpha {ALPHA:g}: **resolved**, or not resolved with the minimum detectable effect "
        "(MDE) at 80% power. Perplexity (lower is better): hierarchical t interval over seeds "
        "× evaluation documents, one resample for both rows. Passkey (higher is better): exact "
        f"McNemar over the paired prompts, a verdict only with {MIN_PASSKEY_PROMPTS}+ of them; "
        "both rows at 0 (or 1) read uninformative (floor) (or ceiling). lm-eval tasks (higher "
        "is better): paired t over seeds.",
        "",
        "| family | contrast (a − b) | question | metric | a − b [95% CI] | p | p (Holm) "
        "| verdict | method |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for f in found:
        lines.append(
            f"| {f.family} | {f.contrast.a} − {f.contrast.b} | {f.contrast.question} | "
            f"{f.metric} | {_cell(f)} | {_p(f.p)} | {_p(f.p_holm)} | {_verdict(f)} | "
            f"{f.method or '—'} |"
        )
    tested = [f for f in found if f.tested]
    resolved = [f for f in found if f.resolved]
    bounded = [f for f in found if f.verdict.startswith("uninformative")]
    lines += [
        "",
        f"Resolved after Holm: {len(resolved)} of {len(tested)} tested (contrast, metric) "
        "cells"
        + (
            ": " + "; ".join(f"{f.contrast.a} − {f.contrast.b} on {f.metric}" for f in resolved)
            if resolved
            else ""
        )
        + f". {len(bounded)} uninformative (floor or ceiling); "
        f"{len(found) - len(tested) - len(bounded)} without a test (see the verdicts).",
        "",
    ]
    notes = sorted({f.note for f in found if f.note.startswith(SEEDS_ONLY)})
    if notes:
        lines += [
            "Seed-only statistics where "
            + "; ".join(n.removeprefix(f"{SEEDS_ONLY}: ") for n in notes)
            + ": the interval and p see the spread over seeds only, not the evaluation "
            "documents' sampling error.",
            "",
        ]
    lines += _by_length_table(contrasts_by_length(config, results))
    warnings = comparator_warnings(config, results)
    if warnings:
        lines += [
            "**Warning: contrasted rows differ in more than the factor under test** (each "
            "difference below mixes them):",
            "",
            *[f"- {w}" for w in warnings],
            "",
        ]
    return lines
