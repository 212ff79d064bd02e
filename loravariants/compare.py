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
from .train import TrainConfig, seed_everything, train
from .utils import output_lock

__all__ = ["compare", "PeakMemory", "match_rank", "RESULTS_SCHEMA_VERSION", "summarize"]

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

RANK_FIELDS = {"lora": "r", "cola": "r", "multilora": "r", "mixlora": "expert_r"}


def count_adapter_params(model_factory: Callable[[], nn.Module], adapter_config) -> int:
    """Trainable adapter parameters ``adapter_config`` adds to a fresh model."""
    model = attach(model_factory(), adapter_config)
    return sum(
        p.numel() for n, p in model.named_parameters() if p.requires_grad and ".adapters." in n
    )


def match_rank(
    model_factory: Callable[[], nn.Module],
    spec: str,
    overrides: dict[str, Any],
    target: int,
    spec_dir: str | None,
    max_rank: int = 512,
) -> tuple[dict[str, Any], int]:
    """The rank override whose adapter's parameter count is closest to ``target``.

    Counts grow monotonically with the rank, so a bisection finds the crossing; the nearer of
    its two neighbours wins.

    Returns:
        ``(overrides with the rank set, achieved parameter count)``.
    """
    variant = load_adapter_spec(spec, overrides, spec_dir).variant
    field = RANK_FIELDS.get(variant)
    if field is None:
        raise ValueError(f"match_params: no rank field known for variant {variant!r}")

    def count(r: int) -> int:
        return count_adapter_params(
            model_factory, load_adapter_spec(spec, {**overrides, field: r}, spec_dir)
        )

    lo, hi = 1, max_rank
    if count(hi) < target:
        return {**overrides, field: hi}, count(hi)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if count(mid) < target:
            lo = mid
        else:
            hi = mid
    best = min((lo, hi), key=lambda r: abs(count(r) - target))
    return {**overrides, field: best}, count(best)


# ---------------------------------------------------------------------------------------------
# one run
# ---------------------------------------------------------------------------------------------


def _eval_lengths(config: ExperimentConfig, native: int) -> list[int]:
    if config.eval.lengths:
        return list(config.eval.lengths)
    target = config.context.target_length or native
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
        extend_context(model, target, method=config.context.method, trainable=tuple(row.trainable))
        record["context"] = target
    else:
        if row.trainable:
            mark_trainable(model, trainable_module_names(model, row.trainable))
        record["context"] = native
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
    """Perplexity per length, passkey, and (adapter ``name``) the SVD summary."""
    from .evaluate import passkey_accuracy, perplexity_at_lengths

    model.to(env["device"]).eval()
    ppl = perplexity_at_lengths(
        model,
        env["val_tokens"],
        _eval_lengths(config, native),
        stride_ratio=config.eval.stride_ratio,
        max_tokens=config.eval.max_tokens,
        progress=progress,
    )
    record: dict[str, Any] = {"ppl": {str(k): v for k, v in ppl.items()}}
    if config.eval.passkey_lengths:
        pk = passkey_accuracy(
            model, env["tokenizer"], config.eval.passkey_lengths, config.eval.passkey_trials, seed
        )
        record["passkey"] = {str(k): r.accuracy for k, r in pk.items()}
    if name is not None:
        record["svd"] = _svd_summary(model, env, seed, name)
        stats = _router_stats(model, name)
        if stats:
            record["router_tokens_per_expert"] = stats
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
    """Effective rank, energy in the top 4 directions, and similarity to LoRA's subspace."""
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
        summary["similarity_to_lora"] = _similarity_to(model, reference, name)
    return summary


def _similarity_to(model: nn.Module, reference_dir: Path, name: str) -> float:
    from .analysis import subspace_similarity
    from .io import read_factors

    ref = read_factors(reference_dir)
    values = []
    for path, _, layer in iter_adapters(model, name):
        if path in ref and layer.mergeable:
            B, A = layer.factors()
            rb, ra = ref[path]
            k = min(A.shape[0], ra.shape[0])
            values.append(subspace_similarity((B, A), (rb, ra), k, k))
    return _mean(values)


def _mean(values) -> float:
    values = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    return sum(values) / len(values) if values else float("nan")


# ---------------------------------------------------------------------------------------------
# the whole comparison
# ---------------------------------------------------------------------------------------------


def _plan(config: ExperimentConfig) -> list[tuple[RunSpec, int]]:
    plan = []
    for row in config.runs:
        for seed in config.seeds if row.trains else config.seeds[:1]:
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
    matched: dict[str, int] = {}
    if config.match_params:
        for row in config.runs:
            if row.trains:
                overrides[row.name], matched[row.name] = match_rank(
                    env["load_model"],
                    row.adapter,
                    overrides[row.name],
                    config.match_params,
                    config.spec_dir,
                )
                log(
                    f"match_params: {row.name} -> {overrides[row.name]} "
                    f"({matched[row.name]:,} adapter parameters)"
                )
    plan = _plan(config)
    if only is not None:
        plan = [(row, seed) for row, seed in plan if (row.name, seed) in set(only)]
    if config.concurrent:
        _concurrent_groups(config, plan, results, env, out, overrides, matched, progress, log)
    for i, (row, seed) in enumerate(plan, 1):
        key = run_key(row, seed)
        run_dir = out / "runs" / row.name / f"seed{seed}"
        if config.concurrent and row.trains:
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
                record["matched_params"] = matched[row.name]
            results[key] = record
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
                record["matched_params"] = matched[row.name]
            results[key] = record
        write_outputs(out, config, results, env)


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


def _t975(dof: int) -> float:
    from scipy.stats import t

    return float(t.ppf(0.975, dof))


def mean_ci(values: list[float]) -> tuple[float, float]:
    """Mean and the half-width of its 95% confidence interval (Student t; 0 for one value)."""
    values = [v for v in values if v is not None and math.isfinite(v)]
    if not values:
        return float("nan"), float("nan")
    n = len(values)
    mean = sum(values) / n
    if n == 1:
        return mean, 0.0
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    return mean, _t975(n - 1) * sd / math.sqrt(n)


def summarize(config: ExperimentConfig, results: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """One summary row per comparison row: mean and 95% CI of every metric over seeds."""
    rows = []
    for spec in config.runs:
        runs = [r for r in results.values() if r["row"] == spec.name]
        ok = [r for r in runs if r.get("status") == "ok"]
        failed = [r for r in runs if r.get("status") == "failed"]
        row: dict[str, Any] = {
            "row": spec.name,
            "adapter": spec.adapter,
            "seeds_ok": len(ok),
            "seeds_failed": len(failed),
        }
        if failed:
            row["reason"] = failed[0]["reason"]
        metric_keys = [k for k, _, _ in SUMMARY_METRICS]
        ppl_keys = sorted({k for r in ok for k in r.get("ppl", {})}, key=int)
        pk_keys = sorted({k for r in ok for k in r.get("passkey", {})}, key=int)
        for key in metric_keys:
            row[key] = mean_ci([r.get(key, float("nan")) for r in ok])
        for key in ppl_keys:
            row[f"ppl@{key}"] = mean_ci([r["ppl"].get(key, float("nan")) for r in ok])
        for key in pk_keys:
            row[f"passkey@{key}"] = mean_ci([r["passkey"].get(key, float("nan")) for r in ok])
        for key in ("effective_rank", "energy_top4", "similarity_to_lora"):
            vals = [r["svd"].get(key, float("nan")) for r in ok if "svd" in r]
            if vals:
                row[f"svd.{key}"] = mean_ci(vals)
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


def summary_table(summary: list[dict[str, Any]]) -> str:
    """The summary as a Markdown table (mean ± 95% CI over seeds)."""
    columns = ["row", "seeds"]
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
        keys.append((k, "{:.2f}" if k.startswith("ppl") or k.startswith("svd") else "{:.2f}"))
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for r in summary:
        seeds = f"{r['seeds_ok']}"
        if r["seeds_failed"]:
            seeds += f" ({r['seeds_failed']} failed: {r.get('reason', '')[:60]})"
        cells = [r["row"], seeds]
        for k, pattern in keys:
            cells.append(_fmt(r.get(k, (float("nan"), float("nan"))), pattern))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_outputs(
    out: Path, config: ExperimentConfig, results: dict[str, dict[str, Any]], env: dict[str, Any]
) -> None:
    """Rewrite results.json, results.csv, report.md and the plots (each file atomically)."""
    summary = summarize(config, results)
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
    _atomic_write(out / "report.md", _report_markdown(config, summary, plots))


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
        + ["effective_rank", "energy_top4", "similarity_to_lora"]
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
    config: ExperimentConfig, summary: list[dict[str, Any]], plots: dict[str, str]
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
        "Perplexity uses a strided sliding window with full attention; throughput and memory "
        "are measured the same way for every row.",
        "",
        summary_table(summary),
        "",
    ]
    if "error" in plots:
        lines += [f"Plots could not be drawn: {plots['error']}", ""]
    for title, file in plots.items():
        if title != "error":
            lines += [f"## {title}", "", f"![{title}]({file})", ""]
    return "\n".join(lines)
