"""The measures that compare a run with other runs, computed from the saved adapters once the
records of a write are known (after every run, and at a shard merge).

    records (one per run) ──► reference_runs: per seed, the reference run (the rule below)
                         ├──► similarity to the reference: svd.similarity_to_lora* per record
                         └──► seed-to-seed similarity: {row: {side: [phi per seed pair]}}

The rule, here and nowhere else: **the first finished run of the reference variant of a seed
(in plan order: rows as the config lists them) is that seed's reference**; every other
finished trained run of the seed is measured against it. The reference variant is the one the
variant contract marks (``AdapterConfig.is_reference``: plain LoRA). Which process ran a run
(one process, a concurrent group, a shard) does not change its reference.

A :class:`CrossRunMeasures` lives for one output folder: it reads each saved adapter once and
computes each pair once, however often the records are written.
"""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any, NamedTuple

import torch

from ..adapters.base import reference_variant
from ..config import ExperimentConfig
from ..io import read_factors
from .measure import factor_similarity, similarity_fields
from .records import run_folder

Factors = dict[str, tuple[torch.Tensor, torch.Tensor]]


class CrossRun(NamedTuple):
    """What the cross-run measures give the report besides the records they fill in.

    Attributes:
        reference: the reference row (that of the first seed's reference run in config
            order), or ``None`` when no reference-variant run has finished.
        seed_to_seed: ``{row: {key: [phi per pair]}}`` (:func:`seed_to_seed_similarity`).
    """

    reference: str | None
    seed_to_seed: dict[str, dict[str, list[float]]]


def _finished(record: dict[str, Any] | None) -> bool:
    return record is not None and record.get("status") == "ok"


def reference_runs(config: ExperimentConfig, results: dict[str, dict[str, Any]]) -> dict[int, str]:
    """``{seed: row}``: each seed's reference run (the module docstring's rule)."""
    variant = reference_variant()
    order = {row.name: i for i, row in enumerate(config.runs)}
    found: dict[int, str] = {}
    candidates = [
        r
        for r in results.values()
        if _finished(r) and variant is not None and r.get("variant") == variant
    ]
    for r in sorted(candidates, key=lambda r: order.get(r["row"], len(order))):
        if r["row"] in order:
            found.setdefault(int(r["seed"]), r["row"])
    return found


class CrossRunMeasures:
    """The cross-run measures of one output folder, cached across writes.

    Args:
        out: the output folder (its ``runs/<row>/seed<s>/adapter`` are read).
    """

    def __init__(self, out: Path) -> None:
        self.out = out
        self._factors: dict[Path, Factors] = {}
        self._phi: dict[tuple[Path, Path, str], float] = {}
        self._fields: dict[tuple[Path, Path], dict[str, float]] = {}

    def measure(self, config: ExperimentConfig, results: dict[str, dict[str, Any]]) -> CrossRun:
        """Fill every record's similarity to its seed's reference and measure seed to seed.

        Edits ``results``' records in place (``svd.similarity_to_lora*``). A saved adapter
        that cannot be read leaves its record as it is and its pairs out: an unreadable
        adapter never loses the numbers.
        """
        references = reference_runs(config, results)
        self._fill_similarity(config, results, references)
        order = [row.name for row in config.runs]
        reference = min(references.values(), key=order.index, default=None)
        try:
            seed_to_seed = self.seed_to_seed(config, results, reference)
        except Exception:  # an unreadable adapter must never lose the numbers
            seed_to_seed = {}
        return CrossRun(reference, seed_to_seed)

    def factors(self, adapter_dir: Path) -> Factors:
        """``{module: (B, A)}`` of a saved adapter, read once."""
        if adapter_dir not in self._factors:
            self._factors[adapter_dir] = read_factors(adapter_dir)
        return self._factors[adapter_dir]

    def _similarity(self, a: Path, b: Path, side: str) -> float:
        if (a, b, side) not in self._phi:
            self._phi[a, b, side] = factor_similarity(self.factors(a), self.factors(b), side)[0]
        return self._phi[a, b, side]

    def _fill_similarity(
        self,
        config: ExperimentConfig,
        results: dict[str, dict[str, Any]],
        references: dict[int, str],
    ) -> None:
        trained = {row.name for row in config.runs if row.trains}
        for record in results.values():
            seed, svd = int(record["seed"]), record.get("svd")
            reference = references.get(seed)
            if (
                reference is None
                or record["row"] == reference
                or record["row"] not in trained
                or not _finished(record)
                or not isinstance(svd, dict)
            ):
                continue
            ours = run_folder(self.out, record["row"], seed) / "adapter"
            theirs = run_folder(self.out, reference, seed) / "adapter"
            if (ours, theirs) not in self._fields:
                try:  # factor_similarity leaves MixLoRA's experts out
                    pair = self.factors(ours), self.factors(theirs)
                except (OSError, ValueError):
                    continue
                self._fields[ours, theirs] = similarity_fields(*pair)
            svd.update(self._fields[ours, theirs])

    def seed_to_seed(
        self,
        config: ExperimentConfig,
        results: dict[str, dict[str, Any]],
        reference: str | None,
    ) -> dict[str, dict[str, list[float]]]:
        """Similarities across seeds: the baseline a same-seed cross-method value must beat.

        Rows run with the same seed share A's random initialisation *and* the order of the
        training batches, and both shape the update (B's gradient is ``g (A x)^T``: its
        columns span the output gradients of the shared batches). Pairs from different seeds
        share neither. From the saved adapters ``runs/<row>/seed<s>``:

        - ``"left"``/``"right"``: the row against itself, every seed pair ``s < t``;
        - ``"vs_lora_left"``/``"vs_lora_right"``: the row at seed ``s`` against the
          ``reference`` row at every other seed ``t != s`` (for the reference row this equals
          its own seed-to-seed value), the like-for-like comparison with the reference's
          seed-to-seed baseline.

        Returns:
            ``{row: {key: [phi per pair]}}``; a key is present only when it has a pair.
        """

        def saved(name: str) -> dict[int, Path]:
            dirs = {
                int(r["seed"]): run_folder(self.out, name, r["seed"]) / "adapter"
                for r in results.values()
                if r["row"] == name and _finished(r) and r.get("adapter_params")
            }
            return {s: d for s, d in sorted(dirs.items()) if d.is_dir()}

        lora = saved(reference) if reference else {}
        found: dict[str, dict[str, list[float]]] = {}
        for spec in config.runs:
            own = saved(spec.name)
            entry: dict[str, list[float]] = {}
            pairs = list(itertools.combinations(own.values(), 2))
            cross = [(own[s], lora[t]) for s in own for t in lora if s != t]
            for side in ("left", "right"):
                if pairs:
                    entry[side] = [self._similarity(a, b, side) for a, b in pairs]
                if cross:
                    entry[f"vs_lora_{side}"] = [self._similarity(a, b, side) for a, b in cross]
            if entry:
                found[spec.name] = entry
        return found


def seed_to_seed_similarity(
    out: Path, config: ExperimentConfig, results: dict[str, dict[str, Any]]
) -> dict[str, dict[str, list[float]]]:
    """:meth:`CrossRunMeasures.seed_to_seed` against the reference row, on their own (records
    left as they are)."""
    order = [row.name for row in config.runs]
    reference = min(reference_runs(config, results).values(), key=order.index, default=None)
    return CrossRunMeasures(out).seed_to_seed(config, results, reference)
