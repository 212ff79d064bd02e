"""Measure a run: peak memory and throughput records, perplexity, passkey, lm-eval tasks,
the SVD summary, per-layer statistics the variant reports, and subspace similarities (to the
same seed's LoRA row, and across seeds).
"""

from __future__ import annotations

import itertools
import math
import os
import resource
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..analysis import analyze, random_subspace_similarity, subspace_similarity
from ..config import ExperimentConfig
from ..evaluate import passkey_accuracy, perplexity_at_lengths
from ..inject import adapter_names, iter_adapters
from ..io import read_factors
from .env import Environment
from .plan import REFERENCE_VARIANT, eval_lengths, plan_runs, run_folder, run_key


def _rss_bytes() -> int:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError):  # not Linux: fall back to the lifetime peak
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class PeakMemory:
    """Peak memory of a block: the CUDA allocator's peak on GPU, else sampled RSS (CPU).

    RSS is sampled every 20 ms by a thread (the kernel's lifetime peak cannot be reset between
    runs in one process). ``peak_mib`` is the absolute peak during the block; ``delta_mib``
    the rise above the level at entry.
    """

    def __init__(self, device: torch.device | str | None = None, interval: float = 0.02) -> None:
        self.cuda = torch.device(device or "cpu").type == "cuda"
        self.interval = interval
        self.peak_mib = self.delta_mib = 0.0

    def __enter__(self) -> PeakMemory:
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self._start = torch.cuda.memory_allocated()
            return self
        self._start = self._peak = _rss_bytes()
        self._stop = threading.Event()

        def sample() -> None:
            while not self._stop.wait(self.interval):
                self._peak = max(self._peak, _rss_bytes())

        self._thread = threading.Thread(target=sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        if self.cuda:
            torch.cuda.synchronize()
            peak = torch.cuda.max_memory_allocated()
        else:
            self._stop.set()
            self._thread.join()
            peak = max(self._peak, _rss_bytes())
        self.peak_mib = peak / 2**20
        self.delta_mib = (peak - self._start) / 2**20


def evaluate_run(
    model: nn.Module,
    config: ExperimentConfig,
    env: Environment,
    seed: int,
    native: int,
    name: str | None,
    progress: bool,
) -> dict[str, Any]:
    """Perplexity per length, passkey, and (adapter ``name``) the SVD summary.

    Each metric is computed on its own: one that fails (say, on a device the analysis did not
    expect) is recorded under ``metric_errors`` and the run, with its training and its other
    metrics, is kept.
    """
    model.to(env.device).eval()
    record: dict[str, Any] = {}
    errors: dict[str, str] = {}

    def metric(key: str, compute: Callable[[], Any]) -> None:
        try:
            value = compute()
        except Exception as e:  # keep the run; report the metric as failed
            errors[key] = f"{type(e).__name__}: {e}"
            return
        if value is not None:
            record[key] = value

    metric(
        "ppl",
        lambda: {
            str(k): v
            for k, v in perplexity_at_lengths(
                model,
                env.val_tokens,
                eval_lengths(config, native),
                stride_ratio=config.eval.stride_ratio,
                max_tokens=config.eval.max_tokens,
                progress=progress,
            ).items()
        },
    )
    if config.eval.passkey_lengths:
        metric(
            "passkey",
            lambda: {
                str(k): r.accuracy
                for k, r in passkey_accuracy(
                    model,
                    env.tokenizer,
                    config.eval.passkey_lengths,
                    config.eval.passkey_trials,
                    seed,
                ).items()
            },
        )
    if config.eval.lm_eval:  # downstream tasks (lm-eval): {task: main metric}, then all
        tasks: dict[str, Any] = {}
        metric("lm_eval", lambda: _lm_eval(model, config, env, tasks))
        if tasks:
            record["lm_eval_metrics"] = tasks
    if name is not None:
        metric("svd", lambda: _svd_summary(model, env, seed, name))
        try:
            stats = _layer_stats(model, name)
        except Exception as e:  # keep the run; report the statistics as failed
            stats, errors["layer_stats"] = {}, f"{type(e).__name__}: {e}"
        for key, by_layer in stats.items():  # MixLoRA: router_tokens_per_expert
            metric(key, lambda by_layer=by_layer: by_layer)
    if errors:
        record["metric_errors"] = errors
    return record


def _lm_eval(
    model: nn.Module, config: ExperimentConfig, env: Environment, metrics: dict[str, Any]
) -> dict[str, float]:
    """``{task: main metric}`` of ``eval.lm_eval``; every metric goes into ``metrics``."""
    from ..integrations.lm_eval import evaluate_tasks

    e = config.eval
    headline, found = evaluate_tasks(
        model, env.tokenizer, e.lm_eval, e.lm_eval_include, e.lm_eval_limit, e.lm_eval_batch_size
    )
    metrics.update(found)
    return headline


def _layer_stats(model: nn.Module, name: str | None = None) -> dict[str, dict[str, Any]]:
    """``{statistic: {module: value}}`` from every layer's ``report_stats()`` (the last
    training step's)."""
    out: dict[str, dict[str, Any]] = {}
    for path, _, layer in iter_adapters(model, name):
        for key, value in layer.report_stats().items():
            out.setdefault(key, {})[path] = value
    return out


def _svd_summary(model: nn.Module, env: Environment, seed: int, name: str) -> dict[str, Any]:
    """Effective rank, energy in the top 4 directions, and similarity to LoRA's subspaces.

    ``similarity_to_lora`` compares the *left* (column, output-space) subspace of each layer's
    dW with the same seed's first LoRA row: B starts at zero, so that side is set by training.
    The right (row) subspace is ``similarity_to_lora_right``; rows that share a seed share A's
    random initialisation, so it mostly measures that shared init, not learning.
    ``similarity_random`` is the mean random-subspace baseline ``k / out`` of the same layers.
    """
    rows = analyze(model).rows()
    if len(adapter_names(model)) > 1:  # the report names adapters only when there are several
        rows = [r for r in rows if r.get("adapter") == name]
    summary: dict[str, Any] = {
        "effective_rank": finite_mean([r["effective_rank"] for r in rows]),
        "energy_top4": finite_mean([r.get("energy_top4", float("nan")) for r in rows]),
        "effective_rank_by_layer": {r["module"]: r["effective_rank"] for r in rows},
    }
    reference = env.lora_reference.get(seed)
    if reference:
        summary.update(_similarity_to(model, reference, name))
    return summary


def _similarity_to(model: nn.Module, reference_dir: Path, name: str) -> dict[str, float]:
    ours = {
        path: layer.factors() for path, _, layer in iter_adapters(model, name) if layer.mergeable
    }
    # loaded on the CPU; subspace_similarity computes on our factors' device (the model's)
    return similarity_fields(ours, read_factors(reference_dir))


def similarity_fields(
    ours: dict[str, tuple[torch.Tensor, torch.Tensor]],
    reference: dict[str, tuple[torch.Tensor, torch.Tensor]],
) -> dict[str, float]:
    """The record's ``svd`` fields of a run against its seed's LoRA run (``{module: (B, A)}``
    each): left and right similarity, and the left side's random baseline."""
    left, random_left = factor_similarity(ours, reference, "left")
    right, _ = factor_similarity(ours, reference, "right")
    return {
        "similarity_to_lora": left,
        "similarity_to_lora_right": right,
        "similarity_random": random_left,
    }


def factor_similarity(
    a: dict[str, tuple[torch.Tensor, torch.Tensor]],
    b: dict[str, tuple[torch.Tensor, torch.Tensor]],
    side: str = "left",
) -> tuple[float, float]:
    """Mean subspace similarity ``phi`` over the modules two adapters both adapt.

    Per module, ``k = min(rank_a, rank_b)`` and ``phi(a, b, k, k)`` on ``side`` (``"left"``:
    output space, dim ``out``; ``"right"``: input space, dim ``in``); MixLoRA expert entries
    (``...experts.<e>``) are left out, since experts have no fixed order to pair them by.

    Args:
        a, b: ``{module name: (B, A)}`` with ``B: (out, k)``, ``A: (k, in)``.
        side: ``"left"`` or ``"right"``.

    Returns:
        ``(mean phi, mean random baseline max(k, k) / dim)``; ``(nan, nan)`` with no module in
        common.
    """
    values, baselines = [], []
    for path in sorted(set(a) & set(b)):
        if ".experts." in path:
            continue
        (Ba, Aa), (Bb, Ab) = a[path], b[path]
        k = min(Aa.shape[0], Ab.shape[0])
        dim = Ba.shape[0] if side == "left" else Aa.shape[1]
        values.append(subspace_similarity((Ba, Aa), (Bb, Ab), k, k, side=side))
        baselines.append(random_subspace_similarity(dim, k, k))
    return finite_mean(values), finite_mean(baselines)


def seed_to_seed_similarity(
    out: Path, config: ExperimentConfig, results: dict[str, dict[str, Any]]
) -> dict[str, dict[str, list[float]]]:
    """Similarities across seeds: the baseline a same-seed cross-method value must beat.

    Rows run with the same seed share A's random initialisation *and* the order of the
    training batches, and both shape the update (B's gradient is ``g (A x)^T``: its columns
    span the output gradients of the shared batches). Pairs from different seeds share
    neither. From the saved adapters ``runs/<row>/seed<s>``:

    - ``"left"``/``"right"``: the row against itself, every seed pair ``s < t``;
    - ``"vs_lora_left"``/``"vs_lora_right"``: the row at seed ``s`` against the first LoRA
      row at every other seed ``t != s`` (for the LoRA row this equals its own seed-to-seed
      value), the like-for-like comparison with LoRA's seed-to-seed baseline.

    Returns:
        ``{row: {key: [phi per pair]}}``; a key is present only when it has a pair.
    """

    def saved(name: str) -> dict[int, Path]:
        dirs = {
            int(r["seed"]): run_folder(out, name, r["seed"]) / "adapter"
            for r in results.values()
            if r["row"] == name and r.get("status") == "ok" and r.get("adapter_params")
        }
        return {s: d for s, d in sorted(dirs.items()) if d.is_dir()}

    cache: dict[Path, Any] = {}

    def factors(d: Path):
        if d not in cache:
            cache[d] = read_factors(d)
        return cache[d]

    lora_rows = [
        r.name
        for r in config.runs
        if any(
            x["row"] == r.name and x.get("variant") == REFERENCE_VARIANT and x.get("status") == "ok"
            for x in results.values()
        )
    ]
    lora = saved(lora_rows[0]) if lora_rows else {}
    found: dict[str, dict[str, list[float]]] = {}
    for spec in config.runs:
        own = saved(spec.name)
        entry: dict[str, list[float]] = {}
        pairs = list(itertools.combinations(own.values(), 2))
        cross = [(own[s], lora[t]) for s in own for t in lora if s != t]
        for side in ("left", "right"):
            if pairs:
                entry[side] = [factor_similarity(factors(a), factors(b), side)[0] for a, b in pairs]
            if cross:
                entry[f"vs_lora_{side}"] = [
                    factor_similarity(factors(a), factors(b), side)[0] for a, b in cross
                ]
        if entry:
            found[spec.name] = entry
    return found


def finite_mean(values) -> float:
    values = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    return sum(values) / len(values) if values else float("nan")


def training_record(result, mem: PeakMemory) -> dict[str, Any]:
    return dict(
        final_loss=result.final_loss,
        loss_curve=result.losses,
        tokens=result.tokens,
        tokens_per_s=result.tokens_per_second,
        wall_s=result.wall_time,
        peak_mem_mib=mem.peak_mib,
        peak_mem_delta_mib=mem.delta_mib,
    )


def fill_lora_similarity(out: Path, config: Any, results: dict[str, dict[str, Any]]) -> None:
    """Add ``svd.similarity_to_lora*`` to the records that lack it because their reference
    LoRA run ran in another process.

    The rule is the one-process loop's: a trained run's reference is the first finished LoRA
    run of its seed *earlier in the plan*; runs without one (the first LoRA row itself, rows
    before it) get none. Read from the saved adapters; a reference that cannot be read leaves
    the record as it is.
    """
    reference: dict[int, Path] = {}
    for row, seed in plan_runs(config):
        key = run_key(row, seed)
        record = results.get(key)
        run_dir = run_folder(out, row.name, seed)
        svd = (record or {}).get("svd")
        if (
            seed in reference
            and record is not None
            and record.get("status") == "ok"
            and row.trains
            and isinstance(svd, dict)
            and "similarity_to_lora" not in svd
        ):
            try:  # factor_similarity leaves MixLoRA's experts out
                ours = read_factors(run_dir / "adapter")
                theirs = read_factors(reference[seed])
            except (OSError, ValueError):
                ours = None
            if ours is not None:
                svd.update(similarity_fields(ours, theirs))
        if (
            record is not None
            and record.get("variant") == REFERENCE_VARIANT
            and record.get("status") == "ok"
        ):
            reference.setdefault(seed, run_dir / "adapter")
