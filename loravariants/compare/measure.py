"""Measure one run: peak memory and throughput records, perplexity, passkey, lm-eval tasks,
the SVD summary and the per-layer statistics the variant reports; and the similarity of two
adapters' factors, which the cross-run measures (:mod:`.crossrun`) apply to pairs of runs.
Nothing here reads another run's record or files.
"""

from __future__ import annotations

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
from ..evaluate import document_nll_at_lengths, passkey_accuracy
from ..inject import adapter_names, iter_adapters
from ..io import read_factors
from ..stats import final_loss
from .env import Environment


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
    lengths: list[int],
    name: str | None,
    progress: bool,
) -> dict[str, Any]:
    """Perplexity at each of ``lengths``, passkey, and (adapter ``name``) the SVD summary.

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

    # per validation document and length: [nll sum, tokens scored] (the hierarchical
    # bootstrap's input); the perplexity is their pooled ratio, on the same windows
    doc_nll: dict[str, list[list[float]]] = {}
    metric("ppl", lambda: _perplexity_and_doc_nll(model, config, env, lengths, progress, doc_nll))
    if doc_nll:
        record["doc_nll"] = doc_nll
    if config.eval.passkey_lengths:
        outcomes: dict[str, list[int]] = {}
        metric("passkey", lambda: _passkey(model, config, env, seed, outcomes))
        if outcomes:
            record["passkey_outcomes"] = outcomes
    if config.eval.lm_eval:  # downstream tasks (lm-eval): {task: main metric}, then all
        tasks: dict[str, Any] = {}
        metric("lm_eval", lambda: _lm_eval(model, config, env, tasks))
        if tasks:
            record["lm_eval_metrics"] = tasks
    if name is not None:
        metric("svd", lambda: _svd_summary(model, name))
        try:
            stats = _layer_stats(model, name)
        except Exception as e:  # keep the run; report the statistics as failed
            stats, errors["layer_stats"] = {}, f"{type(e).__name__}: {e}"
        for key, by_layer in stats.items():  # MixLoRA: router_tokens_per_expert
            metric(key, lambda by_layer=by_layer: by_layer)
    if errors:
        record["metric_errors"] = errors
    return record


def _perplexity_and_doc_nll(
    model: nn.Module,
    config: ExperimentConfig,
    env: Environment,
    lengths: list[int],
    progress: bool,
    doc_nll: dict[str, list[list[float]]],
) -> dict[str, float]:
    """``{length: perplexity}``; fills ``doc_nll`` with ``{length: [[nll, tokens], ...]}``,
    one pair per validation document in stream order (the same for every run)."""
    documents = env.val_document_lengths or [int(env.val_tokens.numel())]
    sums = document_nll_at_lengths(
        model,
        env.val_tokens,
        documents,
        lengths,
        stride_ratio=config.eval.stride_ratio,
        max_tokens=config.eval.max_tokens,
        progress=progress,
    )
    ppl = {}
    for n, table in sums.items():
        doc_nll[str(n)] = table.tolist()
        ppl[str(n)] = math.exp(float(table[:, 0].sum()) / float(table[:, 1].sum()))
    return ppl


def _passkey(
    model: nn.Module,
    config: ExperimentConfig,
    env: Environment,
    seed: int,
    outcomes: dict[str, list[int]],
) -> dict[str, float]:
    """``{length: accuracy}``; fills ``outcomes`` with ``{length: [0|1 per prompt]}`` (the
    prompts depend on the seed only: every row of a seed sees the same ones)."""
    results = passkey_accuracy(
        model, env.tokenizer, config.eval.passkey_lengths, config.eval.passkey_trials, seed
    )
    for k, r in results.items():
        outcomes[str(k)] = list(r.hits)
    return {str(k): r.accuracy for k, r in results.items()}


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


def _svd_summary(model: nn.Module, name: str) -> dict[str, Any]:
    """Effective rank and energy in the top 4 directions of adapter ``name``'s updates, mean
    over its layers and per layer. (Its similarity to the seed's reference run is a cross-run
    measure: :mod:`.crossrun` adds it from the saved adapters.)"""
    rows = analyze(model).rows()
    if len(adapter_names(model)) > 1:  # the report names adapters only when there are several
        rows = [r for r in rows if r.get("adapter") == name]
    return {
        "effective_rank": finite_mean([r["effective_rank"] for r in rows]),
        "energy_top4": finite_mean([r.get("energy_top4", float("nan")) for r in rows]),
        "effective_rank_by_layer": {r["module"]: r["effective_rank"] for r in rows},
    }


def _similarity_to(model: nn.Module, reference_dir: Path, name: str) -> dict[str, float]:
    """:func:`similarity_fields` of a live model's adapter ``name`` against a saved one (loaded
    on the CPU, compared on the model's device)."""
    ours = {
        path: layer.factors() for path, _, layer in iter_adapters(model, name) if layer.mergeable
    }
    # loaded on the CPU; subspace_similarity computes on our factors' device (the model's)
    return similarity_fields(ours, read_factors(reference_dir))


def similarity_fields(
    ours: dict[str, tuple[torch.Tensor, torch.Tensor]],
    reference: dict[str, tuple[torch.Tensor, torch.Tensor]],
) -> dict[str, float]:
    """The record's ``svd`` fields of a run against its seed's reference run (``{module:
    (B, A)}`` each): left and right similarity, and the left side's random baseline.

    ``similarity_to_lora`` compares the *left* (column, output-space) subspace of each layer's
    dW: B starts at zero, so that side is set by training. The right (row) subspace is
    ``similarity_to_lora_right``; rows that share a seed share A's random initialisation, so
    it mostly measures that shared init, not learning. ``similarity_random`` is the mean
    random-subspace baseline ``k / out`` of the same layers.
    """
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


def finite_mean(values) -> float:
    values = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    return sum(values) / len(values) if values else float("nan")


def training_record(result, mem: PeakMemory) -> dict[str, Any]:
    return dict(
        final_loss=result.final_loss,
        # the report's training loss: the mean of the last 10% of steps, not one step's
        train_loss_final=final_loss(result.losses) if result.losses else float("nan"),
        loss_curve=result.losses,
        tokens=result.tokens,
        tokens_per_s=result.tokens_per_second,
        wall_s=result.wall_time,
        peak_mem_mib=mem.peak_mib,
        peak_mem_delta_mib=mem.delta_mib,
    )
