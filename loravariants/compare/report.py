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
from .findings import findings_section
from .plots import make_report_plots
from .records import RESULTS_SCHEMA_VERSION, config_dict
from .summary import (
    SHARED_WHEN_CONCURRENT,
    SUMMARY_METRICS,
    TIMING_METRICS,
    paired_differences,
    param_match_warning,
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
            recorded in results.json.
    """
    summary = summarize(config, results, seed_to_seed, reference)
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
    }
    if lr_selection:
        payload["lr_selection"] = lr_selection
    atomic_write(out / "results.json", json.dumps(payload, indent=2, default=str))
    _write_csv(out / "results.csv", results)
    plots = {}
    try:
        plots = make_report_plots(out, config, results)
    except Exception as e:  # a plot must never lose the numbers
        plots = {"error": f"{type(e).__name__}: {e}"}
    atomic_write(out / "report.md", _report_markdown(config, summary, plots, results, base_sha256))


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
            pattern = "{:+.3f}" if m == "final_loss" else "{:+.2f}"
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


def _report_markdown(
    config: ExperimentConfig,
    summary: list[dict[str, Any]],
    plots: dict[str, str],
    results: dict[str, dict[str, Any]] | None = None,
    base_sha256: str | None = None,
) -> str:
    t = config.train
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
        f"{t.lr:g} ({t.schedule}, {t.warmup_steps} warm-up); seeds {config.seeds}.",
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
    warning = param_match_warning(summary)
    if warning:
        lines += [warning, ""]
    lines += [summary_table(summary), ""]
    if results is not None:
        lines += findings_section(config, results)
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
