"""The one training loop every variant shares.

    setup  -> seed, accelerator, optimizer over adapter (+ marked) parameters, LR schedule
    loop   -> micro-batches (grad accumulation) -> loss = LM loss + lv.aux_loss(model)
              -> clip, step -> lv.on_step_end (COLA restarts reset their Adam state)
              -> log (tqdm + metrics.jsonl + report_to's trackers; eval_every: validation
                 perplexity; tracking.py) -> checkpoint every N steps
    done   -> TrainResult (losses, tokens/s, wall time)

Variants differ only through their layers, ``aux_loss()`` and ``on_step_end()``; nothing here
knows which variant it trains.

Data order is ours, not the DataLoader's: optimizer step ``s`` always consumes the same rows of
a seeded permutation, whatever the number of processes, so a resumed run replays exactly the
batches an uninterrupted one would have seen, and a 2-process run at global batch 8 sees the
same rows as a 1-process run at batch 8.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from tqdm.auto import tqdm

from . import tracking
from .checkpoint import (
    TrainingDiverged,
    checkpoint_dir,
    clean_checkpoint_leftovers,
    last_good_checkpoint,
    resume_checkpoint,
    save_checkpoint,
    truncate_metrics,
)
from .distributed import (
    average_replicated_gradients,
    check_supported,
    fsdp_accelerator,
    launch_strategy,
    statistics_context,
)
from .inject import adapter_config, adapter_names, iter_adapters, on_step_end
from .inject import aux_loss as adapters_aux_loss
from .utils import (
    claim_output_dir,
    output_lock,
)
from .validation import check_range

if TYPE_CHECKING:  # accelerate is imported when a run starts (_accelerator), not with the package
    from accelerate import Accelerator

__all__ = ["TrainConfig", "TrainResult", "TrainingDiverged", "train", "lr_factor"]

# the largest seed: what every generator takes (numpy's limit; seed_everything and the data
# order's generator overflow far above it)
MAX_SEED = 2**32 - 1

SCHEDULES = ("constant", "linear", "cosine")
PRECISIONS = ("auto", "no", "bf16", "fp16")


@dataclass
class TrainConfig:
    """Budget and optimisation settings (YAML key ``train:``).

    Attributes:
        max_steps: optimizer steps, >= 1.
        batch_size: rows per micro-batch per process, >= 1.
        grad_accum: micro-batches per optimizer step, >= 1. Global batch =
            batch_size x grad_accum x processes.
        lr: peak learning rate, > 0.
        weight_decay: AdamW weight decay, >= 0 (LongLoRA: 0).
        betas: AdamW betas (LongLoRA: 0.9, 0.95).
        warmup_steps: linear warm-up steps, >= 0 (LongLoRA: 20).
        schedule: after warm-up: ``constant`` (LongLoRA), ``linear`` or ``cosine`` decay to 0.
        max_grad_norm: gradient clipping norm; 0 disables.
        gradient_checkpointing: recompute activations in backward (memory for time).
        mixed_precision: ``auto`` (bf16 on CUDA, else fp32), ``no``, ``bf16``, ``fp16``.
        seed: the one seed for initialisation, data order and dropout.
        save_every: checkpoint every N steps (0: never); needs an output directory.
        keep_last: checkpoints kept, >= 1.
        log_every: steps between metric lines, >= 1.
        report_to: experiment trackers the metric lines also go to, any of ``tensorboard``,
            ``wandb``, ``trackio``, ``mlflow`` (default none; :mod:`loravariants.tracking`).
        eval_every: validation perplexity every N steps (0: never); needs ``eval_data``.
    """

    max_steps: int = 100
    batch_size: int = 4
    grad_accum: int = 1
    lr: float = 2e-4
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.95)
    warmup_steps: int = 20
    schedule: str = "constant"
    max_grad_norm: float = 1.0
    gradient_checkpointing: bool = False
    mixed_precision: str = "auto"
    seed: int = 0
    save_every: int = 0
    keep_last: int = 2
    log_every: int = 1
    report_to: list[str] = field(default_factory=list)
    eval_every: int = 0

    def __post_init__(self) -> None:
        # YAML 1.1 reads `2e-4` (no dot) as a string: take it as the number it spells
        for key in ("lr", "weight_decay", "max_grad_norm"):
            setattr(self, key, _number(key, getattr(self, key)))
        if not isinstance(self.betas, (list, tuple)):
            raise ValueError(f"betas must be two numbers in [0, 1), got {self.betas!r}")
        self.betas = tuple(_number(f"betas[{i}]", b) for i, b in enumerate(self.betas))
        check_range("max_steps", self.max_steps, low=1, integer=True)
        check_range("batch_size", self.batch_size, low=1, integer=True)
        check_range("grad_accum", self.grad_accum, low=1, integer=True)
        check_range("lr", self.lr, low=0, low_open=True)
        check_range("weight_decay", self.weight_decay, low=0)
        if len(self.betas) != 2:
            raise ValueError(f"betas must be two numbers in [0, 1), got {self.betas!r}")
        for i, b in enumerate(self.betas):
            check_range(f"betas[{i}]", b, low=0, high=1, high_open=True)
        check_range("warmup_steps", self.warmup_steps, low=0, integer=True)
        if not isinstance(self.gradient_checkpointing, bool):
            raise ValueError(
                f"gradient_checkpointing must be true or false, got {self.gradient_checkpointing!r}"
            )
        if not isinstance(self.schedule, str) or self.schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {list(SCHEDULES)}, got {self.schedule!r}")
        check_range("max_grad_norm", self.max_grad_norm, low=0)
        if not isinstance(self.mixed_precision, str) or self.mixed_precision not in PRECISIONS:
            raise ValueError(
                f"mixed_precision must be one of {list(PRECISIONS)}, got {self.mixed_precision!r}"
            )
        check_range("seed", self.seed, low=0, high=MAX_SEED, integer=True)
        check_range("save_every", self.save_every, low=0, integer=True)
        check_range("keep_last", self.keep_last, low=1, integer=True)
        check_range("log_every", self.log_every, low=1, integer=True)
        # a tracker that is not installed: one line with its `pip install`, before any work
        self.report_to = tracking.check_report_to(self.report_to)
        check_range("eval_every", self.eval_every, low=0, integer=True)


def _number(name: str, value: Any) -> Any:
    """A float field given as a string that spells a number (YAML 1.1's ``2e-4``) -> float."""
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            raise ValueError(f"{name} must be a number, got {value!r}") from None
    return value


@dataclass
class TrainResult:
    """What a run produced."""

    losses: list[float] = field(default_factory=list)  # LM loss per optimizer step
    aux_losses: list[float] = field(default_factory=list)
    steps: int = 0
    tokens: int = 0  # trained (label) tokens over all processes
    wall_time: float = 0.0
    tokens_per_second: float = 0.0
    resumed_from: int | None = None

    @property
    def final_loss(self) -> float:
        return self.losses[-1] if self.losses else float("nan")


def lr_factor(step: int, warmup: int, total: int, schedule: str) -> float:
    """Multiplier of the peak LR at optimizer step ``step`` (0-based) of a ``total``-step cycle.

    Linear warm-up over ``warmup`` steps, then constant / linear / cosine decay to 0 at ``total``.
    """
    if warmup and step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    progress = (step - warmup) / max(1, total - warmup)
    progress = min(max(progress, 0.0), 1.0)
    if schedule == "linear":
        return 1.0 - progress
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def make_optimizer(
    params: Sequence[nn.Parameter], config: TrainConfig
) -> tuple[torch.optim.AdamW, torch.optim.lr_scheduler.LambdaLR, dict[str, int]]:
    """AdamW over ``params`` and its schedule (:func:`lr_factor` of ``config``), for
    :func:`train` and :func:`~loravariants.multi.train_concurrent` alike.

    Returns:
        ``(optimizer, scheduler, cycle)``: the schedule counts from ``cycle["start"]``, the
        step of the last restart (:func:`advance_schedule`); checkpoints save it.
    """
    optimizer = torch.optim.AdamW(
        params, lr=config.lr, betas=config.betas, weight_decay=config.weight_decay
    )
    cycle = {"start": 0}
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda s: lr_factor(
            s - cycle["start"],
            config.warmup_steps,
            config.max_steps - cycle["start"],
            config.schedule,
        ),
    )
    return optimizer, scheduler, cycle


def advance_schedule(scheduler, cycle: dict[str, int], step: int, restart: bool) -> None:
    """After optimizer step ``step`` and the adapters' step-end hooks: start a new LR cycle
    when an adapter restarted and asks for it (COLA's ``restart_lr_schedule``), then step the
    schedule, so that the restart already sets the next step's LR."""
    if restart:
        cycle["start"] = step
    scheduler.step()


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)


def _order(n: int, seed: int, epoch: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed * 100_003 + epoch)
    return torch.randperm(n, generator=g)


def global_rows(n: int, seed: int, start: int, count: int) -> list[int]:
    """Rows ``start .. start+count`` of the endless stream of seeded per-epoch permutations."""
    rows: list[int] = []
    while len(rows) < count:
        epoch, offset = divmod(start + len(rows), n)
        perm = _order(n, seed, epoch)
        rows.extend(perm[offset : offset + count - len(rows)].tolist())
    return rows


def label_count(labels: torch.Tensor) -> int:
    """Tokens the causal-LM loss scores in ``(..., n)`` labels: after the first, not -100."""
    return int((labels[..., 1:] != -100).sum())


def label_tokens(dataset, rows: Sequence[int]) -> int:
    """:func:`label_count` over the dataset's ``rows``."""
    return sum(label_count(torch.as_tensor(dataset[i]["labels"])) for i in rows)


def token_share(
    mean_loss: torch.Tensor, logits: torch.Tensor, n_tokens: int, step_tokens: int
) -> torch.Tensor:
    """A micro-batch's part of its step's token-mean loss: ``mean_loss * n / N``.

    Summed over the step's micro-batches this is the mean over all ``N`` label tokens, as one
    big batch gives, also when rows hold different numbers of label tokens (SFT with masked
    prompts). With no label token the mean loss is 0/0: the part is then a zero that still
    reaches every parameter (DDP expects each process's backward).
    """
    if not n_tokens:
        return logits.float().sum() * 0.0
    return mean_loss * (n_tokens / step_tokens)


def collate(dataset, rows: Sequence[int]) -> dict[str, torch.Tensor]:
    items = [dataset[i] for i in rows]
    return {k: torch.stack([torch.as_tensor(it[k]) for it in items]) for k in items[0]}


def _accelerator(
    config: TrainConfig, model: nn.Module, has_sparse_layers: bool, strategy: str, out=None
):
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, GradientState
    from accelerate.utils import DistributedDataParallelKwargs

    precision = config.mixed_precision
    if precision == "auto":
        precision = "bf16" if torch.cuda.is_available() else "no"
    # accelerate keeps its settings in process-wide singletons: a second train() in one process
    # (a notebook, compare) with another mixed_precision would be refused. The per-run part is
    # reset; PartialState (the process group of a distributed launch) is kept.
    AcceleratorState._reset_state(reset_partial_state=False)
    GradientState._reset_state()
    # MixLoRA experts can receive no token in a step; DDP must then not wait for their grads.
    handlers = [DistributedDataParallelKwargs(find_unused_parameters=has_sparse_layers)]
    # cpu=True without CUDA: accelerate only recognises a torchrun/`accelerate launch` CPU job
    # (gloo) when told it runs on CPU; otherwise every process would silently train alone.
    settings = dict(
        mixed_precision=precision, kwargs_handlers=handlers, cpu=not torch.cuda.is_available()
    )
    settings.update(tracking.tracker_settings(config.report_to, out))  # {} without trackers
    if strategy == "fsdp":
        return fsdp_accelerator(model, **settings)
    return Accelerator(**settings)


def trainable_named_parameters(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


def train(
    model: nn.Module,
    dataset: Any,
    config: TrainConfig,
    output_dir: str | os.PathLike | None = None,
    resume: bool = True,
    progress: bool = True,
    eval_data: torch.Tensor | None = None,
    run_name: str | None = None,
) -> TrainResult:
    """Train the model's adapters (and marked modules) on ``dataset``.

    Args:
        model: a model with adapters attached (``lv.attach``); its trainable parameters are
            exactly what gets optimised.
        dataset: indexable, ``len()``-able; item ``i`` is a dict of equal-shape tensors with
            ``input_ids`` ``(n,)`` and ``labels`` ``(n,)`` (-100 = ignored), optionally
            ``attention_mask`` ``(n,)``.
        config: budget and optimisation settings.
        output_dir: where ``metrics.jsonl`` and ``checkpoints/`` go (None: nothing written).
        resume: continue from the newest checkpoint in ``output_dir`` when there is one (it
            must have been written with the same settings, ``max_steps`` and bookkeeping
            aside); ``False`` starts over and deletes that directory's old checkpoints.
        progress: show a tqdm bar (main process only).
        eval_data: validation tokens ``(N,)`` for ``config.eval_every`` (perplexity at the
            training block length, logged as ``val_ppl``).
        run_name: the run's name in the trackers of ``config.report_to``.

    Returns:
        A :class:`TrainResult`.

    Raises:
        TrainingDiverged: the loss, a gradient or a trainable weight became NaN/inf (the
            checkpoints written before stay; every one of them is finite).
        ValueError: an empty dataset, one without a label token, no trainable parameters,
            save_every without a directory, ``output_dir`` in use by another process, or a
            folder loravariants did not make (non-empty, without its marker file).
    """
    with contextlib.ExitStack() as stack:
        return _train(
            model, dataset, config, output_dir, resume, progress, stack, eval_data, run_name
        )


def _check_inputs(dataset, config: TrainConfig, output_dir) -> None:
    if len(dataset) == 0:
        raise ValueError("the training dataset is empty")
    if config.save_every and output_dir is None:
        raise ValueError("save_every > 0 needs an output directory")
    if not any(label_count(torch.as_tensor(dataset[i]["labels"])) for i in range(len(dataset))):
        raise ValueError(
            "the training dataset has no label token (every label is -100 or rows are one token "
            "long): the loss would be 0 and nothing would train"
        )


# The loop reads top to bottom: setup (_set_up, _prepare, _start), the loop (_accumulate the
# micro-batches, _update the weights, _log the step), checkpoint, done.
def _train(
    model, dataset, config, output_dir, resume, progress, stack, eval_data=None, run_name=None
) -> TrainResult:
    _check_inputs(dataset, config, output_dir)
    block_length = int(torch.as_tensor(dataset[0]["input_ids"]).shape[-1])
    tracking.check_eval_data(config, eval_data, block_length)
    out = Path(output_dir) if output_dir is not None else None
    names = adapter_names(model)
    accelerator = _set_up(model, config, out, stack)
    model, optimizer, scheduler, cycle, params = _prepare(model, config, accelerator)
    inner = accelerator.unwrap_model(model)
    restart_lr = any(adapter_config(inner, n).restarts_lr_schedule() for n in names)

    result = TrainResult()
    start_step = _start(
        out, resume, inner, optimizer, scheduler, cycle, result, config, accelerator
    )
    per_step = config.batch_size * accelerator.num_processes * config.grad_accum
    log = _open_metrics(out, start_step, accelerator)  # None: not this process's to write
    tracking.start_trackers(accelerator, config, run_name, stack)  # none without report_to

    model.train()
    bar = tqdm(
        total=config.max_steps,
        initial=start_step,
        desc="train",
        unit="step",
        disable=not (progress and accelerator.is_main_process),
        dynamic_ncols=True,
    )
    t0 = time.perf_counter()
    run_tokens, eval_s = 0, 0.0  # eval_s: validation time, left out of the throughput
    for step in range(start_step, config.max_steps):
        rows = global_rows(len(dataset), config.seed, step * per_step, per_step)
        # the step's loss is the mean over all its label tokens, every process's included
        step_label_tokens = max(label_tokens(dataset, rows), 1)
        lm_total, aux_total, step_tokens = _accumulate(
            model, inner, dataset, rows, step_label_tokens, config, accelerator
        )
        lm_mean = accelerator.reduce(lm_total, reduction="sum").item()
        aux_mean = accelerator.reduce(aux_total, reduction="sum").item()
        _raise_if_diverged(lm_mean, aux_mean, step + 1, out, bar)
        grad_norm = _update(params, optimizer, accelerator, config, step, out, bar)
        reset = on_step_end(inner, step + 1, optimizer)
        advance_schedule(scheduler, cycle, step + 1, bool(reset) and restart_lr)

        tokens = _global_sum(accelerator, step_tokens)
        run_tokens += tokens
        result.tokens += tokens
        result.losses.append(lm_mean)
        result.aux_losses.append(aux_mean)
        result.steps = step + 1
        elapsed = time.perf_counter() - t0
        tps = run_tokens / max(elapsed - eval_s, 1e-9)
        bar.update(1)
        bar.set_postfix(loss=f"{lm_mean:.4f}", tok_s=f"{tps:,.0f}")
        val_ppl, eval_s = _validate(inner, eval_data, block_length, config, step + 1, eval_s)
        line = {"step": step + 1, "loss": lm_mean, "aux_loss": aux_mean}
        line.update(lr=scheduler.get_last_lr()[0], tokens=result.tokens)
        line.update(tokens_per_s=tps, elapsed_s=elapsed, grad_norm=grad_norm)
        _log(line, val_ppl, config, log, accelerator, inner)
        if out is not None and config.save_every and (step + 1) % config.save_every == 0:
            save_checkpoint(
                out, inner, optimizer, scheduler, cycle, result, step + 1, config, accelerator
            )
    bar.close()
    result.wall_time = time.perf_counter() - t0
    result.tokens_per_second = run_tokens / max(result.wall_time - eval_s, 1e-9)
    if config.gradient_checkpointing and hasattr(inner, "gradient_checkpointing_disable"):
        inner.gradient_checkpointing_disable()
    inner.eval()
    accelerator.wait_for_everyone()
    return result


def _set_up(model: nn.Module, config: TrainConfig, out: Path | None, stack) -> Accelerator:
    """Refuse an unsupported variant/strategy pair, seed, and make the accelerator; the run's
    contexts (global-batch statistics, the output folder's lock) enter ``stack``."""
    sparse = any(layer.sparse_gradients for _, layer in _layers(model))
    # refuse a variant/strategy pair before any work (distributed.py)
    strategy = launch_strategy()
    check_supported(model, strategy)
    seed_everything(config.seed)
    accelerator = _accelerator(config, model, sparse, strategy, out)
    # MixLoRA's balance loss and router statistics over the global batch (distributed.py)
    stack.enter_context(statistics_context(accelerator, model))
    if out is not None and accelerator.is_main_process:
        # one writer per folder: a second run there would interleave checkpoints and metrics;
        # and only a folder of ours (a fresh run deletes its checkpoints/)
        stack.enter_context(output_lock(claim_output_dir(out)))
    return accelerator


def _prepare(model: nn.Module, config: TrainConfig, accelerator: Accelerator):
    """The prepared model and optimizer, the schedule, and the trainable parameters as the
    prepared model holds them: ``(model, optimizer, scheduler, cycle, params)``."""
    if config.gradient_checkpointing and hasattr(model, "gradient_checkpointing_enable"):
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    params = [p for _, p in trainable_named_parameters(model)]
    if not params:
        raise ValueError("the model has no trainable parameters; attach an adapter first")
    optimizer, scheduler, cycle = make_optimizer(params, config)
    model, optimizer = accelerator.prepare(model, optimizer)
    # the parameters clipping and the checks see: FSDP2 replaces the ones it shards by
    # DTensors (the trainable ones stay whole, distributed.fsdp_accelerator; read them again
    # all the same). Under DDP these are the same objects.
    params = [p for _, p in trainable_named_parameters(model)]
    return model, optimizer, scheduler, cycle, params


def _open_metrics(out: Path | None, start_step: int, accelerator: Accelerator) -> Path | None:
    """``metrics.jsonl`` cut back to ``start_step`` (a resumed run rewrites what follows), on
    the main process only (one writer); None elsewhere or without an output folder."""
    if out is None or not accelerator.is_main_process:
        return None
    out.mkdir(parents=True, exist_ok=True)
    metrics_file = out / "metrics.jsonl"
    truncate_metrics(metrics_file, start_step)
    return metrics_file


def _global_sum(accelerator: Accelerator, count: int) -> int:
    """``count`` summed over the processes."""
    total = torch.tensor(count, device=accelerator.device)
    return int(accelerator.reduce(total, reduction="sum").item())


def _log(line: dict, val_ppl, config: TrainConfig, log: Path | None, accelerator, inner) -> None:
    """Write the step's ``line`` (to ``metrics.jsonl`` and the trackers) every ``log_every``
    steps, at the last step, and at every validation (``val_ppl`` joins it then)."""
    step = line["step"]
    if step % config.log_every and step != config.max_steps and val_ppl is None:
        return
    line.update({"val_ppl": val_ppl} if val_ppl is not None else {})
    if log is not None:
        _append_json_line(log, line)
    tracking.log_line(accelerator, inner, line)  # a no-op without report_to


def _validate(inner, eval_data, block_length, config, step, eval_s) -> tuple[float | None, float]:
    """``config.eval_every``: the validation perplexity after ``step`` (else None), and the
    validation time so far. Every process computes it (FSDP needs each one's forward)."""
    if not config.eval_every or step % config.eval_every:
        return None, eval_s
    start = time.perf_counter()
    ppl = tracking.validation_perplexity(inner, eval_data, block_length, config.batch_size)
    return ppl, eval_s + time.perf_counter() - start


def _raise_if_diverged(lm_mean: float, aux_mean: float, step: int, out, bar) -> None:
    """Stop on a non-finite loss (after step ``step``), naming the last checkpoint to resume."""
    if math.isfinite(lm_mean) and math.isfinite(aux_mean):
        return
    bar.close()
    where = last_good_checkpoint(out) if out is not None else None
    raise TrainingDiverged(
        f"loss became {lm_mean} at step {step}; stopped. "
        + (f"Last good checkpoint: {where}" if where else "No checkpoint was written.")
    )


def _append_json_line(path: Path, line: dict) -> None:
    """One metrics line (``metrics.jsonl``)."""
    # O_NOFOLLOW: a link planted at metrics.jsonl must not send the line elsewhere
    flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0)
    with os.fdopen(os.open(path, flags, 0o666), "a") as f:
        f.write(json.dumps(line) + "\n")


def _start(out, resume, inner, optimizer, scheduler, cycle, result, config, accelerator) -> int:
    """The step to start from: the last checkpoint's with ``resume`` (model, optimizer,
    schedule, RNG and result restored), else 0 with the folder's old checkpoints removed."""
    world, rank = accelerator.num_processes, accelerator.process_index
    start_step = 0
    if out is not None and accelerator.is_main_process:
        clean_checkpoint_leftovers(out)
    accelerator.wait_for_everyone()
    if out is not None and resume:
        start_step = resume_checkpoint(
            out, inner, optimizer, scheduler, cycle, result, rank, config, world, accelerator
        )
        result.resumed_from = start_step or None
        result.steps = start_step
    elif out is not None and accelerator.is_main_process:
        # a fresh run: an older run's checkpoints would otherwise outlive ours in the rotation
        # and be what the next resume picks up
        shutil.rmtree(checkpoint_dir(out), ignore_errors=True)
    accelerator.wait_for_everyone()
    return start_step


def _update(params, optimizer, accelerator, config, step, out, bar) -> float:
    """Clip, step and clear the gradients, refusing non-finite gradients or weights.
    Returns the gradient norm before clipping."""
    if accelerator.is_fsdp2:
        average_replicated_gradients(accelerator, params)
    if config.max_grad_norm > 0:
        grad_norm = accelerator.clip_grad_norm_(params, config.max_grad_norm)
    else:
        grad_norm = torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None])
    # a NaN gradient can come with a finite loss, and a finite update can overflow the
    # weights (lr=1e6): neither may reach a checkpoint
    _check_finite(params, "gradient", step, out, bar, grads=True)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    _check_finite(params, "trainable weight", step, out, bar)
    if hasattr(grad_norm, "full_tensor"):  # a DTensor under FSDP2
        grad_norm = grad_norm.full_tensor()
    return float(grad_norm)


def _accumulate(model, inner, dataset, rows, step_label_tokens, config, accelerator):
    """Forward and backward of one optimizer step's micro-batches (this process's share of
    ``rows``); gradients accumulate. Returns ``(lm loss, aux loss, label tokens)`` of the
    step on this process, the losses as 0-d tensors."""
    world, rank = accelerator.num_processes, accelerator.process_index
    micro_rows = config.batch_size * world  # rows per micro-batch over all processes
    lm_total = torch.zeros((), device=accelerator.device)
    aux_total = torch.zeros((), device=accelerator.device)
    step_tokens = 0
    for micro in range(config.grad_accum):
        chunk = rows[micro * micro_rows : (micro + 1) * micro_rows]
        batch = collate(dataset, chunk[rank * config.batch_size : (rank + 1) * config.batch_size])
        batch = {k: v.to(accelerator.device) for k, v in batch.items()}
        n_micro = label_count(batch["labels"])
        step_tokens += n_micro
        last = micro == config.grad_accum - 1
        # Gradient all-reduce only on the last micro-batch: the others accumulate locally.
        sync = accelerator.no_sync(model) if (world > 1 and not last) else _null()
        with sync, accelerator.autocast():
            output = model(**batch)
            lm_part = token_share(output.loss, output.logits, n_micro, step_label_tokens)
            aux = adapters_aux_loss(inner).to(lm_part.device)
            # DDP averages gradients over processes: hence the factor `world` (the aux
            # loss is this process's share of the global one, see distributed.py)
            accelerator.backward((lm_part + aux / config.grad_accum) * world)
        lm_total += lm_part.detach()
        aux_total += aux.detach() / config.grad_accum
    return lm_total, aux_total, step_tokens


def _check_finite(params, what: str, step: int, out: Path | None, bar, grads: bool = False):
    tensors = [p.grad for p in params if p.grad is not None] if grads else list(params)
    if not tensors:
        return
    if grads:
        bad = torch.stack([~torch.isfinite(t).all() for t in tensors]).any()
    else:  # a finite weight can be dead too: one whose square overflows (checkpoint.overflows)
        norms = [torch.linalg.vector_norm(t.detach(), dtype=torch.float32) for t in tensors]
        bad = ~torch.isfinite(torch.stack(norms)).all()
    if bool(bad):
        bar.close()
        where = last_good_checkpoint(out) if out is not None else None
        too_large = "" if grads else " (or too large to square in float32)"
        raise TrainingDiverged(
            f"a {what} became NaN or infinite{too_large} at step {step + 1}; stopped before it "
            "was saved. "
            + (f"Last good checkpoint: {where}" if where else "No checkpoint was written.")
        )


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def _layers(model: nn.Module):
    return [(p, layer) for p, _, layer in iter_adapters(model)]
