"""Write a comparison's outputs, each file atomically: results.json (every record and the
summary), results.csv (one line per run), report.md (tables and sections) and the plots.

Rendering only: the records arrive measured (each run's own measures, then the cross-run
measures of :mod:`.crossrun`); the statistics come from :mod:`.summary` and :mod:`.findings`.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import platform
import time
from pathlib import Path
from typing import Any

import torch

from .._version import __version__
from ..config import ExperimentConfig
from ..shipped_base import base_weights_sha256
from ..utils import atomic_write
from .findings import Finding, findings, render_findings
from .plots import make_report_plots
from .records import RESULTS_SCHEMA_VERSION, config_dict
from .summary import (
    PARAM_MATCH_TOLERANCE,
    SHARED_WHEN_CONCURRENT,
    SUMMARY_METRICS,
    TIMING_METRICS,
    RowPerplexity,
    paired_differences,
    param_match_warning,
    perplexity_by_length,
    summarize,
)

__all__ = ["CSV_FIELDS", "RESULTS_SCHEMA_VERSION", "summary_table", "write_outputs"]


def write_outputs(
    out: Path,
    config: ExperimentConfig,
    results: dict[str, dict[str, Any]],
    base_path: str | None,
    seed_to_seed: dict[str, dict[str, list[float]]] | None = None,
    reference: str | None = None,
    lr_selection: dict[str, dict[str, Any]] | None = None,
    plots: bool = True,
) -> None:
    """Rewrite results.json, results.csv, report.md and the plots (each file atomically).

    Args:
        out: the output folder.
        config: the experiment.
        results: ``{run key: record}``, cross-run measures included.
        base_path: the resolved base model, recorded in results.json.
        seed_to_seed, reference: the cross-run measures' seed-to-seed similarities and
            reference row (:class:`~loravariants.compare.crossrun.CrossRun`).
        lr_selection: ``{row: {"grid", "selection_ppl", "chosen", "seeds", "steps"}}`` of an
            ``lr_grid`` selection (:func:`~loravariants.compare.lr_select.selection_summary`),
            recorded in results.json and stated in the report.
        plots: also redraw the plots (about 2 s; a comparison draws them once, at its end,
            and writes the numbers after every run).
    """
    summary = summarize(config, results, seed_to_seed, reference)
    found = findings(config, results)
    curves = perplexity_by_length(config, results)
    base_sha256 = base_weights_sha256(base_path)  # the same base on every machine: compare it
    payload = {
        "schema_version": RESULTS_SCHEMA_VERSION,
        "library_version": __version__,
        "machine": _machine(),
        "base_model": base_path,
        "base_model_sha256": base_sha256,
        "config": config_dict(config),
        "runs": list(results.values()),
        "summary": [
            {k: list(v) if isinstance(v, tuple) else v for k, v in r.items()} for r in summary
        ],
        "findings": [f.to_dict() for f in found],
        "perplexity_by_length": {
            row: {length: p._asdict() for length, p in curve.items()}
            for row, curve in curves.items()
        },
    }
    if lr_selection:
        payload["lr_selection"] = lr_selection
    atomic_write(out / "results.json", json.dumps(payload, indent=2, default=str))
    _write_csv(out / "results.csv", results)
    drawn = {}
    try:
        if plots:
            drawn = make_report_plots(out, config, results, None, curves)
    except Exception as e:  # a plot must never lose the numbers
        drawn = {"error": f"{type(e).__name__}: {e}"}
    text = _report_markdown(
        config, summary, drawn, results, base_sha256, found, curves, lr_selection
    )
    atomic_write(out / "report.md", text)


def _machine() -> str:
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return (
        f"{platform.machine()}, {os.cpu_count()} CPUs, {gpu}, torch {torch.__version__}, "
        f"Python {platform.python_version()}"
    )


CSV_FIELDS = [
    "key",
    "row",
    "seed",
    "status",
    "reason",
    "variant",
    "trainable_params",
    "adapter_params",
    "matched_params",
    "tokens",
    "tokens_per_s",
    "peak_mem_mib",
    "wall_s",
    "final_loss",
    "train_loss_final",
    "lr",
    "context",
    "attention",
]


def _write_csv(file: Path, results: dict[str, dict[str, Any]]) -> None:
    ppl_keys = sorted({k for r in results.values() for k in r.get("ppl", {})}, key=int)
    pk_keys = sorted({k for r in results.values() for k in r.get("passkey", {})}, key=int)
    task_keys = sorted({k for r in results.values() for k in r.get("lm_eval", {})})
    fields = (
        CSV_FIELDS
        + [f"ppl@{k}" for k in ppl_keys]
        + [f"passkey@{k}" for k in pk_keys]
        + [f"lm_eval@{k}" for k in task_keys]
        + ["effective_rank", "energy_top4", "similarity_to_lora", "similarity_to_lora_right"]
    )
    text = io.StringIO(newline="")
    writer = csv.DictWriter(text, fieldnames=fields, extrasaction="ignore")
    writer.writeheader()
    for r in results.values():
        flat = dict(r)
        flat.update({f"ppl@{k}": v for k, v in r.get("ppl", {}).items()})
        flat.update({f"passkey@{k}": v for k, v in r.get("passkey", {}).items()})
        flat.update({f"lm_eval@{k}": v for k, v in r.get("lm_eval", {}).items()})
        flat.update({k: v for k, v in r.get("svd", {}).items() if not isinstance(v, dict)})
        writer.writerow(flat)
    atomic_write(file, text.getvalue())


def _fmt(value, pattern="{:.3f}") -> str:
    if isinstance(value, tuple):
        mean, half = value
        if not math.isfinite(mean):
            return "—"
        text = pattern.format(mean)
        return text if not half else f"{text} ± {pattern.format(half)}"
    return str(value)


def _fmt_range(low: float, high: float, pattern: str) -> str:
    if not math.isfinite(low):
        return "—"
    if low == high:
        return pattern.format(low)
    return f"{pattern.format(low)}–{pattern.format(high)} (min–max)"


def summary_table(summary: list[dict[str, Any]]) -> str:
    """The summary as a Markdown table (mean ± 95% CI over seeds; timings min–max for n < 3).

    Timings marked † were measured while all rows of a seed trained together on one base:
    they are the group's figures, shared by its rows, not one method's cost.
    """
    columns = ["row", "seeds", "rank", "targets", "adapter params"]
    keys = []
    for key, title, pattern in SUMMARY_METRICS:
        if any(key in r for r in summary):
            columns.append(title)
            keys.append((key, pattern))
    extra = sorted(
        {k for r in summary for k in r if "@" in k or k.startswith("svd.")}, key=_column_order
    )
    for k in extra:
        columns.append(k.replace("svd.", ""))
        keys.append((k, "{:.2f}"))
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for r in summary:
        seeds = f"{r['seeds_ok']}"
        if r["seeds_failed"]:
            seeds += f" ({r['seeds_failed']} failed: {r.get('reason', '')[:60]})"
        params = _fmt(r.get("adapter_params", (float("nan"), 0.0)), "{:,.0f}")
        cells = [r["row"], seeds, r.get("rank", "—"), r.get("targets", "—"), params]
        for k, pattern in keys:
            if k in TIMING_METRICS and r["seeds_ok"] < 3 and f"{k}_range" in r:
                cell = _fmt_range(*r[f"{k}_range"], pattern)
            else:
                cell = _fmt(r.get(k, (float("nan"), float("nan"))), pattern)
            if r.get("concurrent") and k in SHARED_WHEN_CONCURRENT and cell != "—":
                cell += " †"
            cells.append(cell)
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _column_order(key: str) -> tuple[str, int, str]:
    """``ppl@N`` / ``passkey@N`` by length, ``lm_eval@<task>`` by name, in their groups."""
    group, _, sub = key.partition("@")
    return (group, int(sub), "") if sub.isdigit() else (group, 0, sub)


def _paired_section(reference: str | None, diffs: dict[str, dict[str, Any]]) -> list[str]:
    if not reference or not diffs:
        return []
    metrics = list(next(iter(diffs.values())))
    lines = [
        f"## Paired differences (row − {reference}, per seed)",
        "",
        "Mean of the per-seed difference with its 95% interval over seeds (Student t). "
        "**bold**: resolved (the interval excludes 0); otherwise the two rows are "
        "indistinguishable on that metric at this budget and number of seeds.",
        "",
        "| row | " + " | ".join(metrics) + " |",
        "|" + "---|" * (len(metrics) + 1),
    ]
    same = []
    for name, by_metric in diffs.items():
        cells = []
        for m in metrics:
            d = by_metric[m]
            pattern = "{:+.3f}" if "loss" in m else "{:+.2f}"
            if not d.seeds:
                cells.append("—")
            elif len(d.seeds) < 2:
                cells.append(pattern.format(d.mean) + " (1 seed)")
            else:
                text = (
                    f"{pattern.format(d.mean)} [{pattern.format(d.low)}, {pattern.format(d.high)}]"
                )
                cells.append(f"**{text}**" if d.resolved else text)
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
        if not any(d.resolved for d in by_metric.values()):
            same.append(name)
    lines.append("")
    n_seeds = max(len(d.seeds) for m in diffs.values() for d in m.values())
    if n_seeds < 2:
        lines.append(
            f"With one common seed no difference can be resolved: every row is "
            f"indistinguishable from {reference} here. Run 3 or more seeds."
        )
    elif same:
        lines.append(
            f"Indistinguishable from {reference} on every metric above: {', '.join(same)}."
        )
    else:
        lines.append(f"Every row differs from {reference} on at least one metric.")
    return lines + [""]


def _similarity_section(summary: list[dict[str, Any]]) -> list[str]:
    rows = [r for r in summary if any(k.startswith("sim.") for k in r)]
    if not rows:
        return []
    lora = [r for r in rows if r.get("reference")]
    baseline = lora[0].get("sim.seed_to_seed_left") if lora else None
    head = (
        f"{_fmt(baseline, '{:.3f}')} ({lora[0]['row']} at one seed vs another)"
        if baseline
        else "— (needs 2+ seeds of the LoRA row)"
    )
    lines = [
        "## Subspace similarity to LoRA",
        "",
        "`phi` (LoRA paper sec. 7.2) between this row's update and LoRA's, mean over the "
        "layers both adapt. **Left**: output space, the column space of dW, which B (zero "
        "at the start) takes from training. **Right**: input space, the row space of A, which "
        "rows of one seed share through A's random initialisation; a high same-seed right "
        "value shows that shared init, not learning. Rows of one seed also see the same "
        "batches in the same order, which shapes the left side too, so a **same-seed** value "
        "overstates shared learning. The like-for-like comparison is **other seed**: this row "
        "at one seed against LoRA at another (no shared init, no shared batch order), read "
        "against LoRA's own seed-to-seed value. At or below that baseline, the row is no "
        "further from LoRA than LoRA is from itself.",
        "",
        f"Baseline, LoRA vs LoRA across seeds (left): {head}.",
        "",
        "| row | vs LoRA, other seed: left | right | vs LoRA, same seed: left | right "
        "(shared init) | this row across seeds: left | right | random subspaces (left) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        cells = [
            _fmt(r.get(k, (float("nan"), 0.0)), "{:.3f}")
            for k in (
                "sim.vs_lora_left_other_seed",
                "sim.vs_lora_right_other_seed",
                "sim.similarity_to_lora",
                "sim.similarity_to_lora_right",
                "sim.seed_to_seed_left",
                "sim.seed_to_seed_right",
                "sim.similarity_random",
            )
        ]
        lines.append(f"| {r['row']} | " + " | ".join(cells) + " |")
    return lines + [""]


def _match_deviation_warning(matched: list[dict[str, Any]]) -> list[str]:
    """A warning naming every row whose achieved size misses match_params by more than 10%."""
    off = [
        f"{r['row']} ({r['match_params']['deviation']:+.1%})"
        for r in matched
        if abs(r["match_params"]["deviation"]) > PARAM_MATCH_TOLERANCE
    ]
    if not off:
        return []
    return [
        f"**Warning: match_params missed by more than {PARAM_MATCH_TOLERANCE:.0%}**: "
        + ", ".join(off)
        + ". Their contrasts mix the method with its size.",
        "",
    ]


def _show_lr(lr: Any) -> str:
    if lr is None:
        return "—"
    if isinstance(lr, list | tuple):
        return " / ".join(f"{v:g}" for v in lr) + " (differs between seeds)"
    return f"{lr:g}"


def _lr_section(
    summary: list[dict[str, Any]], lr_selection: dict[str, dict[str, Any]] | None
) -> list[str]:
    """Which learning rate each trained row used, and how a grid chose it."""
    trained = [r for r in summary if r.get("trains")]
    if not trained:
        return []
    lines = [
        "Learning rate per row: "
        + "; ".join(f"{r['row']} {_show_lr(r.get('lr'))}" for r in trained)
        + ".",
        "",
    ]
    for row, sel in (lr_selection or {}).items():
        ppl = sel.get("selection_ppl") or {}
        tried = ", ".join(f"{lr} → {v:.2f}" for lr, v in ppl.items() if isinstance(v, int | float))
        lines.append(
            f"- {row}: {sel.get('chosen')} chosen from the grid {sel.get('grid')} by perplexity "
            f"on the selection split ({tried}; seeds {sel.get('seeds')}, "
            f"{sel.get('steps')} steps)"
        )
    if lr_selection:
        lines.append("")
    return lines


def _perplexity_section(curves: dict[str, dict[str, RowPerplexity]]) -> list[str]:
    """Perplexity against length per row, each with its 95% interval."""
    lengths = sorted({k for c in curves.values() for k in c}, key=int)
    if not lengths:
        return []
    methods = sorted({p.method for c in curves.values() for p in c.values()})
    lines = [
        "## Perplexity against length",
        "",
        "Each row's perplexity at every evaluated length with its 95% interval ("
        + "; ".join(
            "seeds × documents: the evaluation documents of every seed pooled, hierarchical t"
            if m.startswith("seeds ×")
            else "seeds only: Student t over the seeds, records without per-document NLL"
            for m in methods
        )
        + "). Lower is better.",
        "",
        "| row | " + " | ".join(f"ppl@{n}" for n in lengths) + " |",
        "|" + "---|" * (len(lengths) + 1),
    ]
    for row, curve in curves.items():
        cells = []
        for n in lengths:
            p = curve.get(n)
            if p is None or not math.isfinite(p.value):
                cells.append("—")
            elif math.isfinite(p.low) and p.high > p.low:
                cells.append(f"{p.value:.2f} [{p.low:.2f}, {p.high:.2f}]")
            else:
                cells.append(f"{p.value:.2f}")
        lines.append(f"| {row} | " + " | ".join(cells) + " |")
    return lines + [""]


def _report_markdown(
    config: ExperimentConfig,
    summary: list[dict[str, Any]],
    plots: dict[str, str],
    results: dict[str, dict[str, Any]] | None = None,
    base_sha256: str | None = None,
    found: list[Finding] | None = None,
    curves: dict[str, dict[str, RowPerplexity]] | None = None,
    lr_selection: dict[str, dict[str, Any]] | None = None,
) -> str:
    t = config.train
    own = config.lr_grid or any(row.lr for row in config.runs)
    own_rates = " unless the row or lr_grid sets its own (below)" if own else ""
    weights = f" (weights sha256 `{base_sha256[:16]}`)" if base_sha256 else ""
    lines = [
        "# loravariants comparison",
        "",
        f"*{time.strftime('%Y-%m-%d %H:%M')} · loravariants {__version__} · {_machine()}*",
        "",
        f"Base model: `{config.base_model}`{weights}; data: `{config.data.source}`; context: "
        f"{config.context.target_length or 'native'} tokens ({config.context.method} position "
        f"interpolation), training attention `{config.context.attention}`.",
        f"Budget per run: {t.max_steps} steps x {t.batch_size * t.grad_accum} sequences, lr "
        f"{t.lr:g}{own_rates}"
        f" ({t.schedule}, {t.warmup_steps} warm-up); seeds {config.seeds}.",
        "",
        "Mean ± 95% confidence interval over seeds (Student t); one seed shows no interval. "
        "With fewer than 3 seeds, throughput and train time show min–max instead (an interval "
        "from 2 values is meaningless). Perplexity uses a strided sliding window with full "
        "attention; throughput and memory are measured the same way for every row. "
        "A mean ± CI per row does not say whether two rows differ: see the paired differences "
        "below.",
        "",
    ]
    if any(r.get("concurrent") for r in summary):
        lines += [
            "† Trained concurrently (all rows of a seed on one base): throughput, memory and "
            "time are the whole group's, shared by its rows, not one method's cost.",
            "",
        ]
    matched = [r for r in summary if r.get("match_params")]
    if matched:
        lines += [
            "match_params: "
            + "; ".join(
                f"{r['row']} {r['match_params']['achieved']:,} of {r['match_params']['target']:,}"
                f" ({r['match_params']['deviation']:+.1%})"
                for r in matched
            ),
            "",
        ]
        lines += _match_deviation_warning(matched)
    # rows that declare their comparators get a warning per contrast (the Findings), which
    # names what else two contrasted rows differ in; the all-rows check is for the rest
    declared = any(row.comparator for row in config.runs)
    warning = None if declared else param_match_warning(summary)
    if warning:
        lines += [warning, ""]
    lines += [
        "Per-seed records: [results.json](results.json) (every run's record, the summary "
        "and the findings) and [results.csv](results.csv) (one line per run).",
        "",
        summary_table(summary),
        "",
    ]
    lines += _lr_section(summary, lr_selection)
    lines += _perplexity_section(curves or {})
    if results is not None:
        found = findings(config, results) if found is None else found
        lines += render_findings(config, results, found)
        lines += _paired_section(*paired_differences(summary, results))
    lines += _similarity_section(summary)
    errors = [
        f"- `{r['key']}`: {metric}: {error}"
        for r in (results or {}).values()
        for metric, error in r.get("metric_errors", {}).items()
    ]
    if errors:
        lines += [
            "**Metrics that failed** (their runs are kept; the table leaves them out; rerun "
            "the same command to compute them again):",
            "",
            *errors,
            "",
        ]
    if "error" in plots:
        lines += [f"Plots could not be drawn: {plots['error']}", ""]
    for title, file in plots.items():
        if title != "error":
            lines += [f"## {title}", "", f"![{title}]({file})", ""]
    return "\n".join(lines)
