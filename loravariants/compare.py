"""The comparison: every row x seed through the one loop, on one base, data and budget.

    for each (row, seed):            (rows = adapter specs, plus evaluation-only baselines)
        fresh base -> extend context -> attach adapter -> train -> evaluate -> analyse
        -> record -> rewrite results.json / results.csv / report.md / plots

Fairness by construction: every row sees the same base checkpoint, the same packed training
blocks in the same order (the seed fixes it), the same token budget and the same evaluation
tokens; throughput and peak memory are measured the same way for all rows
(:class:`PeakMemory`). A run that fails is recorded with its reason and the others go on;
finished runs are never redone: a rerun of the same command resumes the missing ones.
"""

from __future__ import annotations

import contextlib
import csv
import json
import math
import os
import platform
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import __version__
from .config import ExperimentConfig, RunSpec, load_adapter_spec
from .inject import (
    adapter_names,
    attach,
    iter_adapters,
    mark_trainable,
    trainable_parameters,
)
from .stats import mean_ci, min_max, paired_difference
from .train import TrainConfig, seed_everything, train
from .utils import output_lock

__all__ = [
    "compare",
    "PeakMemory",
    "factor_similarity",
    "match_rank",
    "mean_ci",
    "paired_differences",
    "per_seed",
    "RESULTS_SCHEMA_VERSION",
    "seed_to_seed_similarity",
    "summarize",
]

RESULTS_SCHEMA_VERSION = 1


# ---------------------------------------------------------------------------------------------
# measurement
# ---------------------------------------------------------------------------------------------


def _rss_bytes() -> int:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError):  # not Linux: fall back to the lifetime peak
        import resource

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


# ---------------------------------------------------------------------------------------------
# parameter matching
# ---------------------------------------------------------------------------------------------

RANK_FIELDS = {
    "lora": ("r",),
    "cola": ("r",),
    "multilora": ("r",),
    "mixlora": ("r", "expert_r"),
}
MATCH_TOLERANCE = 0.10


def count_adapter_params(model_factory: Callable[[], nn.Module], adapter_config) -> int:
    """Trainable adapter parameters ``adapter_config`` adds to a fresh model."""
    model = attach(model_factory(), adapter_config)
    return sum(
        p.numel() for n, p in model.named_parameters() if p.requires_grad and ".adapters." in n
    )


def _with_rank(adapter_config, r: int) -> dict[str, Any]:
    """Overrides that set every rank field of the variant (and any per-module ranks) to ``r``."""
    fields = {f: r for f in RANK_FIELDS[adapter_config.variant]}
    if getattr(adapter_config, "link_ranks", None):
        fields["link_ranks"] = [r] * len(adapter_config.link_ranks)
    if getattr(adapter_config, "rank_pattern", None):
        fields["rank_pattern"] = {k: r for k in adapter_config.rank_pattern}
    return fields


def match_rank(
    model_factory: Callable[[], nn.Module],
    spec: str,
    overrides: dict[str, Any],
    target: int,
    spec_dir: str | None,
    max_rank: int = 512,
    tolerance: float | None = MATCH_TOLERANCE,
) -> tuple[dict[str, Any], int]:
    """The rank whose adapter's parameter count is closest to ``target``.

    One value ``r`` is set on every rank field of the variant (MixLoRA: the attention LoRA's
    ``r`` and the experts' ``expert_r``; COLA's ``link_ranks`` and any ``rank_pattern`` entries
    too), so parameters that do not depend on a rank (MixLoRA's router) are the only fixed
    cost. Counts grow monotonically with ``r``, so a bisection finds the crossing; the nearer
    of its two neighbours wins.

    Args:
        model_factory: builds a fresh base model.
        spec, overrides, spec_dir: the row's adapter spec and its overrides.
        target: wanted adapter parameter count.
        max_rank: largest rank tried.
        tolerance: largest accepted relative miss ``|achieved - target| / target``; ``None``
            accepts any miss.

    Returns:
        ``(overrides with the rank fields set, achieved parameter count)``.

    Raises:
        ValueError: the variant has no rank field, or the best rank misses ``target`` by more
            than ``tolerance`` (e.g. a target below the rank-1 adapter's size).
    """
    config = load_adapter_spec(spec, overrides, spec_dir)
    if config.variant not in RANK_FIELDS:
        raise ValueError(f"match_params: no rank field known for variant {config.variant!r}")

    counts: dict[int, int] = {}

    def count(r: int) -> int:
        if r not in counts:
            adapter = load_adapter_spec(spec, {**overrides, **_with_rank(config, r)}, spec_dir)
            counts[r] = count_adapter_params(model_factory, adapter)
        return counts[r]

    lo, hi = 1, max_rank
    if count(hi) < target:
        best = hi
    elif count(lo) >= target:
        best = lo
    else:
        while hi - lo > 1:
            mid = (lo + hi) // 2
            if count(mid) < target:
                lo = mid
            else:
                hi = mid
        best = min((lo, hi), key=lambda r: abs(count(r) - target))
    achieved = count(best)
    miss = abs(achieved - target) / target
    if tolerance is not None and miss > tolerance:
        fields = "/".join(RANK_FIELDS[config.variant])
        reach = (
            f"rank 1 already has {count(1):,}"
            if best == 1
            else f"rank {max_rank} has only {count(max_rank):,}"
            if best == max_rank
            else f"the nearest, {fields}={best}, has {achieved:,}"
        )
        raise ValueError(
            f"match_params: {target:,} adapter parameters is out of reach for {spec!r} "
            f"({reach}: {achieved / target - 1:+.0%}); set match_params to a reachable count "
            f"or match_params_tolerance: {math.ceil(miss * 100) / 100:g} to accept the miss"
        )
    return {**overrides, **_with_rank(config, best)}, achieved


# ---------------------------------------------------------------------------------------------
# one run
# ---------------------------------------------------------------------------------------------


def _eval_lengths(config: ExperimentConfig, native: int) -> list[int]:
    if config.eval.lengths:
        return list(config.eval.lengths)
    target = config.context.target_length or native
    if target < native:  # a long-context base trained on shorter blocks: score at that length
        return [target]
    lengths, n = [], native
    while n <= target:
        lengths.append(n)
        n *= 2
    return lengths


def _prepare_model(config: ExperimentConfig, row: RunSpec, seed: int, env: dict[str, Any]):
    """Fresh base -> context extension (+ trainable embed/norm) -> training attention."""
    from .longlora.context import extend_context, trainable_module_names

    seed_everything(seed)
    model = env["load_model"]()
    native = int(model.config.max_position_embeddings)
    target = config.context.target_length
    record: dict[str, Any] = {"native_context": native}
    if row.extend_context and target and target > native:
        extend_context(
            model,
            target,
            method=config.context.method,
            trainable=tuple(row.trainable),
            factor_rounding=config.context.factor_rounding,
        )
        record["context"] = target
    else:
        if row.trainable:
            mark_trainable(model, trainable_module_names(model, row.trainable))
        # a target below the native context (a real base with 8k positions on a CPU budget)
        # is the training length, with positions left as they are
        record["context"] = min(target or native, native)
    attention = row.attention or config.context.attention
    model.config.s2_group_size_ratio = config.context.group_size_ratio
    model.set_attn_implementation(attention)
    record["attention"] = attention if row.trains else "sdpa (eval)"
    return model, record


def _attach_row(
    model: nn.Module, config: ExperimentConfig, row: RunSpec, overrides: dict[str, Any], name: str
) -> dict[str, Any]:
    """Attach the row's adapter under ``name``; its parameter counts for the record."""
    adapter = load_adapter_spec(row.adapter, overrides, config.spec_dir)
    attach(model, adapter, name=name)
    adapter_params = sum(
        p.numel() for _, _, layer in iter_adapters(model, name) for p in layer.parameters()
    )
    extra = trainable_parameters(model).trainable - sum(
        p.numel() for _, _, layer in iter_adapters(model) for p in layer.parameters()
    )
    return dict(
        variant=adapter.variant,
        adapter_config=adapter.to_dict(),
        adapter_params=adapter_params,
        trainable_params=adapter_params + extra,
        total_params=trainable_parameters(model).total,
    )


def _training_record(result, mem: PeakMemory) -> dict[str, Any]:
    return dict(
        final_loss=result.final_loss,
        loss_curve=result.losses,
        tokens=result.tokens,
        tokens_per_s=result.tokens_per_second,
        wall_s=result.wall_time,
        peak_mem_mib=mem.peak_mib,
        peak_mem_delta_mib=mem.delta_mib,
    )


def _evaluate(
    model: nn.Module,
    config: ExperimentConfig,
    env: dict[str, Any],
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
    from .evaluate import passkey_accuracy, perplexity_at_lengths

    model.to(env["device"]).eval()
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
                env["val_tokens"],
                _eval_lengths(config, native),
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
                    env["tokenizer"],
                    config.eval.passkey_lengths,
                    config.eval.passkey_trials,
                    seed,
                ).items()
            },
        )
    if name is not None:
        metric("svd", lambda: _svd_summary(model, env, seed, name))
        metric("router_tokens_per_expert", lambda: _router_stats(model, name) or None)
    if errors:
        record["metric_errors"] = errors
    return record


def _run_one(
    config: ExperimentConfig,
    row: RunSpec,
    seed: int,
    env: dict[str, Any],
    run_dir: Path,
    overrides: dict[str, Any],
    progress: bool,
) -> dict[str, Any]:
    from .io import save_adapter

    model, record = _prepare_model(config, row, seed, env)
    name = None
    if row.trains:
        name = "default"
        record.update(_attach_row(model, config, row, overrides, name))
        train_cfg = TrainConfig(**{**asdict(config.train), "seed": seed})
        with PeakMemory(env["device"]) as mem:
            result = train(
                model.to(env["device"]),
                env["train_blocks"](record["context"]),
                train_cfg,
                output_dir=run_dir / "train",
                progress=progress,
            )
        record.update(_training_record(result, mem))
        save_adapter(model, run_dir / "adapter", format="native")
    else:
        record.update(variant="none", trainable_params=0, adapter_params=0)
    record.update(_evaluate(model, config, env, seed, record["native_context"], name, progress))
    return record


def _run_concurrent(
    config: ExperimentConfig,
    rows: list[RunSpec],
    seed: int,
    env: dict[str, Any],
    out: Path,
    overrides: dict[str, dict[str, Any]],
    progress: bool,
) -> dict[str, dict[str, Any]]:
    """All trained rows of one seed on one frozen base, trained together (ASPEN / m-LoRA).

    Each row keeps its own data order, optimizer, schedule and hooks; each is evaluated with
    only its adapter active. Rows must agree on context extension and attention and may not
    train whole base modules (embeddings/norms would be shared).
    """
    from .inject import set_active_adapters
    from .io import save_adapter
    from .multi import Job, train_concurrent

    # (rows that cannot share one base are refused when the config is built)
    model, common = _prepare_model(config, rows[0], seed, env)
    names = {row.name: f"row{i}" for i, row in enumerate(rows)}
    records = {
        row.name: {
            **common,
            **_attach_row(model, config, row, overrides[row.name], names[row.name]),
        }
        for row in rows
    }
    blocks = env["train_blocks"](common["context"])
    jobs = [
        Job(names[row.name], blocks, TrainConfig(**{**asdict(config.train), "seed": seed}))
        for row in rows
    ]
    with PeakMemory(env["device"]) as mem:
        results = train_concurrent(model.to(env["device"]), jobs, progress=progress)
    # the first LoRA row goes first: as in sequential runs, it is the reference subspace for
    # the rows evaluated after it
    lora_rows = [r for r in rows if records[r.name].get("variant") == "lora"]
    for row in lora_rows[:1] + [r for r in rows if r not in lora_rows[:1]]:
        name = names[row.name]
        run_dir = out / "runs" / row.name / f"seed{seed}"
        save_adapter(model, run_dir / "adapter", format="native", name=name)
        records[row.name].update(_training_record(results[name], mem), concurrent=True)
        set_active_adapters(model, [name])
        records[row.name].update(
            _evaluate(model, config, env, seed, common["native_context"], name, progress)
        )
        if records[row.name].get("variant") == "lora":
            env["lora_reference"].setdefault(seed, run_dir / "adapter")
    set_active_adapters(model, None)
    return records


def _router_stats(model: nn.Module, name: str | None = None) -> dict[str, list[int]]:
    out = {}
    for path, _, layer in iter_adapters(model, name):
        if hasattr(layer, "router_stats"):
            stats = layer.router_stats()  # routing of the last training step
            if stats is not None:
                out[path] = [int(x) for x in stats["tokens_per_expert"].flatten().tolist()]
    return out


def _svd_summary(model: nn.Module, env: dict[str, Any], seed: int, name: str) -> dict[str, Any]:
    """Effective rank, energy in the top 4 directions, and similarity to LoRA's subspaces.

    ``similarity_to_lora`` compares the *left* (column, output-space) subspace of each layer's
    dW with the same seed's first LoRA row: B starts at zero, so that side is set by training.
    The right (row) subspace is ``similarity_to_lora_right``; rows that share a seed share A's
    random initialisation, so it mostly measures that shared init, not learning.
    ``similarity_random`` is the mean random-subspace baseline ``k / out`` of the same layers.
    """
    from .analysis import analyze

    rows = analyze(model).rows()
    if len(adapter_names(model)) > 1:  # the report names adapters only when there are several
        rows = [r for r in rows if r.get("adapter") == name]
    summary: dict[str, Any] = {
        "effective_rank": _mean([r["effective_rank"] for r in rows]),
        "energy_top4": _mean([r.get("energy_top4", float("nan")) for r in rows]),
        "effective_rank_by_layer": {r["module"]: r["effective_rank"] for r in rows},
    }
    reference = env.get("lora_reference", {}).get(seed)
    if reference:
        summary.update(_similarity_to(model, reference, name))
    return summary


def _similarity_to(model: nn.Module, reference_dir: Path, name: str) -> dict[str, float]:
    from .io import read_factors

    ours = {
        path: layer.factors() for path, _, layer in iter_adapters(model, name) if layer.mergeable
    }
    # loaded on the CPU; subspace_similarity computes on our factors' device (the model's)
    reference = read_factors(reference_dir)
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
    from .analysis import random_subspace_similarity, subspace_similarity

    values, baselines = [], []
    for path in sorted(set(a) & set(b)):
        if ".experts." in path:
            continue
        (Ba, Aa), (Bb, Ab) = a[path], b[path]
        k = min(Aa.shape[0], Ab.shape[0])
        dim = Ba.shape[0] if side == "left" else Aa.shape[1]
        values.append(subspace_similarity((Ba, Aa), (Bb, Ab), k, k, side=side))
        baselines.append(random_subspace_similarity(dim, k, k))
    return _mean(values), _mean(baselines)


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
    import itertools

    from .io import read_factors

    def saved(name: str) -> dict[int, Path]:
        dirs = {
            int(r["seed"]): out / "runs" / name / f"seed{r['seed']}" / "adapter"
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
            x["row"] == r.name and x.get("variant") == "lora" and x.get("status") == "ok"
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


def _mean(values) -> float:
    values = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    return sum(values) / len(values) if values else float("nan")


# ---------------------------------------------------------------------------------------------
# the whole comparison
# ---------------------------------------------------------------------------------------------


def _plan(config: ExperimentConfig) -> list[tuple[RunSpec, int]]:
    plan = []
    for row in config.runs:
        # untrained rows too: each seed draws its own passkey prompts, and the Findings pair
        # every row's seed s with the same prompts (analysis/findings.py)
        for seed in config.seeds:
            plan.append((row, seed))
    return plan


def run_key(row: RunSpec, seed: int) -> str:
    return f"{row.name}/seed{seed}"


# may differ between a comparison and its resumption: more seeds or rows, another folder
_RESUMABLE_KEYS = {"seeds", "runs", "output_dir", "spec_dir"}


def _check_same_experiment(out: Path, saved: dict[str, Any], config: ExperimentConfig) -> None:
    """Finished runs are reused only by the experiment that made them.

    A rerun may add seeds or rows; any other change (budget, data, base model, a row's
    adapter or overrides) would silently mix runs of two experiments in one table.

    Raises:
        ValueError: naming the first differences.
    """
    now = _config_dict(config)
    differ = [
        f"{k}: {json.dumps(saved.get(k))} -> {json.dumps(v)}"
        for k, v in now.items()
        if k not in _RESUMABLE_KEYS and saved.get(k) != v
    ]
    saved_rows = {r.get("name"): r for r in saved.get("runs") or []}
    differ += [
        f"runs[{r['name']}] changed"
        for r in now["runs"]
        if r["name"] in saved_rows and saved_rows[r["name"]] != r
    ]
    if differ:
        raise ValueError(
            f"{out} holds results of a different experiment ({'; '.join(differ[:3])}); "
            "choose another output_dir, or move that folder away to start over"
        )


def _load_results(out: Path, config: ExperimentConfig) -> dict[str, dict[str, Any]]:
    """The finished runs in ``out``, checked to come from this experiment."""
    file = out / "results.json"
    if not file.is_file():
        return {}
    try:
        data = json.loads(file.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{file}: corrupt results file ({e}); move it away to start over") from e
    results = {r["key"]: r for r in data.get("runs", [])}
    if results:
        _check_same_experiment(out, data.get("config") or {}, config)
    return results


def _environment(config: ExperimentConfig, progress: bool) -> dict[str, Any]:
    """Load the base model once (path + tokenizer) and the data once, for every run."""
    from transformers import AutoModelForCausalLM

    from .base_model import resolve_base_model
    from .data import load_validation_tokens, make_train_blocks

    base_path, tokenizer = resolve_base_model(
        config.base_model, progress=progress, config=config.builtin_base()
    )
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    blocks_cache: dict[int, Any] = {}

    def load_model() -> nn.Module:
        return AutoModelForCausalLM.from_pretrained(base_path, dtype=torch.float32)

    def train_blocks(seq_len: int):
        if seq_len not in blocks_cache:
            blocks_cache[seq_len] = make_train_blocks(config.data, tokenizer, seq_len)
        return blocks_cache[seq_len]

    return {
        "base_path": str(base_path),
        "tokenizer": tokenizer,
        "device": device,
        "load_model": load_model,
        "train_blocks": train_blocks,
        "val_tokens": load_validation_tokens(config.data, tokenizer, config.eval.max_tokens),
        "lora_reference": {},
    }


def compare(
    config: ExperimentConfig,
    progress: bool = True,
    log: Callable[[str], None] = print,
    env: dict[str, Any] | None = None,
    only: list[tuple[str, int]] | None = None,
) -> Path:
    """Run (or resume) the comparison; write results and the report after every run.

    Args:
        config: the experiment.
        progress: tqdm bars (also transformers' own).
        log: where one-line progress messages go.
        env: a prepared environment (tests); default: load the base model and data.
        only: run just these ``(row name, seed)`` pairs (``loravariants train``); the report
            still covers the whole experiment.

    Raises:
        ValueError: ``output_dir`` holds results of a different experiment, or is a file, or
            another process is writing to it (one writer per folder).

    Returns:
        The output directory.
    """
    with _transformers_progress_bars(progress), contextlib.ExitStack() as locks:
        return _compare(config, progress, log, env, only, locks)


def _lock(out: Path, locks: contextlib.ExitStack) -> None:
    """Hold ``out`` for this process (once): a second compare or train there stops at once
    with a clear message instead of redoing the runs and losing records."""
    if not getattr(locks, "held", False):
        locks.enter_context(output_lock(out))
        locks.held = True


@contextlib.contextmanager
def _transformers_progress_bars(enabled: bool):
    """``progress=False`` also silences transformers' own bars (weight loading), then restores."""
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    if not enabled:
        hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled and not enabled:
            hf_logging.enable_progress_bar()


def _compare(
    config: ExperimentConfig,
    progress: bool,
    log: Callable[[str], None],
    env: dict[str, Any] | None,
    only: list[tuple[str, int]] | None,
    locks: contextlib.ExitStack,
) -> Path:
    out = Path(config.output_dir)
    if out.exists() and not out.is_dir():
        raise ValueError(f"output_dir {out} is a file, not a folder")
    if any(p.exists() and not p.is_dir() for p in out.parents):
        raise ValueError(f"output_dir {out}: a parent of it is a file")
    if out.is_dir():
        _lock(out, locks)
    results = _load_results(out, config)
    env = env or _environment(config, progress)
    out.mkdir(parents=True, exist_ok=True)  # after the base model and data loaded fine
    _lock(out, locks)
    # merge: what another process finished here before we held the folder is kept
    results = {**_load_results(out, config), **results}
    overrides = {row.name: config.adapter_overrides(row) for row in config.runs if row.trains}
    matched: dict[str, dict[str, Any]] = {}
    if config.match_params:
        tolerance = config.match_params_tolerance
        for row in config.runs:
            if row.trains:
                overrides[row.name], achieved = match_rank(
                    env["load_model"],
                    row.adapter,
                    overrides[row.name],
                    config.match_params,
                    config.spec_dir,
                    tolerance=MATCH_TOLERANCE if tolerance is None else tolerance,
                )
                matched[row.name] = {
                    "target": config.match_params,
                    "achieved": achieved,
                    "deviation": achieved / config.match_params - 1,
                }
                log(
                    f"match_params: {row.name} -> {overrides[row.name]} ({achieved:,} adapter "
                    f"parameters, {matched[row.name]['deviation']:+.1%} from "
                    f"{config.match_params:,})"
                )
    plan = _plan(config)
    if only is not None:
        plan = [(row, seed) for row, seed in plan if (row.name, seed) in set(only)]
    if config.concurrent:
        _concurrent_groups(config, plan, results, env, out, overrides, matched, progress, log)
    for i, (row, seed) in enumerate(plan, 1):
        key = run_key(row, seed)
        run_dir = out / "runs" / row.name / f"seed{seed}"
        if results.get(key, {}).get("status") == "ok" and results[key].get("metric_errors"):
            log(f"[{i}/{len(plan)}] {key}: trained earlier; computing its failed metrics again")
            _retry_metrics(config, row, seed, env, run_dir, results[key], progress)
            _log_metric_errors(results[key], log)
            write_outputs(out, config, results, env)
        elif config.concurrent and row.trains:
            pass  # trained (or failed) with its seed's concurrent group above
        elif results.get(key, {}).get("status") == "ok":
            log(f"[{i}/{len(plan)}] {key}: done earlier, kept")
        else:
            log(f"[{i}/{len(plan)}] {key}: running")
            start = time.perf_counter()
            record: dict[str, Any] = {
                "key": key,
                "row": row.name,
                "seed": seed,
                "adapter": row.adapter,
                "trainable": row.trainable,
            }
            try:
                record.update(
                    _run_one(config, row, seed, env, run_dir, overrides.get(row.name, {}), progress)
                )
                record["status"] = "ok"
            except Exception as e:  # one failed run must not stop the others
                record.update(status="failed", reason=f"{type(e).__name__}: {e}")
                (run_dir).mkdir(parents=True, exist_ok=True)
                (run_dir / "error.txt").write_text(traceback.format_exc())
                log(f"    failed: {record['reason']}")
            record["elapsed_s"] = time.perf_counter() - start
            if row.name in matched:
                record.update(
                    matched_params=matched[row.name]["achieved"], match_params=matched[row.name]
                )
            results[key] = record
            _log_metric_errors(record, log)
            write_outputs(out, config, results, env)
        if results[key].get("variant") == "lora" and results[key].get("status") == "ok":
            env["lora_reference"].setdefault(seed, run_dir / "adapter")
    return out


def _concurrent_groups(config, plan, results, env, out, overrides, matched, progress, log) -> None:
    """``concurrent: true``: per seed, the trained rows not yet done run together."""
    for seed in config.seeds:
        rows = [
            row
            for row, s in plan
            if s == seed
            and row.trains
            and results.get(run_key(row, seed), {}).get("status") != "ok"
        ]
        if not rows:
            continue
        log(f"seed {seed}: training {[r.name for r in rows]} concurrently on one base")
        start = time.perf_counter()
        try:
            records = _run_concurrent(config, rows, seed, env, out, overrides, progress)
            failure = None
        except Exception as e:  # the group failed: record it for each of its rows
            records, failure = {}, f"{type(e).__name__}: {e}"
            log(f"    failed: {failure}")
        for row in rows:
            key = run_key(row, seed)
            record = {
                "key": key,
                "row": row.name,
                "seed": seed,
                "adapter": row.adapter,
                "trainable": row.trainable,
                "elapsed_s": time.perf_counter() - start,
            }
            if failure is None:
                record.update(records[row.name], status="ok")
            else:
                record.update(status="failed", reason=failure)
            if row.name in matched:
                record.update(
                    matched_params=matched[row.name]["achieved"], match_params=matched[row.name]
                )
            results[key] = record
            _log_metric_errors(record, log)
        write_outputs(out, config, results, env)


def _log_metric_errors(record: dict[str, Any], log: Callable[[str], None]) -> None:
    for metric, error in record.get("metric_errors", {}).items():
        log(f"    {record['key']}: metric {metric} failed (run kept): {error}")


def _retry_metrics(
    config: ExperimentConfig,
    row: RunSpec,
    seed: int,
    env: dict[str, Any],
    run_dir: Path,
    record: dict[str, Any],
    progress: bool,
) -> None:
    """Compute again the metrics a finished run failed; its training is kept as it is.

    The model is rebuilt as the run built it and its saved adapter loaded. Metrics that
    succeed replace their error; the others keep theirs.
    """
    from .io import load_adapter

    failed = record["metric_errors"]
    try:
        model, _ = _prepare_model(config, row, seed, env)
        name = None
        if row.trains:  # the saved adapter carries its exact config (COLA: its whole chain)
            name = "default"
            load_adapter(model, run_dir / "adapter", name=name)
        fresh = _evaluate(model, config, env, seed, record["native_context"], name, progress)
    except Exception as e:  # the run stays kept; the old errors stay
        failed.update({m: f"{type(e).__name__}: {e} (retry)" for m in failed})
        return
    new_errors = fresh.pop("metric_errors", {})
    for metric in list(failed):
        if metric in fresh:
            record[metric] = fresh[metric]
            del failed[metric]
        elif metric in new_errors:
            failed[metric] = new_errors[metric]
    if not failed:
        del record["metric_errors"]


# ---------------------------------------------------------------------------------------------
# outputs: results.json, results.csv, report.md, plots
# ---------------------------------------------------------------------------------------------

SUMMARY_METRICS = [
    ("trainable_params", "trainable params", "{:,.0f}"),
    ("final_loss", "final train loss", "{:.3f}"),
    ("tokens_per_s", "train tokens/s", "{:,.0f}"),
    ("peak_mem_mib", "peak mem (MiB)", "{:,.0f}"),
    ("wall_s", "train time (s)", "{:.1f}"),
]
# timings: with fewer than 3 seeds a Student-t interval is meaningless (t_{0.975,1} = 12.7),
# so the table shows min-max instead
TIMING_METRICS = ("tokens_per_s", "wall_s")
# measured for the whole group when rows train concurrently on one base
SHARED_WHEN_CONCURRENT = ("tokens_per_s", "peak_mem_mib", "wall_s")
PARAM_MATCH_TOLERANCE = 0.10


def describe_rank(adapter_config: dict[str, Any] | None) -> str:
    """A short description of an adapter's rank(s), e.g. ``r=8 x3 links`` or ``8 exp. r=8``."""
    c = adapter_config or {}
    variant = c.get("variant")
    r = c.get("r")
    if variant == "cola":
        links = c.get("link_ranks")
        n = c.get("chain_length") or (len(c["knots"]) + 1 if c.get("knots") else None)
        text = f"r={'/'.join(map(str, links))}" if links else f"r={r}"
        return text + (f" x{n} links" if n else "")
    if variant == "multilora":
        return f"{c.get('num_branches')} x r={r}"
    if variant == "mixlora":
        expert_r = c.get("expert_r") or r
        return f"attn r={r}; {c.get('num_experts')} experts r={expert_r} top-{c.get('top_k')}"
    return f"r={r}" if r is not None else "—"


def _targets(adapter_config: dict[str, Any] | None) -> str:
    c = adapter_config or {}
    targets = c.get("target_modules")
    if isinstance(targets, (list, tuple)):
        targets = ",".join(targets)
    if c.get("variant") == "mixlora":
        targets = f"{targets or '—'}; FFN {','.join(c.get('ffn_projections') or [])}"
    return targets or "—"


def per_seed(results: dict[str, dict[str, Any]], row: str, metric: str) -> dict[int, float]:
    """``{seed: value}`` of one row's finished runs; ``metric`` is a record key or ``ppl@N``,
    ``passkey@N``, ``svd.<key>``."""
    out = {}
    for r in results.values():
        if r["row"] != row or r.get("status") != "ok":
            continue
        if "@" in metric:
            group, length = metric.split("@")
            value = r.get(group, {}).get(length)
        elif metric.startswith("svd."):
            value = r.get("svd", {}).get(metric[4:])
        else:
            value = r.get(metric)
        if isinstance(value, (int, float)) and math.isfinite(value):
            out[int(r["seed"])] = float(value)
    return out


def summarize(
    config: ExperimentConfig,
    results: dict[str, dict[str, Any]],
    seed_to_seed: dict[str, dict[str, list[float]]] | None = None,
) -> list[dict[str, Any]]:
    """One summary row per comparison row: mean and 95% CI of every metric over seeds.

    Also per row: the variant, its rank(s) and target modules, the adapter parameter count,
    min-max of the timings (``<metric>_range``), whether timings are shared group figures
    (``concurrent``), the ``match_params`` outcome, and (``seed_to_seed``, from
    :func:`seed_to_seed_similarity`) the row's own seed-to-seed subspace similarity.
    """
    rows = []
    for spec in config.runs:
        runs = [r for r in results.values() if r["row"] == spec.name]
        ok = [r for r in runs if r.get("status") == "ok"]
        failed = [r for r in runs if r.get("status") == "failed"]
        first = ok[0] if ok else {}
        row: dict[str, Any] = {
            "row": spec.name,
            "adapter": spec.adapter,
            "seeds_ok": len(ok),
            "seeds_failed": len(failed),
            "trains": spec.trains,
            "variant": first.get("variant", "none" if not spec.trains else None),
            "rank": describe_rank(first.get("adapter_config")) if spec.trains else "—",
            "targets": _targets(first.get("adapter_config")) if spec.trains else "—",
            "trainable": list(spec.trainable),
            "concurrent": any(r.get("concurrent") for r in ok),
        }
        if failed:
            row["reason"] = failed[0]["reason"]
        if first.get("match_params"):
            row["match_params"] = first["match_params"]
        metric_keys = [k for k, _, _ in SUMMARY_METRICS] + ["adapter_params"]
        ppl_keys = sorted({k for r in ok for k in r.get("ppl", {})}, key=int)
        pk_keys = sorted({k for r in ok for k in r.get("passkey", {})}, key=int)
        for key in metric_keys:
            row[key] = mean_ci([r.get(key, float("nan")) for r in ok])
        for key in TIMING_METRICS:
            row[f"{key}_range"] = min_max([r.get(key) for r in ok])
        for key in ppl_keys:
            row[f"ppl@{key}"] = mean_ci([r.get("ppl", {}).get(key, float("nan")) for r in ok])
        for key in pk_keys:
            row[f"passkey@{key}"] = mean_ci(
                [r.get("passkey", {}).get(key, float("nan")) for r in ok]
            )
        for key in ("effective_rank", "energy_top4"):
            vals = [r["svd"].get(key, float("nan")) for r in ok if "svd" in r]
            if vals:
                row[f"svd.{key}"] = mean_ci(vals)
        for key in ("similarity_to_lora", "similarity_to_lora_right", "similarity_random"):
            vals = [r["svd"][key] for r in ok if key in r.get("svd", {})]
            if vals:
                row[f"sim.{key}"] = mean_ci(vals)
        for key, vals in (seed_to_seed or {}).get(spec.name, {}).items():
            name = (
                f"sim.{key}_other_seed" if key.startswith("vs_lora") else f"sim.seed_to_seed_{key}"
            )
            row[name] = mean_ci(vals)
        rows.append(row)
    return rows


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
        {k for r in summary for k in r if "@" in k or k.startswith("svd.")},
        key=lambda k: (k.split("@")[0], int(k.split("@")[1]) if "@" in k else 0),
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


def param_match_warning(summary: list[dict[str, Any]]) -> str | None:
    """A warning line when the trained rows differ by more than 10% in adapter parameters or
    adapt different modules; ``None`` when they are matched."""
    trained = [r for r in summary if r.get("trains") and math.isfinite(r["adapter_params"][0])]
    if len(trained) < 2:
        return None
    lo = min(trained, key=lambda r: r["adapter_params"][0])
    hi = max(trained, key=lambda r: r["adapter_params"][0])
    problems = []
    if hi["adapter_params"][0] > (1 + PARAM_MATCH_TOLERANCE) * lo["adapter_params"][0]:
        problems.append(
            f"adapter parameters range from {lo['adapter_params'][0]:,.0f} ({lo['row']}) to "
            f"{hi['adapter_params'][0]:,.0f} ({hi['row']}), "
            f"{hi['adapter_params'][0] / max(lo['adapter_params'][0], 1):.1f}x"
        )
    targets = {r["targets"] for r in trained}
    if len(targets) > 1:
        problems.append(f"they adapt different modules ({'; '.join(sorted(targets))})")
    extra = {tuple(r.get("trainable") or ()) for r in trained}
    if len(extra) > 1:
        problems.append("some also train embeddings/norms (trainable params column)")
    if not problems:
        return None
    return (
        "**Warning: the rows are not parameter-matched**: "
        + "; ".join(problems)
        + ". A difference between rows mixes the method with its capacity; set "
        "`match_params: N` to compare at equal size."
    )


def paired_differences(
    summary: list[dict[str, Any]], results: dict[str, dict[str, Any]]
) -> tuple[str | None, dict[str, dict[str, Any]]]:
    """Every trained row against a reference row, per seed, on each quality metric.

    The reference is the first trained LoRA row (else the first trained row). Metrics: final
    train loss and perplexity at every evaluated length.

    Returns:
        ``(reference row, {row: {metric: PairedDifference}})``.
    """
    trained = [r["row"] for r in summary if r.get("trains") and r["seeds_ok"]]
    if len(trained) < 2:
        return None, {}
    by_name = {r["row"]: r for r in summary}
    lora = [n for n in trained if by_name[n].get("variant") == "lora"]
    reference = (lora or trained)[0]
    metrics = ["final_loss"] + sorted(
        {k for n in trained for k in by_name[n] if k.startswith("ppl@")},
        key=lambda k: int(k.split("@")[1]),
    )
    out = {}
    for name in trained:
        if name != reference:
            out[name] = {
                m: paired_difference(per_seed(results, name, m), per_seed(results, reference, m))
                for m in metrics
            }
    return reference, out


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
    lora = [r for r in rows if r.get("variant") == "lora"]
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


def write_outputs(
    out: Path, config: ExperimentConfig, results: dict[str, dict[str, Any]], env: dict[str, Any]
) -> None:
    """Rewrite results.json, results.csv, report.md and the plots (each file atomically)."""
    try:
        seed_to_seed = seed_to_seed_similarity(out, config, results)
    except Exception:  # an unreadable adapter must never lose the numbers
        seed_to_seed = {}
    summary = summarize(config, results, seed_to_seed)
    payload = {
        "schema_version": RESULTS_SCHEMA_VERSION,
        "library_version": __version__,
        "machine": _machine(),
        "base_model": env.get("base_path"),
        "config": _config_dict(config),
        "runs": list(results.values()),
        "summary": [
            {k: list(v) if isinstance(v, tuple) else v for k, v in r.items()} for r in summary
        ],
    }
    _atomic_write(out / "results.json", json.dumps(payload, indent=2, default=str))
    _write_csv(out / "results.csv", results)
    plots = {}
    try:
        from .plots_report import make_report_plots

        plots = make_report_plots(out, config, results)
    except Exception as e:  # a plot must never lose the numbers
        plots = {"error": f"{type(e).__name__}: {e}"}
    _atomic_write(out / "report.md", _report_markdown(config, summary, plots, results))


def _machine() -> str:
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return (
        f"{platform.machine()}, {os.cpu_count()} CPUs, {gpu}, torch {torch.__version__}, "
        f"Python {platform.python_version()}"
    )


def _config_dict(config: ExperimentConfig) -> dict[str, Any]:
    return json.loads(json.dumps(asdict(config), default=str))


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
    fields = (
        CSV_FIELDS
        + [f"ppl@{k}" for k in ppl_keys]
        + [f"passkey@{k}" for k in pk_keys]
        + ["effective_rank", "energy_top4", "similarity_to_lora", "similarity_to_lora_right"]
    )
    tmp = file.with_suffix(".csv.tmp")
    with tmp.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
        writer.writeheader()
        for r in results.values():
            flat = dict(r)
            flat.update({f"ppl@{k}": v for k, v in r.get("ppl", {}).items()})
            flat.update({f"passkey@{k}": v for k, v in r.get("passkey", {}).items()})
            flat.update({k: v for k, v in r.get("svd", {}).items() if not isinstance(v, dict)})
            writer.writerow(flat)
    os.replace(tmp, file)


def _atomic_write(file: Path, text: str) -> None:
    tmp = file.with_name(file.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, file)


def _report_markdown(
    config: ExperimentConfig,
    summary: list[dict[str, Any]],
    plots: dict[str, str],
    results: dict[str, dict[str, Any]] | None = None,
) -> str:
    t = config.train
    lines = [
        "# loravariants comparison",
        "",
        f"*{time.strftime('%Y-%m-%d %H:%M')} · loravariants {__version__} · {_machine()}*",
        "",
        f"Base model: `{config.base_model}`; data: `{config.data.source}`; context: "
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
        from .analysis.findings import findings_section

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
