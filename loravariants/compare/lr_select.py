"""Learning-rate selection (``lr_grid``): one rate per method, chosen on held-out documents.

For every trained row without its own ``lr``::

    for lr in lr_grid:                          every candidate rate
        for seed in lr_grid_seeds:              (default [0])
            train the row for lr_grid_steps     (default train.max_steps; what the adapter
                                                places over the run's length, a chain's
                                                knots, is placed over these steps)
            ppl on the selection split          data.selection_fraction's documents, at the
                                                longest evaluated length
    chosen = argmin over lr of the mean ppl     (ties: the first in the grid)

then the row's seeds run at ``chosen``. The selection documents are disjoint from the
validation (test) documents and from the training documents (``data/corpus.py``), so the rate
is never chosen on the tokens the comparison reports.

Each selection run is a record of its own (``output_dir/lr_selection/<row>/lr<lr>/seed<s>.json``,
written atomically), so a rerun resumes: a record whose settings still match is kept. The
summary goes into results.json as ``lr_selection`` (:func:`selection_summary`).
"""

from __future__ import annotations

import hashlib
import json
import math
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

from torch import nn

from ..config import ExperimentConfig, RunSpec
from ..utils import atomic_write, printable

__all__ = [
    "SELECTION_DIR",
    "selection_rows",
    "selection_file",
    "select_learning_rates",
    "selection_summary",
    "selection_steps",
]

#: the selection runs' records, under the output folder
SELECTION_DIR = "lr_selection"
# the largest selection record read (a few hundred bytes)
_MAX_RECORD_BYTES = 1 << 16


def selection_rows(config: ExperimentConfig) -> list[RunSpec]:
    """The rows whose rate ``lr_grid`` chooses (trained, no ``lr`` of their own)."""
    return [row for row in config.runs if config.needs_lr_selection(row)]


def selection_steps(config: ExperimentConfig) -> int:
    return config.lr_grid_steps or config.train.max_steps


def selection_file(out: Path, row: str, lr: float, seed: int) -> Path:
    return out / SELECTION_DIR / row / f"lr{lr:g}" / f"seed{seed}.json"


def _fingerprint(config: ExperimentConfig, row: RunSpec, overrides: dict[str, Any]) -> str:
    """What a selection run's outcome depends on (not the comparison's seeds or other rows,
    nor the report-only comparator/question)."""
    row_fields = {k: v for k, v in asdict(row).items() if k not in ("comparator", "question")}
    fields = {
        "base_model": config.base_model,
        "base_model_config": config.base_model_config,
        "data": asdict(config.data),
        "context": asdict(config.context),
        "train": {
            k: v for k, v in asdict(config.train).items() if k not in ("report_to", "eval_every")
        },
        "eval": [config.eval.lengths, config.eval.max_tokens, config.eval.stride_ratio],
        "steps": selection_steps(config),
        "row": row_fields,
        "overrides": overrides,
    }
    text = json.dumps(fields, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _read(file: Path, fingerprint: str) -> dict[str, Any] | None:
    """A finished selection record of these settings, or None (absent, unreadable, another
    experiment's, or failed: a failed one is tried again)."""
    try:
        if not file.is_file() or file.stat().st_size > _MAX_RECORD_BYTES:
            return None
        record = json.loads(file.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(record, dict) or record.get("fingerprint") != fingerprint:
        return None
    ppl = record.get("selection_ppl")
    if record.get("status") != "ok" or not isinstance(ppl, (int, float)):
        return None
    return record


def select_learning_rates(
    config: ExperimentConfig,
    out: Path,
    rows: list[RunSpec],
    overrides: dict[str, dict[str, Any]],
    train_row: Callable[[RunSpec, int, float, int], nn.Module],
    score: Callable[[nn.Module], float],
    log: Callable[[str], None] = print,
    start: float = 0.0,
) -> dict[str, float | None]:
    """Run (or resume) the selection of ``rows``; their chosen rates.

    Args:
        config: the experiment (``lr_grid``, ``lr_grid_seeds``, ``lr_grid_steps``).
        out: the output folder (records go to ``out/lr_selection``).
        rows: the rows to choose a rate for (:func:`selection_rows`, or a shard's share).
        overrides: adapter overrides by row (``match_params`` applied), for the fingerprint.
        train_row: ``(row, seed, lr, steps) -> trained model`` -- exactly the row's training.
        score: ``model -> perplexity`` on the selection split.
        log: one-line progress messages.
        start: where in the list of selection runs to begin, as a share in [0, 1) (shard
            ``i`` of ``N``: ``i / N``): shards that need the same rows then work on different
            runs first, and each finds the others' records (checked just before each run).

    Returns:
        ``{row: chosen rate}``; ``None`` for a row where every rate failed (its runs then
        fail with that reason).
    """
    grid, seeds, steps = config.lr_grid or [], config.lr_grid_seeds, selection_steps(config)
    prints = {row.name: _fingerprint(config, row, overrides.get(row.name, {})) for row in rows}
    jobs = [(row, lr, seed) for row in rows for lr in grid for seed in seeds]
    first = int(start * len(jobs)) % max(len(jobs), 1)
    done: dict[tuple[str, float, int], dict[str, Any]] = {}
    for row, lr, seed in jobs[first:] + jobs[:first]:
        file = selection_file(out, row.name, lr, seed)
        record = _read(file, prints[row.name])
        if record is None:
            log(f"lr selection {row.name}: lr={lr:g} seed {seed} ({steps} steps)")
            record = _run(row, seed, lr, steps, train_row, score, prints[row.name], file)
        done[(row.name, lr, seed)] = record
    chosen: dict[str, float | None] = {}
    for row in rows:
        means = {}
        for lr in grid:
            values = [done[(row.name, lr, seed)] for seed in seeds]
            ok = [r["selection_ppl"] for r in values if r["status"] == "ok"]
            means[lr] = sum(ok) / len(ok) if len(ok) == len(values) else math.inf
        finite = {lr: m for lr, m in means.items() if math.isfinite(m)}
        best = min(finite, key=lambda lr: (finite[lr], grid.index(lr))) if finite else None
        chosen[row.name] = best
        shown = ", ".join(f"{lr:g}: {m:.2f}" for lr, m in means.items())
        log(f"lr selection {row.name}: selection ppl {{{shown}}} -> {best}")
    return chosen


def _run(row, seed, lr, steps, train_row, score, fingerprint, file) -> dict[str, Any]:
    """One selection run as a record (never raises: a diverged rate is a failed record)."""
    start, cpu = time.perf_counter(), time.process_time()
    record: dict[str, Any] = {
        "row": row.name,
        "lr": lr,
        "seed": seed,
        "steps": steps,
        "fingerprint": fingerprint,
    }
    try:
        model = train_row(row, seed, lr, steps)
        ppl = float(score(model))
        if not math.isfinite(ppl):
            raise ValueError(f"selection perplexity is {ppl}")
        record.update(status="ok", selection_ppl=ppl)
    except Exception as e:  # a rate that diverges loses the selection, not the comparison
        record.update(status="failed", reason=printable(f"{type(e).__name__}: {e}", limit=300))
        record["traceback"] = traceback.format_exc(limit=5)
    record["elapsed_s"] = time.perf_counter() - start
    record["cpu_s"] = time.process_time() - cpu
    file.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(file, json.dumps(record, indent=2))
    return record


def selection_summary(out: Path, config: ExperimentConfig) -> dict[str, dict[str, Any]]:
    """results.json's ``lr_selection``: per selected row ``{"grid", "selection_ppl": {lr:
    mean ppl over the seeds}, "chosen", "seeds", "steps"}``, from the records on disk (rows
    whose selection has not finished are left out)."""
    if not config.lr_grid:
        return {}
    grid, seeds, steps = config.lr_grid, config.lr_grid_seeds, selection_steps(config)
    summary: dict[str, dict[str, Any]] = {}
    for row in selection_rows(config):
        ppl: dict[str, float | None] = {}
        for lr in grid:
            values = []
            for seed in seeds:
                record = _read_any(selection_file(out, row.name, lr, seed))
                if record is None:
                    break
                values.append(record.get("selection_ppl") if record["status"] == "ok" else None)
            else:
                finite = [v for v in values if isinstance(v, (int, float))]
                ppl[f"{lr:g}"] = sum(finite) / len(finite) if len(finite) == len(values) else None
                continue
            break
        if len(ppl) != len(grid):
            continue
        ok = {lr: v for lr, v in zip(grid, ppl.values(), strict=True) if v is not None}
        best = min(ok, key=lambda lr: (ok[lr], grid.index(lr))) if ok else None
        summary[row.name] = {
            "grid": list(grid),
            "selection_ppl": ppl,
            "chosen": best,
            "seeds": list(seeds),
            "steps": steps,
        }
    return summary


def _read_any(file: Path) -> dict[str, Any] | None:
    try:
        if not file.is_file() or file.stat().st_size > _MAX_RECORD_BYTES:
            return None
        record = json.loads(file.read_text())
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) and "status" in record else None
