"""Plots of the SVD analysis (matplotlib, no display needed).

Figures are built with ``matplotlib.figure.Figure`` directly, never through pyplot's global
state, so they work headless (Agg) and in threads. The file extension picks the format
(``.png``, ``.svg``, ``.pdf``). Every function returns the path it wrote.
"""

from __future__ import annotations

import io
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from ..utils import atomic_write
from .report import AnalysisReport, analyze
from .svd import similarity_matrix, subspace_similarity_grid

__all__ = [
    "plot_spectra",
    "plot_effective_rank",
    "plot_similarity_heatmap",
    "plot_subspace_similarity",
    "plot_expert_similarity",
]

_FORMATS = (".png", ".svg", ".pdf")


def figure(width: float, height: float):
    """A matplotlib figure that is not registered with pyplot (no GUI, no global state)."""
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height))


def mean_spectrum(spectra: Sequence[torch.Tensor], normalize: bool = True) -> torch.Tensor | None:
    """The mean of several spectra truncated to the shortest, each ``s_i / s_1`` when
    ``normalize``; empty or all-zero spectra are left out (``None`` when none is left).

    Args:
        spectra: singular values, each of shape ``(k_j,)``, descending.

    Returns:
        Shape ``(min_j k_j,)``.
    """
    spectra = [s / s[0] if normalize else s for s in spectra if len(s) and s[0] > 0]
    if not spectra:
        return None
    k = min(len(s) for s in spectra)
    return torch.stack([torch.as_tensor(s[:k]) for s in spectra]).mean(0)


def _save(fig, path: str | os.PathLike) -> Path:
    path = Path(path)
    if path.suffix.lower() not in _FORMATS:
        raise ValueError(f"plot path must end in one of {list(_FORMATS)}, got {path.name!r}")
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    image = io.BytesIO()
    fig.savefig(image, format=path.suffix.lower().lstrip("."), dpi=120)
    atomic_write(path, image.getvalue())  # never through a link planted at the plot's name
    return path


def _as_reports(reports: Mapping[str, Any] | AnalysisReport) -> dict[str, AnalysisReport]:
    if isinstance(reports, AnalysisReport):
        return {"adapter": reports}
    return {
        str(label): r if isinstance(r, AnalysisReport) else analyze(r)
        for label, r in reports.items()
    }


def plot_spectra(
    reports: Mapping[str, Any] | AnalysisReport,
    path: str | os.PathLike,
    normalize: bool = True,
    log: bool = True,
) -> Path:
    """Spectra of several adapters overlaid, one panel per layer type.

    Each curve is one adapter's mean spectrum over the modules of that layer type (truncated to
    the shortest), ``s_i / s_1`` when ``normalize``.

    Args:
        reports: ``{label: AnalysisReport or any analyze() source}``, or one report.
        path: output file (.png/.svg/.pdf).
        normalize: divide each spectrum by its largest value first.
        log: logarithmic y axis.
    """
    reports = _as_reports(reports)
    types = list(dict.fromkeys(la.layer_type for r in reports.values() for la in r.layers))
    if not types:
        raise ValueError("nothing to plot: the reports are empty")
    cols = min(len(types), 4)
    rows = math.ceil(len(types) / cols)
    fig = figure(3.6 * cols, 3.0 * rows)
    for n, layer_type in enumerate(types):
        ax = fig.add_subplot(rows, cols, n + 1)
        for c, (label, report) in enumerate(reports.items()):  # one colour per adapter
            spectra = [la.singular_values for la in report.layers if la.layer_type == layer_type]
            mean = mean_spectrum(spectra, normalize)
            if mean is None:
                continue
            ax.plot(
                range(1, len(mean) + 1), mean.tolist(), marker=".", label=label, color=f"C{c % 10}"
            )
        ax.set_title(layer_type)
        ax.set_xlabel("index i")
        ax.set_ylabel("s_i / s_1" if normalize else "s_i")
        if log:
            ax.set_yscale("log")
            plain_log_ticks(ax.yaxis)
        ax.legend(fontsize=7)
    return _save(fig, path)


def plain_log_ticks(axis) -> None:
    """Log-axis ticks at 1, 2, 5 x 10^k labelled as plain numbers (0.05, not 5 x 10^-2)."""
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    axis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    axis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    axis.set_minor_formatter(NullFormatter())


def plot_effective_rank(
    reports: Mapping[str, Any] | AnalysisReport, path: str | os.PathLike
) -> Path:
    """Effective rank of every update, by module, one line per adapter and layer type."""
    reports = _as_reports(reports)
    fig = figure(8, 4)
    ax = fig.add_subplot(1, 1, 1)
    max_rank = 0
    for label, report in reports.items():
        by_type: dict[str, list[tuple[float, float]]] = {}
        for pos, la in enumerate(report.layers):
            x = la.layer_index if la.layer_index is not None else pos
            if la.expert is not None:
                x = x + 0.8 * la.expert / max(1, _experts(report))
            by_type.setdefault(la.layer_type, []).append((x, la.effective_rank))
            max_rank = max(max_rank, la.rank)
        for layer_type, points in by_type.items():
            xs, ys = zip(*points, strict=True)
            ax.plot(xs, ys, marker="o", linestyle="-", label=f"{label}: {layer_type}")
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("layer index")
    ax.set_ylabel("effective rank")
    ax.set_ylim(bottom=0, top=max(1, max_rank) * 1.05)
    ax.legend(fontsize=7, ncol=2)
    return _save(fig, path)


def _experts(report: AnalysisReport) -> int:
    return 1 + max((la.expert for la in report.layers if la.expert is not None), default=0)


def plot_similarity_heatmap(
    matrix: torch.Tensor,
    path: str | os.PathLike,
    labels: Sequence[str] | None = None,
    col_labels: Sequence[str] | None = None,
    title: str = "",
    xlabel: str = "",
    ylabel: str = "",
) -> Path:
    """A heatmap of values in [0, 1] (subspace similarities), annotated when small."""
    M = torch.as_tensor(matrix, dtype=torch.float64)
    fig = figure(1.2 + 0.45 * M.shape[1] if M.shape[1] > 8 else 5.5, 4.5)
    ax = fig.add_subplot(1, 1, 1)
    image = ax.imshow(M.numpy(), vmin=0.0, vmax=1.0, cmap="viridis", aspect="auto")
    fig.colorbar(image, ax=ax, label="phi")
    rows_l = list(labels) if labels is not None else None
    cols_l = list(col_labels) if col_labels is not None else rows_l
    if rows_l is not None:
        ax.set_yticks(range(M.shape[0]), rows_l, fontsize=7)
    if cols_l is not None:
        ax.set_xticks(range(M.shape[1]), cols_l, fontsize=7, rotation=90)
    if M.numel() <= 100:
        for p in range(M.shape[0]):
            for q in range(M.shape[1]):
                v = float(M[p, q])
                ax.text(
                    q,
                    p,
                    f"{v:.2f}",
                    ha="center",
                    va="center",
                    fontsize=6,
                    color="black" if v > 0.6 else "white",
                )
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    return _save(fig, path)


def plot_subspace_similarity(
    a: Any,
    b: Any,
    path: str | os.PathLike,
    max_i: int | None = None,
    max_j: int | None = None,
    side: str = "right",
    title: str = "",
) -> Path:
    """``phi(a, b, i, j)`` over ``i = 1..max_i``, ``j = 1..max_j`` (LoRA paper, Fig. 3)."""
    grid = subspace_similarity_grid(a, b, max_i, max_j, side)
    return plot_similarity_heatmap(
        grid,
        path,
        labels=[str(i) for i in range(1, grid.shape[0] + 1)],
        col_labels=[str(j) for j in range(1, grid.shape[1] + 1)],
        title=title or "subspace similarity phi(i, j)",
        xlabel="j (top-j of second)",
        ylabel="i (top-i of first)",
    )


def plot_expert_similarity(
    layer_or_experts: Any, path: str | os.PathLike, i: int | None = None, side: str = "right"
) -> Path:
    """Pairwise ``phi`` between the experts of one MixLoRA layer, one panel per projection.

    Args:
        layer_or_experts: a layer with ``expert_factors()``, or ``{proj: [(B, A), ...]}``.
        path: output file.
        i: top-i singular vectors compared (default: the expert rank).
        side: ``"right"`` or ``"left"``.
    """
    experts = (
        layer_or_experts.expert_factors()
        if hasattr(layer_or_experts, "expert_factors")
        else layer_or_experts
    )
    projs = list(experts)
    fig = figure(4.2 * len(projs), 4.0)
    for n, proj in enumerate(projs):
        pairs = experts[proj]
        k = i if i is not None else pairs[0][1].shape[0]
        labels, M = similarity_matrix({f"e{e}": p for e, p in enumerate(pairs)}, k, side=side)
        ax = fig.add_subplot(1, len(projs), n + 1)
        image = ax.imshow(M.numpy(), vmin=0.0, vmax=1.0, cmap="viridis")
        ax.set_xticks(range(len(labels)), labels, fontsize=7)
        ax.set_yticks(range(len(labels)), labels, fontsize=7)
        ax.set_title(f"{proj}: phi, top {k}")
        fig.colorbar(image, ax=ax, fraction=0.046)
    return _save(fig, path)
