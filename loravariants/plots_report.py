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


def make_report_plots(out: Path, config, results: dict[str, dict[str, Any]]) -> dict[str, str]:
    """Draw the report's figures into ``out/plots``; return ``{title: relative path}``."""
    plt = _pyplot()
    plot_dir = out / "plots"
    plot_dir.mkdir(parents=True, exist_ok=True)
    grouped = _rows(config, results)
    made: dict[str, str] = {}

    trained = {name: rs for name, rs in grouped.items() if rs and "loss_curve" in rs[0]}
    if trained:
        fig, ax = plt.subplots(figsize=(7, 4))
        for name, rs in trained.items():
            curve = _mean_curve([r["loss_curve"] for r in rs])
            ax.plot(range(1, len(curve) + 1), curve, label=name)
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("train loss (mean over seeds)")
        ax.set_title("Training loss")
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(plot_dir / "loss_curves.png", dpi=120)
        plt.close(fig)
        made["Training loss"] = "plots/loss_curves.png"

    with_ppl = {name: rs for name, rs in grouped.items() if rs and rs[0].get("ppl")}
    if with_ppl:
        fig, ax = plt.subplots(figsize=(7, 4))
        for name, rs in with_ppl.items():
            lengths = sorted({int(k) for r in rs for k in r["ppl"]})
            means = [
                sum(r["ppl"][str(n)] for r in rs if str(n) in r["ppl"]) / len(rs) for n in lengths
            ]
            ax.plot(lengths, means, marker="o", label=name)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("evaluation context (tokens)")
        ax.set_ylabel("perplexity (mean over seeds)")
        ax.set_title("Perplexity vs context length (full attention)")
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(plot_dir / "perplexity_vs_context.png", dpi=120)
        plt.close(fig)
        made["Perplexity vs context length"] = "plots/perplexity_vs_context.png"

    with_rank = {
        name: rs[0]["svd"]["effective_rank_by_layer"]
        for name, rs in grouped.items()
        if rs and rs[0].get("svd", {}).get("effective_rank_by_layer")
    }
    if with_rank:
        fig, ax = plt.subplots(figsize=(7, 4))
        for name, by_layer in with_rank.items():
            values = [v for v in by_layer.values() if v is not None and math.isfinite(v)]
            ax.plot(range(len(values)), values, marker=".", label=name)
        ax.set_xlabel("adapted module (model order)")
        ax.set_ylabel("effective rank of dW (first seed)")
        ax.set_title("Effective rank by layer")
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(plot_dir / "effective_rank.png", dpi=120)
        plt.close(fig)
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

    plt = _pyplot()
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
    fig, ax = plt.subplots(figsize=(7, 4))
    for name, curve in curves.items():
        ax.plot(range(1, len(curve) + 1), curve, marker=".", label=name)
    ax.set_xlabel("singular value index")
    ax.set_ylabel("s_i / s_1 (mean over modules)")
    ax.set_yscale("log")
    ax.set_title("Normalised spectra of the learned updates")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(plot_dir / "spectra.png", dpi=120)
    plt.close(fig)
    return "plots/spectra.png"
