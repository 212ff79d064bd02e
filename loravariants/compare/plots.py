"""Plots of a comparison report (PNG): loss curves, perplexity vs context, effective rank,
spectra.

Drawn for a reader: legends outside the data, error bars where there are seeds to show them,
smoothed loss curves (raw ones faint behind), panels of at most four rows, layers aligned by
their index in the model, log axes labelled 1, 2, 5 x 10^k in plain numbers.
"""

from __future__ import annotations

import io
import math
import re
from pathlib import Path
from typing import Any

from ..analysis import spectrum
from ..analysis.plots import figure, mean_spectrum, plain_log_ticks
from ..io import read_factors
from ..stats import mean_ci
from ..utils import atomic_write
from .records import run_folder

__all__ = ["make_report_plots", "smooth", "layer_of"]

ROWS_PER_PANEL = 4
_STYLES = ["-", "--", "-.", ":"]
_MARKERS = ["o", "s", "^", "D", "v", "P", "X", "*"]


def _style(i: int) -> dict[str, Any]:
    """Colour, line style and marker that separate up to 40 overlapping curves."""
    return {
        "color": f"C{i % 10}",
        "linestyle": _STYLES[(i // 10 + i) % len(_STYLES)],
        "marker": _MARKERS[i % len(_MARKERS)],
    }


def _legend_outside(fig, ax) -> None:
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0)


def _save(fig, path: Path) -> None:
    fig.tight_layout()
    png = io.BytesIO()
    fig.savefig(png, format="png", dpi=120, bbox_inches="tight")
    atomic_write(path, png.getvalue())  # never through a link planted at the plot's name


def smooth(values: list[float], window: int) -> list[float]:
    """Trailing moving average over ``window`` points (the first points average what exists).

    ``window <= 1`` returns the values unchanged.
    """
    if window <= 1:
        return list(values)
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


_LAYER_RE = re.compile(r"(?:^|\.)(?:layers|h|blocks|layer)\.(\d+)(?:\.|$)")


def layer_of(module: str) -> int | None:
    """Decoder layer index in a module name (``model.layers.3.mlp...`` -> 3), else None."""
    match = _LAYER_RE.search(module)
    return int(match.group(1)) if match else None


def _rows(config, results) -> dict[str, list[dict[str, Any]]]:
    grouped: dict[str, list[dict[str, Any]]] = {r.name: [] for r in config.runs}
    for record in results.values():
        if record.get("status") == "ok" and record["row"] in grouped:
            grouped[record["row"]].append(record)
    return grouped


def _mean_curve(curves: list[list[float]]) -> list[float]:
    n = min(len(c) for c in curves)
    return [sum(c[i] for c in curves) / len(curves) for i in range(n)]


def make_report_plots(
    out: Path,
    config,
    results: dict[str, dict[str, Any]],
    loss_smoothing: int | None = None,
    curves: dict[str, dict[str, Any]] | None = None,
) -> dict[str, str]:
    """Draw the report's figures into ``out/plots``; return ``{title: relative path}``.

    Args:
        out: the comparison's output folder.
        config: its experiment config.
        results: ``{run key: record}``.
        loss_smoothing: moving-average window of the loss curves; None picks about a tenth of
            the steps, 1 draws the raw curves only.
        curves: ``{row: {length: RowPerplexity}}`` (``summary.perplexity_by_length``): the
            perplexity plot draws these values and intervals; None: mean ± 95% CI over seeds.
    """
    plot_dir = out / "plots"
    plot_dir.mkdir(parents=True, exist_ok=True)
    grouped = _rows(config, results)
    made: dict[str, str] = {}
    if _loss_plot(plot_dir / "loss_curves.png", grouped, loss_smoothing):
        made["Training loss"] = "plots/loss_curves.png"
    if _perplexity_plot(plot_dir / "perplexity_vs_context.png", grouped, curves):
        made["Perplexity vs context length"] = "plots/perplexity_vs_context.png"
    if _effective_rank_plot(plot_dir / "effective_rank.png", grouped):
        made["Effective rank by layer"] = "plots/effective_rank.png"
    if _spectra_plot(out, grouped, plot_dir / "spectra.png"):
        made["Singular-value spectra"] = "plots/spectra.png"
    return made


def _loss_plot(path: Path, grouped, window: int | None) -> bool:
    curves = {
        name: _mean_curve([r["loss_curve"] for r in rs])
        for name, rs in grouped.items()
        if rs and rs[0].get("loss_curve")
    }
    if not curves:
        return False
    steps = max(len(c) for c in curves.values())
    window = max(1, round(steps / 10)) if window is None else max(1, int(window))
    names = list(curves)
    panels = [names[i : i + ROWS_PER_PANEL] for i in range(0, len(names), ROWS_PER_PANEL)]
    ncols = 1 if len(panels) == 1 else 2
    nrows = math.ceil(len(panels) / ncols)
    fig = figure(7.5 * ncols, 3.6 * nrows)
    axes = [fig.add_subplot(nrows, ncols, i + 1) for i in range(len(panels))]
    for a in axes[1:]:
        a.sharey(axes[0])
    for ax, panel in zip(axes, panels, strict=True):
        for name in panel:
            style = _style(names.index(name))
            ys = curves[name]
            xs = list(range(1, len(ys) + 1))
            if window > 1:
                ax.plot(xs, ys, color=style["color"], alpha=0.25, linewidth=0.8)
            ax.plot(
                xs,
                smooth(ys, window),
                color=style["color"],
                linestyle=style["linestyle"],
                label=name,
            )
        from matplotlib.ticker import MaxNLocator

        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("train loss (mean over seeds)")
        ax.legend(fontsize=8, loc="upper right")
        ax.grid(alpha=0.3)
    how = f"moving average of {window} steps, raw curves faint" if window > 1 else "raw"
    fig.suptitle(f"Training loss ({how})")
    _save(fig, path)
    return True


def _perplexity_plot(path: Path, grouped, curves=None) -> bool:
    series = {}  # row -> (lengths, [(value, below, above)], seeds)
    for name, rs in grouped.items():
        if curves and name in curves:
            lengths = sorted(int(k) for k in curves[name])
            points = [curves[name][str(n)] for n in lengths]
            stats = [(p.value, p.value - p.low, p.high - p.value) for p in points]
            series[name] = (lengths, stats, len(rs))
        elif rs and rs[0].get("ppl"):
            lengths = sorted({int(k) for r in rs for k in r["ppl"]})
            cis = [mean_ci([r["ppl"].get(str(n)) for r in rs]) for n in lengths]
            series[name] = (lengths, [(m, h, h) for m, h in cis], len(rs))
    if not series:
        return False
    fig = figure(8.5, 4.2)
    ax = fig.add_subplot(1, 1, 1)
    n = len(series)
    for i, (name, (lengths, stats, seeds)) in enumerate(series.items()):
        dodge = 2 ** ((i - (n - 1) / 2) * 0.006)  # side by side, so error bars do not overlap
        style = _style(i)
        ax.errorbar(
            [x * dodge for x in lengths],
            [m for m, _, _ in stats],
            yerr=[
                [lo if math.isfinite(lo) else 0.0 for _, lo, _ in stats],
                [hi if math.isfinite(hi) else 0.0 for _, _, hi in stats],
            ],
            capsize=3,
            markersize=5,
            label=f"{name} (n={seeds})",
            **style,
        )
    from matplotlib.ticker import NullFormatter, ScalarFormatter

    ax.set_xscale("log", base=2)
    ticks = sorted({x for lengths, _, _ in series.values() for x in lengths})
    ax.set_xticks(ticks, [str(t) for t in ticks])
    ax.xaxis.set_minor_formatter(NullFormatter())
    formatter = ScalarFormatter(useOffset=False)
    formatter.set_scientific(False)
    ax.yaxis.set_major_formatter(formatter)
    ax.set_xlabel("evaluation context (tokens)")
    ax.set_ylabel("perplexity (95% CI)" if curves else "perplexity (mean ± 95% CI over seeds)")
    ax.set_title("Perplexity vs context length (full attention)")
    ax.grid(alpha=0.3)
    _legend_outside(fig, ax)
    _save(fig, path)
    return True


def _effective_rank_plot(path: Path, grouped) -> bool:
    """Mean effective rank of each decoder layer's updates (all modules, experts and seeds)."""
    series = {}
    for name, rs in grouped.items():
        per_layer: dict[int, list[float]] = {}
        for r in rs:
            by_module = r.get("svd", {}).get("effective_rank_by_layer") or {}
            for module, value in by_module.items():
                layer = layer_of(module)
                if layer is not None and value is not None and math.isfinite(value):
                    per_layer.setdefault(layer, []).append(value)
        if per_layer:
            layers = sorted(per_layer)
            series[name] = (
                layers,
                [sum(per_layer[k]) / len(per_layer[k]) for k in layers],
                [min(per_layer[k]) for k in layers],
                [max(per_layer[k]) for k in layers],
            )
    if not series:
        return False
    fig = figure(8.5, 4.2)
    ax = fig.add_subplot(1, 1, 1)
    n = len(series)
    for i, (name, (layers, means, lows, highs)) in enumerate(series.items()):
        x = [k + (i - (n - 1) / 2) * 0.6 / max(n, 1) for k in layers]
        ax.errorbar(
            x,
            means,
            yerr=[
                [m - lo for m, lo in zip(means, lows, strict=True)],
                [hi - m for m, hi in zip(means, highs, strict=True)],
            ],
            capsize=2,
            markersize=5,
            label=name,
            **_style(i),
        )
    all_layers = sorted({k for layers, *_ in series.values() for k in layers})
    ax.set_xticks(all_layers, [str(k) for k in all_layers])
    ax.set_xlabel("decoder layer")
    ax.set_ylabel("effective rank of dW")
    ax.set_ylim(bottom=0)
    ax.set_title("Effective rank by layer (mean over the layer's modules; bars: min–max)")
    ax.grid(alpha=0.3)
    _legend_outside(fig, ax)
    _save(fig, path)
    return True


def _spectra_plot(out: Path, grouped, path: Path) -> bool:
    """Mean normalised spectrum of dW per row (first seed's saved adapter)."""
    curves = {}
    for name, rs in grouped.items():
        if not rs or "loss_curve" not in rs[0]:
            continue
        adapter_dir = run_folder(out, name, rs[0]["seed"]) / "adapter"
        if not adapter_dir.is_dir():
            continue
        mean = mean_spectrum([spectrum(pair) for pair in read_factors(adapter_dir).values()])
        if mean is not None:
            curves[name] = mean.tolist()
    if not curves:
        return False
    fig = figure(8.5, 4.2)
    ax = fig.add_subplot(1, 1, 1)
    for i, (name, c) in enumerate(curves.items()):
        ax.plot(range(1, len(c) + 1), c, markersize=4, label=name, **_style(i))
    ax.set_yscale("log")
    plain_log_ticks(ax.yaxis)
    ax.set_xlabel("singular value index i")
    ax.set_ylabel("s_i / s_1 (mean over modules)")
    ax.set_title("Normalised spectra of the learned updates (first seed)")
    ax.grid(alpha=0.3, which="major")
    _legend_outside(fig, ax)
    _save(fig, path)
    return True
