"""Plots of a comparison report (PNG): loss curves, perplexity vs context, effective rank.

Spectra of the saved adapters come from :mod:`loravariants.analysis.plots`.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

__all__ = ["make_report_plots"]


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # no screen needed
    import matplotlib.pyplot as plt

    return plt


def _mean_curve(curves: list[list[float]]) -> list[float]:
    n = min(len(c) for c in curves)
    return [sum(c[i] for c in curves) / len(curves) for i in range(n)]


def _rows(config, results) -> dict[str, list[dict[str, Any]]]:
    grouped: dict[str, list[dict[str, Any]]] = {r.name: [] for r in config.runs}
    for record in results.values():
        if record.get("status") == "ok" and record["row"] in grouped:
            grouped[record["row"]].append(record)
    return grouped


def _line_plot(
    path: Path,
    series: dict[str, tuple[list[float], list[float]]],
    xlabel: str,
    ylabel: str,
    title: str,
    marker: str | None = None,
    logx: bool = False,
    logy: bool = False,
) -> None:
    """One line per row, legend, labels; written to ``path`` as PNG."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    for name, (xs, ys) in series.items():
        ax.plot(xs, ys, marker=marker, label=name)
    from matplotlib.ticker import ScalarFormatter

    if logx:
        ax.set_xscale("log", base=2)
        ax.set_xticks(sorted({x for xs, _ in series.values() for x in xs}))
    if logy:
        ax.set_yscale("log")
    for axis, is_log in ((ax.xaxis, logx), (ax.yaxis, logy)):
        if is_log:  # plain numbers (1024, 262.5), not 2^10 or 2.625 x 10^2
            axis.set_major_formatter(ScalarFormatter())
            axis.set_minor_formatter(ScalarFormatter())
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def make_report_plots(out: Path, config, results: dict[str, dict[str, Any]]) -> dict[str, str]:
    """Draw the report's figures into ``out/plots``; return ``{title: relative path}``."""
    plot_dir = out / "plots"
    plot_dir.mkdir(parents=True, exist_ok=True)
    grouped = _rows(config, results)
    made: dict[str, str] = {}

    losses = {}
    for name, rs in grouped.items():
        if rs and "loss_curve" in rs[0]:
            curve = _mean_curve([r["loss_curve"] for r in rs])
            losses[name] = (list(range(1, len(curve) + 1)), curve)
    if losses:
        _line_plot(
            plot_dir / "loss_curves.png",
            losses,
            "optimizer step",
            "train loss (mean over seeds)",
            "Training loss",
        )
        made["Training loss"] = "plots/loss_curves.png"

    ppl = {}
    for name, rs in grouped.items():
        if rs and rs[0].get("ppl"):
            lengths = sorted({int(k) for r in rs for k in r["ppl"]})
            ppl[name] = (
                lengths,
                [
                    sum(r["ppl"][str(n)] for r in rs if str(n) in r["ppl"]) / len(rs)
                    for n in lengths
                ],
            )
    if ppl:
        _line_plot(
            plot_dir / "perplexity_vs_context.png",
            ppl,
            "evaluation context (tokens)",
            "perplexity (mean over seeds)",
            "Perplexity vs context length (full attention)",
            marker="o",
            logx=True,
            logy=True,
        )
        made["Perplexity vs context length"] = "plots/perplexity_vs_context.png"

    ranks = {}
    for name, rs in grouped.items():
        by_layer = rs[0].get("svd", {}).get("effective_rank_by_layer") if rs else None
        if by_layer:
            values = [v for v in by_layer.values() if v is not None and math.isfinite(v)]
            ranks[name] = (list(range(len(values))), values)
    if ranks:
        _line_plot(
            plot_dir / "effective_rank.png",
            ranks,
            "adapted module (model order)",
            "effective rank of dW (first seed)",
            "Effective rank by layer",
            marker=".",
        )
        made["Effective rank by layer"] = "plots/effective_rank.png"

    spectra = _spectra_plot(out, grouped, plot_dir)
    if spectra:
        made["Singular-value spectra"] = spectra
    return made


def _spectra_plot(out: Path, grouped, plot_dir: Path) -> str | None:
    """Mean normalised spectrum of dW per row (first seed's saved adapter)."""
    import torch

    from .analysis import spectrum
    from .io import read_factors

    curves = {}
    for name, rs in grouped.items():
        if not rs or "loss_curve" not in rs[0]:
            continue
        adapter_dir = out / "runs" / name / f"seed{rs[0]['seed']}" / "adapter"
        if not adapter_dir.is_dir():
            continue
        spectra = [spectrum(pair) for pair in read_factors(adapter_dir).values()]
        spectra = [s / s[0] for s in spectra if len(s) and s[0] > 0]
        if not spectra:
            continue
        k = min(len(s) for s in spectra)
        curves[name] = torch.stack([torch.as_tensor(s[:k]) for s in spectra]).mean(0).tolist()
    if not curves:
        return None
    _line_plot(
        plot_dir / "spectra.png",
        {name: (list(range(1, len(c) + 1)), c) for name, c in curves.items()},
        "singular value index",
        "s_i / s_1 (mean over modules)",
        "Normalised spectra of the learned updates",
        marker=".",
        logy=True,
    )
    return "plots/spectra.png"
