"""Findings: the study's planned contrasts, each a paired difference over seeds with a verdict.

A table of means with confidence intervals invites reading differences the data cannot carry.
The study instead fixes its questions before the run (LongLoRA's ablation, Tables 2-3, and the
variants against plain LoRA) and answers each with the paired difference of two rows over
the seeds both ran (``stats.paired_difference``)::

    question                                   contrast (a - b)
    does interpolation alone help at 4x?       base-PI   - base-noPI
    does fine-tuning help over interpolation?  longlora  - base-PI
    do trainable embed + norm help LoRA?       longlora  - lora
    does S2-Attn cost anything?                longlora  - longlora-fullattn
    does a variant differ from LoRA?           <variant> - lora        (every other trained row)

on two metrics at the longest length evaluated (4x the native context in the quickstart):
passkey accuracy (higher is better) and perplexity (lower is better), and on every lm-eval
task of ``eval.lm_eval`` (its main metric, ``lm_eval@<task>``; higher is better). A contrast is
"resolved" when the 95% Student-t interval of the mean difference excludes 0.

Rows are recognised by what they are, not by their names: the untrained rows without and
with context extension, the plain LoRA row (the reference variant of the variant contract,
``AdapterConfig.is_reference``, without overrides or anything else trainable), and the
LoRA rows that also train embeddings and norms with the experiment's attention (LongLoRA) or
with another one (its full-attention control). A contrast whose rows a config lacks is left
out.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from ..adapters.base import reference_variant
from ..stats import PairedDifference, paired_difference
from .plan import row_variant
from .summary import per_seed

__all__ = ["Contrast", "Finding", "planned_contrasts", "headline_metrics", "findings"]
__all__ += ["findings_section"]


@dataclass(frozen=True)
class Contrast:
    """One planned comparison ``a - b``.

    Attributes:
        a, b: row names.
        question: what the contrast asks, in a few words.
    """

    a: str
    b: str
    question: str


@dataclass(frozen=True)
class Finding:
    """A contrast measured on one metric."""

    contrast: Contrast
    metric: str
    difference: PairedDifference

    def to_dict(self) -> dict[str, Any]:
        d = self.difference
        return {
            "a": self.contrast.a,
            "b": self.contrast.b,
            "question": self.contrast.question,
            "metric": self.metric,
            "seeds": list(d.seeds),
            "differences": list(d.differences),
            "mean": d.mean,
            "low": d.low,
            "high": d.high,
            "resolved": d.resolved,
        }


def _roles(config) -> dict[str, Any]:
    runs = list(config.runs)
    default_attention = config.context.attention

    def attention(row) -> str:
        return row.attention or default_attention

    untrained = [r for r in runs if not r.trains]
    reference = reference_variant()
    loras = [
        r
        for r in runs
        if r.trains
        and not r.overrides
        and r.extend_context
        and reference is not None
        and row_variant(config, r) == reference
    ]
    embed_norm = [r for r in loras if set(r.trainable) == {"embed", "norm"}]

    def first(rows) -> str | None:
        return rows[0].name if rows else None

    return {
        "base_nopi": first([r for r in untrained if not r.extend_context]),
        "base_pi": first([r for r in untrained if r.extend_context]),
        "plain_lora": first(
            [r for r in loras if not r.trainable and attention(r) == default_attention]
        ),
        "longlora": first([r for r in embed_norm if attention(r) == default_attention]),
        "longlora_fullattn": first([r for r in embed_norm if attention(r) != default_attention]),
        "trained": [r.name for r in runs if r.trains],
    }


def planned_contrasts(config) -> list[Contrast]:
    """The study's contrasts among the rows ``config`` has (see the module docstring).

    Args:
        config: an ``ExperimentConfig`` (its ``runs`` and ``context.attention`` are read).
    """
    roles = _roles(config)
    out: list[Contrast] = []

    def add(a: str | None, b: str | None, question: str) -> None:
        if a and b and a != b and not any({a, b} == {c.a, c.b} for c in out):
            out.append(Contrast(a, b, question))

    add(roles["base_pi"], roles["base_nopi"], "interpolation alone, no training")
    add(roles["longlora"], roles["base_pi"], "fine-tuning after interpolation (trained vs not)")
    add(roles["longlora"], roles["plain_lora"], "trainable embeddings + norms on top of LoRA")
    add(roles["longlora"], roles["longlora_fullattn"], "S2-Attn vs full attention in training")
    for name in roles["trained"]:
        add(name, roles["plain_lora"], "against plain LoRA")
    return out


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


def findings(config, results: Mapping[str, Mapping[str, Any]]) -> list[Finding]:
    """Every planned contrast on every headline metric, in that order.

    Args:
        config: the ``ExperimentConfig`` of the comparison.
        results: ``{run key: run record}`` as in ``results.json`` (records carry ``row``,
            ``seed``, ``status`` and the ``ppl`` / ``passkey`` dicts keyed by length).
    """
    metrics = headline_metrics(config, results)
    return [
        Finding(c, m, paired_difference(per_seed(results, c.a, m), per_seed(results, c.b, m)))
        for c in planned_contrasts(config)
        for m in metrics
    ]


def _cell(d: PairedDifference, pattern: str) -> tuple[str, str]:
    if not d.seeds:
        return "—", "no common seed"
    if len(d.seeds) < 2:
        return f"{pattern.format(d.mean)} (1 seed)", "not resolved (needs 2+ seeds)"
    text = f"{pattern.format(d.mean)} [{pattern.format(d.low)}, {pattern.format(d.high)}]"
    return text, "**resolved**" if d.resolved else "not resolved"


def findings_section(config, results: Mapping[str, Mapping[str, Any]]) -> list[str]:
    """The report's "Findings" section as markdown lines (empty without a contrast)."""
    found = findings(config, results)
    if not found:
        return []
    metrics = list(dict.fromkeys(f.metric for f in found))
    header = "| contrast (a − b) | question | " + " | ".join(
        f"{m} (a − b) [95% CI] | {m}" for m in metrics
    )
    lines = [
        "## Findings",
        "",
        "The study's planned contrasts, each the paired difference a − b over the seeds both "
        "rows ran, with its 95% interval (Student t). **resolved**: the interval excludes 0. "
        "Passkey accuracy and lm-eval task scores: higher is better; perplexity: lower is "
        "better. Untrained rows "
        "change with the seed only through the passkey prompts (key and depth), so their "
        "perplexity has no spread.",
        "",
        header + " |",
        "|" + "---|" * (2 + 2 * len(metrics)),
    ]
    by_contrast: dict[Contrast, dict[str, Finding]] = {}
    for f in found:
        by_contrast.setdefault(f.contrast, {})[f.metric] = f
    for contrast, by_metric in by_contrast.items():
        cells = []
        for m in metrics:
            pattern = (
                "{:+.1f}" if m.startswith("ppl") else "{:+.3f}" if "lm_eval" in m else "{:+.2f}"
            )
            cells += list(_cell(by_metric[m].difference, pattern))
        lines.append(
            f"| {contrast.a} − {contrast.b} | {contrast.question} | " + " | ".join(cells) + " |"
        )
    resolved = [f for f in found if f.difference.resolved]
    lines += [
        "",
        f"Resolved: {len(resolved)} of {len(found)} (contrast, metric) pairs"
        + (
            ": " + "; ".join(f"{f.contrast.a} − {f.contrast.b} on {f.metric}" for f in resolved)
            if resolved
            else ""
        )
        + ".",
        "",
    ]
    return lines
