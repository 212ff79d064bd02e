"""Concurrent multi-adapter training on one frozen base (ASPEN / m-LoRA, arXiv 2312.02515).

::

    job "lora":  rows 0..3  ─┐                         ┌─► loss_lora  ─► AdamW_lora
    job "mix":   rows 4..7  ─┼─► one forward, frozen ──┼─► loss_mix   ─► AdamW_mix
    job "cola":  rows 8..11 ─┘   layers run once;      └─► loss_cola  ─► AdamW_cola
                                 each adapter adds its        (one backward of the sum)
                                 update to its own rows

Every job keeps what a sequential run has: its own data order (seeded by its config), optimizer,
LR schedule, ``aux_loss`` and ``on_step_end`` (a COLA restart resets only that job's optimizer
state). The frozen computation of every layer runs once per step for all jobs.

Gradients are exact, not approximated: the fused forward is ordinary autograd through
:func:`~loravariants.adapters.base.route_rows`, so each adapter's gradient is the gradient of its
own loss on its own rows, dropout masks included (ASPEN's hand-written fused backward drops the
dropout mask). The loss is the sum of the per-job losses; since rows are disjoint and no
trainable parameter is shared, job ``j``'s parameters receive exactly ``d loss_j / d theta_j``.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from .adapters.base import route_rows
from .inject import adapter_config, adapter_names, aux_loss, extra_trainable_modules, iter_adapters
from .inject import on_step_end as run_step_end_hooks
from .train import (
    TrainConfig,
    TrainingDiverged,
    TrainResult,
    advance_schedule,
    collate,
    global_rows,
    label_count,
    make_optimizer,
    token_share,
)

__all__ = ["Job", "train_concurrent", "causal_lm_loss"]


@dataclass
class Job:
    """One adapter's training job: the adapter's name, its data and its budget."""

    adapter: str
    dataset: Any
    config: TrainConfig


def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy over labels != -100 (what HF causal LMs compute).

    Args:
        logits: ``(b, n, vocab)``.
        labels: ``(b, n)``.
    """
    shift_logits = logits[:, :-1].reshape(-1, logits.shape[-1]).float()
    shift_labels = labels[:, 1:].reshape(-1)
    return F.cross_entropy(shift_logits, shift_labels, ignore_index=-100)


def _micro_rows(job: Job, step: int, micro: int, grad_accum: int) -> list[int]:
    """The dataset rows of one job's micro-batch (the order `train` would use)."""
    bs = job.config.batch_size
    start = (step * grad_accum + micro) * bs
    return global_rows(len(job.dataset), job.config.seed, start, bs)


def _job_params(model: nn.Module, name: str) -> list[nn.Parameter]:
    return [p for _, _, layer in iter_adapters(model, name) for p in layer.parameters()]


def train_concurrent(
    model: nn.Module,
    jobs: list[Job],
    progress: bool = True,
) -> dict[str, TrainResult]:
    """Train several adapters of one model at once, one job per adapter.

    Args:
        model: the frozen base with every job's adapter attached (``lv.attach(..., name=...)``).
        jobs: one :class:`Job` per adapter; their datasets must yield equal-length rows.
            ``grad_accum`` must agree; ``max_steps`` may differ (a finished job stops
            contributing rows).
        progress: show a tqdm bar.

    Returns:
        ``{adapter name: TrainResult}``, with the same fields as sequential :func:`train` runs;
        ``tokens_per_second`` is each job's tokens over the shared wall time.

    Raises:
        ValueError: unknown adapter, duplicate jobs, differing grad_accum, or extra trainable
            modules (embeddings/norms would be shared between jobs).
    """
    _check_jobs(model, jobs)
    grad_accum = jobs[0].config.grad_accum
    state = {job.adapter: _job_state(model, job) for job in jobs}
    model.train()
    total_steps = max(job.config.max_steps for job in jobs)
    bar = tqdm(
        total=total_steps,
        desc=f"train x{len(jobs)}",
        unit="step",
        disable=not progress,
        dynamic_ncols=True,
    )
    t0 = time.perf_counter()
    for step in range(total_steps):
        running = [job for job in jobs if step < job.config.max_steps]
        losses = _concurrent_step(model, running, step, grad_accum, state)
        bar.update(1)
        bar.set_postfix({n: f"{losses[n]:.3f}" for n in losses})
    bar.close()
    wall = time.perf_counter() - t0
    model.eval()
    results = {}
    for name, s in state.items():
        r = s["result"]
        r.wall_time = wall
        r.tokens_per_second = r.tokens / max(wall, 1e-9)
        results[name] = r
    return results


def _job_state(model: nn.Module, job: Job) -> dict[str, Any]:
    """One job's own optimizer over its adapter's parameters, its schedule, and its result."""
    params = _job_params(model, job.adapter)
    opt, sched, cycle = make_optimizer(params, job.config)
    return dict(
        params=params,
        opt=opt,
        sched=sched,
        cycle=cycle,
        restart_lr=adapter_config(model, job.adapter).restarts_lr_schedule(),
        result=TrainResult(),
    )


def _concurrent_step(
    model: nn.Module, running: list[Job], step: int, grad_accum: int, state: dict[str, dict]
) -> dict[str, float]:
    """Optimizer step ``step`` of every running job: its micro-batches fused with the other
    jobs' (:func:`_fused_micro_batch`), then each job's own update. Returns each job's loss."""
    losses = {job.adapter: 0.0 for job in running}
    auxes = {job.adapter: 0.0 for job in running}
    # each job's micro-batches of this step, read once
    micro_batches = {
        job.adapter: [
            collate(job.dataset, _micro_rows(job, step, m, grad_accum)) for m in range(grad_accum)
        ]
        for job in running
    }
    # each job's loss is the mean over all label tokens of its step (as in `train`)
    step_tokens = {
        adapter: max(sum(label_count(b["labels"]) for b in batches), 1)
        for adapter, batches in micro_batches.items()
    }
    for micro in range(grad_accum):
        batches = [micro_batches[job.adapter][micro] for job in running]
        _fused_micro_batch(model, running, batches, step_tokens, state, losses, auxes)
    for job in running:
        _job_step(model, job, state[job.adapter], step, losses[job.adapter], auxes[job.adapter])
    return losses


def _fused_micro_batch(model, running, batches, step_tokens, state, losses, auxes) -> None:
    """One micro-batch of every running job as one batch (each job's rows routed to its
    adapter): one forward, each job's loss on its own rows, one backward of their sum.
    Adds each job's loss parts to ``losses`` / ``auxes`` and its label tokens to its result."""
    device = next(model.parameters()).device
    grad_accum = running[0].config.grad_accum
    rows_of, offset = {}, 0
    for job in running:
        rows_of[job.adapter] = slice(offset, offset + job.config.batch_size)
        offset += job.config.batch_size
    merged = {k: torch.cat([b[k] for b in batches]).to(device) for k in batches[0]}
    labels = merged.pop("labels")
    with route_rows(rows_of):
        logits = model(**merged).logits
    total = torch.zeros((), device=device)
    for job in running:
        rows = rows_of[job.adapter]
        n_micro = label_count(labels[rows])
        lm = causal_lm_loss(logits[rows], labels[rows])
        lm_part = token_share(lm, logits[rows], n_micro, step_tokens[job.adapter])
        aux = aux_loss(model, job.adapter).to(device)
        total = total + lm_part + aux / grad_accum
        losses[job.adapter] += lm_part.item()
        auxes[job.adapter] += aux.item() / grad_accum
        state[job.adapter]["result"].tokens += n_micro
    total.backward()


def _job_step(model, job, s: dict[str, Any], step: int, loss: float, aux: float) -> None:
    """The optimizer step of one job (its own optimizer, schedule and hooks), as in `train`."""
    if not (math.isfinite(loss) and math.isfinite(aux)):
        raise TrainingDiverged(f"adapter {job.adapter!r}: loss became {loss} at step {step + 1}")
    if job.config.max_grad_norm > 0:
        torch.nn.utils.clip_grad_norm_(s["params"], job.config.max_grad_norm)
    s["opt"].step()
    s["opt"].zero_grad(set_to_none=True)
    reset = run_step_end_hooks(model, step + 1, s["opt"], name=job.adapter)
    advance_schedule(s["sched"], s["cycle"], step + 1, bool(reset) and s["restart_lr"])
    s["result"].losses.append(loss)
    s["result"].aux_losses.append(aux)
    s["result"].steps = step + 1


def _check_jobs(model: nn.Module, jobs: Sequence[Job]) -> None:
    """Refuse jobs that cannot train together (the errors `train_concurrent` documents)."""
    names = [job.adapter for job in jobs]
    if not jobs:
        raise ValueError("train_concurrent needs at least one job")
    if len(set(names)) != len(names):
        raise ValueError(f"each adapter may have one job only, got {names}")
    unknown = sorted(set(names) - set(adapter_names(model)))
    if unknown:
        raise ValueError(f"no adapter named {unknown} attached; attached: {adapter_names(model)}")
    if len({job.config.grad_accum for job in jobs}) != 1:
        raise ValueError("all jobs must use the same grad_accum")
    if any(job.config.report_to or job.config.eval_every for job in jobs):
        raise ValueError("train_concurrent does not support report_to or eval_every yet")
    if extra_trainable_modules(model):
        raise ValueError(
            "concurrent training cannot share trainable base modules "
            f"{extra_trainable_modules(model)} between jobs; train them sequentially"
        )
