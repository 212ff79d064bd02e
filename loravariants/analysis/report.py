"""``analyze()``: every update of an adapter, as rows of spectral metrics.

Sources it reads (one normalising function, :func:`collect_updates`):

* a model with adapters attached (every adapter, every layer; MixLoRA experts one by one);
* a saved adapter directory — ours (native, peft, mixlora formats) or any peft LoRA directory —
  from the files alone, without building a model;
* a single adapter layer, a ``(B, A)`` pair, a dense matrix, or a ``{name: any of those}`` dict.

Base weights are only needed for the metrics relative to ``W`` (amplification factor, intruder
dimensions); pass ``base=`` a model, a ``{module name: weight}`` dict, or a local HF model path.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import math
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..inject import adapter_config, adapter_names, iter_adapters
from ..io import read_factors, saved_variant
from ..utils import atomic_write, printable
from .svd import (
    amplification_factor,
    effective_rank,
    energy,
    intruder_dimensions,
    numerical_rank,
    spectrum,
    stable_rank,
    svd,
    top_singular,
)

__all__ = [
    "Update",
    "LayerAnalysis",
    "AnalysisReport",
    "collect_updates",
    "analyze",
]

_LAYER_INDEX = re.compile(r"(?:^|\.)(?:layers|h|blocks|layer)\.(\d+)\.")
_EXPERT = re.compile(r"^(.*)\.experts\.(\d+)$")
_PEFT_PREFIX = "base_model.model."


@dataclass
class Update:
    """One low-rank update to analyse.

    Attributes:
        module: qualified module name (MixLoRA experts: ``"<ffn>.<proj>.experts.<e>"``).
        factors: ``(B (out, k), A (k, in))`` with the scaling folded in, or a dense ``(out, in)``.
        variant: ``"lora"``, ``"cola"``, ``"multilora"``, ``"mixlora"``, or ``""`` if unknown.
        adapter: adapter name (models with several adapters), else ``""``.
    """

    module: str
    factors: tuple[torch.Tensor, torch.Tensor] | torch.Tensor
    variant: str = ""
    adapter: str = ""

    @property
    def base_module(self) -> str:
        """The frozen module this update applies to (an expert's projection for MixLoRA)."""
        m = _EXPERT.match(self.module)
        return m.group(1) if m else self.module

    @property
    def expert(self) -> int | None:
        m = _EXPERT.match(self.module)
        return int(m.group(2)) if m else None

    @property
    def layer_type(self) -> str:
        """Last component of the frozen module's name: ``q_proj``, ``gate_proj``..."""
        return self.base_module.rsplit(".", 1)[-1]

    @property
    def layer_index(self) -> int | None:
        m = _LAYER_INDEX.search(self.base_module + ".")
        return int(m.group(1)) if m else None

    def dense(self) -> torch.Tensor:
        """``dW`` as a dense float64 ``(out, in)`` matrix."""
        if isinstance(self.factors, torch.Tensor):
            return self.factors.detach().to(torch.float64)
        B, A = self.factors
        return B.to(torch.float64) @ A.to(torch.float64)


# ---------------------------------------------------------------------------------------------
# normalising sources
# ---------------------------------------------------------------------------------------------


def collect_updates(source: Any) -> list[Update]:
    """Every update in ``source`` (see the module docstring for what a source can be).

    Raises:
        FileNotFoundError: a path that does not exist.
        ValueError: a directory that is not an adapter, or corrupt files.
        TypeError: an object of no known kind.
    """
    if isinstance(source, (str, os.PathLike)):
        return _updates_from_directory(Path(source))
    if isinstance(source, nn.Module) and not hasattr(source, "factors"):
        return _updates_from_model(source)
    if isinstance(source, Mapping):
        out = []
        for name, item in source.items():
            if isinstance(item, Update):
                out.append(item)
            else:
                out.extend(_updates_from_object(item, str(name)))
        return out
    return _updates_from_object(source, "update")


def _updates_from_object(obj: Any, name: str) -> list[Update]:
    variant = getattr(getattr(obj, "config", None), "variant", "")
    if hasattr(obj, "named_factors"):  # an adapter layer: each component (MixLoRA: experts)
        pairs = obj.named_factors().items()
        return [Update(name + suffix, pair, variant) for suffix, pair in pairs]
    if hasattr(obj, "factors"):
        return [Update(name, obj.factors(), variant)]
    if isinstance(obj, (tuple, list)) and len(obj) == 2:
        return [Update(name, (torch.as_tensor(obj[0]), torch.as_tensor(obj[1])))]
    if isinstance(obj, torch.Tensor) and obj.dim() == 2:
        return [Update(name, obj)]
    raise TypeError(
        "expected a model with adapters, an adapter directory, an adapter layer, a (B, A) pair "
        f"or a 2-D matrix, got {type(obj).__name__}"
    )


def _updates_from_model(model: nn.Module) -> list[Update]:
    names = adapter_names(model)
    variants = {n: adapter_config(model, n).variant for n in names}
    out = []
    for path, name, layer in iter_adapters(model):
        for u in _updates_from_object(layer, path):
            u.adapter = name if len(names) > 1 else ""
            u.variant = variants.get(name, u.variant)  # MixLoRA's attention LoRA: "mixlora"
            out.append(u)
    if not out:
        raise ValueError(f"{type(model).__name__} has no adapters attached")
    return out


def _updates_from_directory(directory: Path) -> list[Update]:
    if not directory.exists():
        raise FileNotFoundError(f"{directory}: no such adapter directory")
    if not directory.is_dir():
        raise ValueError(f"{directory}: not a directory")
    variant = saved_variant(directory)  # the format that holds it says which variant
    try:
        factors = read_factors(directory)
    except KeyError as e:  # a config file without a required entry
        raise ValueError(f"{directory}: incomplete adapter config (missing {e})") from e
    if not factors:
        raise ValueError(f"{directory}: no LoRA factors found")
    return [Update(module, pair, variant) for module, pair in factors.items()]


# ---------------------------------------------------------------------------------------------
# base weights, on demand
# ---------------------------------------------------------------------------------------------


class _BaseWeights:
    """Looks up the frozen weight of a module in a model, a state dict, or a local HF path."""

    def __init__(self, base: Any) -> None:
        self._source = base
        self._model: nn.Module | None = None
        self._dict: Mapping[str, torch.Tensor] | None = None

    def _load(self) -> None:
        base = self._source
        if isinstance(base, nn.Module):
            self._model = base
        elif isinstance(base, Mapping):
            self._dict = base
        elif isinstance(base, (str, os.PathLike)):
            if not Path(base).exists():
                raise FileNotFoundError(f"{base}: base model not found (a local path is needed)")
            from transformers import AutoModelForCausalLM

            try:
                self._model = AutoModelForCausalLM.from_pretrained(
                    str(base), local_files_only=True, dtype=torch.float32
                )
            except (OSError, ValueError) as e:
                raise ValueError(f"{base}: cannot load the base model ({e})") from e
        else:
            raise TypeError(f"base must be a model, a dict of weights or a path, got {base!r}")

    def weight(self, module: str) -> torch.Tensor | None:
        if self._model is None and self._dict is None:
            self._load()
        if self._dict is not None:
            for key in (module + ".weight", module, _PEFT_PREFIX + module + ".weight"):
                if key in self._dict:
                    return torch.as_tensor(self._dict[key])
            return None
        mod = self._model
        for part in module.split("."):
            # step through adapter hosts to the frozen module they hold
            children = dict(mod.named_children())
            if part not in children and "base_layer" in children:
                children = dict(children["base_layer"].named_children())
            if part not in children:
                return None
            mod = children[part]
        mod = getattr(mod, "base_layer", mod)
        w = getattr(mod, "weight", None)
        return w.detach() if isinstance(w, torch.Tensor) else None


# ---------------------------------------------------------------------------------------------
# the report
# ---------------------------------------------------------------------------------------------


@dataclass
class LayerAnalysis:
    """Metrics of one update (see :mod:`loravariants.analysis.svd` for the formulas)."""

    module: str
    layer_type: str
    layer_index: int | None
    expert: int | None
    variant: str
    adapter: str
    out_features: int
    in_features: int
    rank: int  # width k of the factors (numerical rank for dense input)
    numerical_rank: int
    frobenius_norm: float
    effective_rank: float
    stable_rank: float
    energy: dict[int, float]
    singular_values: torch.Tensor
    amplification: float | None = None
    intruders: int | None = None
    intruder_energy: float | None = None

    def row(self, with_spectrum: bool = True) -> dict[str, Any]:
        row: dict[str, Any] = {
            "module": self.module,
            "layer_type": self.layer_type,
            "layer_index": self.layer_index,
            "expert": self.expert,
            "variant": self.variant,
            "adapter": self.adapter,
            "out_features": self.out_features,
            "in_features": self.in_features,
            "rank": self.rank,
            "numerical_rank": self.numerical_rank,
            "frobenius_norm": self.frobenius_norm,
            "top_singular_value": float(self.singular_values[0])
            if len(self.singular_values)
            else 0.0,
            "effective_rank": self.effective_rank,
            "stable_rank": self.stable_rank,
        }
        row.update({f"energy_top{k}": v for k, v in self.energy.items()})
        if self.amplification is not None:
            row["amplification"] = self.amplification
        if self.intruders is not None:
            row["intruders"] = self.intruders
            row["intruder_energy"] = self.intruder_energy
        if with_spectrum:
            row["singular_values"] = [float(s) for s in self.singular_values]
        return row


_MEAN_KEYS = (
    "rank",
    "numerical_rank",
    "frobenius_norm",
    "top_singular_value",
    "effective_rank",
    "stable_rank",
    "amplification",
    "intruders",
    "intruder_energy",
)


@dataclass
class AnalysisReport:
    """Per-update metrics, exportable without pandas.

    Attributes:
        layers: one :class:`LayerAnalysis` per update, in the source's order.
        energy_k: the ``k`` of the ``energy_top{k}`` columns.
    """

    layers: list[LayerAnalysis] = field(default_factory=list)
    energy_k: tuple[int, ...] = (1, 4)

    def __len__(self) -> int:
        return len(self.layers)

    def rows(self, with_spectrum: bool = True) -> list[dict[str, Any]]:
        """One dict per update (``singular_values`` as a list of floats unless disabled)."""
        return [layer.row(with_spectrum) for layer in self.layers]

    def spectra(self) -> dict[str, torch.Tensor]:
        """``{module: singular values}``."""
        return {layer.module: layer.singular_values for layer in self.layers}

    def by_type(self) -> list[dict[str, Any]]:
        """Means per ``(variant, layer type)``: ``count`` plus every numeric metric."""
        groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
        for row in self.rows(with_spectrum=False):
            groups.setdefault((row["variant"], row["layer_type"]), []).append(row)
        out = []
        for (variant, layer_type), rows in groups.items():
            agg: dict[str, Any] = {"variant": variant, "layer_type": layer_type, "count": len(rows)}
            keys = [k for k in (*_MEAN_KEYS, *(f"energy_top{k}" for k in self.energy_k))]
            for key in keys:
                values = [r[key] for r in rows if r.get(key) is not None]
                values = [float(v) for v in values if math.isfinite(float(v))]
                if key in rows[0]:
                    agg[key] = sum(values) / len(values) if values else math.nan
            out.append(agg)
        return out

    def to_csv(self, path: str | os.PathLike) -> Path:
        """Write :meth:`rows` as CSV (the spectrum as one space-separated column)."""
        rows = self.rows()
        path = Path(path)
        columns: list[str] = []
        for row in rows:
            columns += [k for k in row if k not in columns]
        text = io.StringIO(newline="")
        writer = csv.DictWriter(text, fieldnames=columns)
        writer.writeheader()
        for row in rows:
            row = dict(row)
            if "singular_values" in row:
                row["singular_values"] = " ".join(f"{s:.8g}" for s in row["singular_values"])
            writer.writerow(row)
        atomic_write(path, text.getvalue())
        return path

    def to_json(self, path: str | os.PathLike) -> Path:
        """Write ``{"layers": rows(), "by_type": by_type()}`` as JSON (NaN written as null)."""
        path = Path(path)
        data = {"layers": self.rows(), "by_type": self.by_type()}
        atomic_write(path, json.dumps(_nan_to_none(data), indent=2))
        return path

    def table(self, max_rows: int | None = None) -> str:
        """A plain-text table, one line per update."""
        cols = ["module", "variant", "rank", "effective_rank", "stable_rank"]
        cols += [f"energy_top{k}" for k in self.energy_k]
        rows = self.rows(with_spectrum=False)
        if rows and "amplification" in rows[0]:
            cols += ["amplification", "intruders"]
        shown = rows if max_rows is None else rows[:max_rows]
        cells = [[_fmt(r.get(c)) for c in cols] for r in shown]
        widths = [
            max(len(c), *(len(row[i]) for row in cells)) if cells else len(c)
            for i, c in enumerate(cols)
        ]
        lines = ["  ".join(c.ljust(w) for c, w in zip(cols, widths, strict=True))]
        lines += ["  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)) for row in cells]
        if max_rows is not None and len(rows) > max_rows:
            lines.append(f"... {len(rows) - max_rows} more")
        return "\n".join(lines)

    def type_table(self) -> str:
        """The means per variant and layer type (:meth:`by_type`) as aligned text columns."""
        rows = self.by_type()
        cols = ["variant", "layer_type", "count", "effective_rank", "stable_rank"]
        cols += [f"energy_top{k}" for k in self.energy_k]
        cells = [[_fmt(r.get(c)) for c in cols] for r in rows]
        widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(cols)]
        lines = ["  ".join(c.ljust(w) for c, w in zip(cols, widths, strict=True))]
        lines += ["  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)) for row in cells]
        return "\n".join(lines)


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return "nan" if math.isnan(v) else f"{v:.4g}"
    # a module name comes from the adapter's files: escaped, so it cannot drive the terminal
    return "" if v is None else printable(v, limit=200)


def _nan_to_none(x: Any) -> Any:
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: _nan_to_none(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_nan_to_none(v) for v in x]
    return x


def analyze(
    source: Any,
    base: Any = None,
    *,
    energy_k: Sequence[int] = (1, 4),
    intruder_k: int = 10,
    intruder_eps: float = 0.5,
    intruder_base_k: int | None = None,
    threads: int | None = 1,
) -> AnalysisReport:
    """Spectral analysis of every update in ``source``.

    Args:
        source: a model with adapters, an adapter directory (ours or peft LoRA), an adapter
            layer, a ``(B, A)`` pair, a dense matrix, or a ``{name: source}`` dict.
        base: frozen weights for the W-relative metrics (amplification factor, intruder
            dimensions): a model, a ``{module name: weight}`` dict, or a local HF model path.
            Loaded only when given. For COLA, pass the *original* base (a model with a COLA
            adapter attached already holds the folded links in its frozen weights).
        energy_k: the ``k`` of the ``energy_top{k}`` columns.
        intruder_k, intruder_eps: parameters of :func:`~loravariants.analysis.intruder_dimensions`.
        intruder_base_k: compare with the top ``intruder_base_k`` singular vectors of each base
            weight only (randomized SVD) instead of all of them (a dense SVD per module, slow
            for 4096 x 4096 weights on a CPU).
        threads: torch intra-op threads while computing the per-update spectra (restored
            afterwards). The QRs of ``(out, k)`` factors are too small to gain from threads and
            lose badly to contention on a busy machine, so 1 is the default; ``None`` keeps
            torch's setting. The base-weight SVDs always use torch's setting.

    Returns:
        An :class:`AnalysisReport` (one :class:`LayerAnalysis` per update).
    """
    updates = collect_updates(source)
    weights = _BaseWeights(base) if base is not None else None
    layers = []
    base_svd_cache: dict[str, Any] = {}
    for u in updates:
        la = _spectral_analysis(u, energy_k, threads)
        if weights is not None:
            W = _base_weight(weights, u)
            la.amplification = amplification_factor(u.factors, W)
            if u.base_module not in base_svd_cache:
                base_svd_cache[u.base_module] = (
                    svd(W) if intruder_base_k is None else top_singular(W, intruder_base_k)
                )
            found = intruder_dimensions(
                W + u.dense(), base_svd_cache[u.base_module], intruder_k, intruder_eps
            )
            la.intruders, la.intruder_energy = found.count, found.energy_share
        layers.append(la)
    return AnalysisReport(layers, tuple(energy_k))


def _shape(u) -> tuple[int, int]:
    """``(out_features, in_features)`` of an update given densely or as ``(B, A)``."""
    if isinstance(u.factors, torch.Tensor):
        return tuple(u.factors.shape)
    return u.factors[0].shape[0], u.factors[1].shape[1]


def _spectral_analysis(u, energy_k: Sequence[int], threads: int | None) -> LayerAnalysis:
    """The metrics of one update that need no base weight (its spectrum's ranks, norm and
    energies)."""
    out_f, in_f = _shape(u)
    with _threads(threads):
        s = spectrum(u.factors)
    nrank = numerical_rank(s, rtol=max(out_f, in_f) * torch.finfo(torch.float32).eps)
    width = nrank if isinstance(u.factors, torch.Tensor) else u.factors[0].shape[1]
    return LayerAnalysis(
        module=u.module,
        layer_type=u.layer_type,
        layer_index=u.layer_index,
        expert=u.expert,
        variant=u.variant,
        adapter=u.adapter,
        out_features=int(out_f),
        in_features=int(in_f),
        rank=int(width),
        numerical_rank=nrank,
        frobenius_norm=float(s.pow(2).sum().sqrt()),
        effective_rank=effective_rank(s),
        stable_rank=stable_rank(s),
        energy={k: energy(s, k) for k in energy_k},
        singular_values=s,
    )


def _base_weight(weights, u) -> torch.Tensor:
    """The base weight under update ``u``, as float64, checked against the update's shape."""
    W = weights.weight(u.base_module)
    if W is None:
        raise ValueError(f"base has no weight for {u.base_module}")
    W = W.to(torch.float64)
    out_f, in_f = _shape(u)
    if tuple(W.shape) != (out_f, in_f):
        raise ValueError(
            f"base weight of {u.base_module} is {tuple(W.shape)}, update is {(out_f, in_f)}"
        )
    return W


@contextlib.contextmanager
def _threads(n: int | None):
    previous = torch.get_num_threads()
    if n is not None and n != previous:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        if torch.get_num_threads() != previous:
            torch.set_num_threads(previous)
