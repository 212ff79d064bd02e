"""The one training loop every variant shares.

    setup  -> seed, accelerator, optimizer over adapter (+ marked) parameters, LR schedule
    loop   -> micro-batches (grad accumulation) -> loss = LM loss + lv.aux_loss(model)
              -> clip, step -> lv.on_step_end (COLA restarts reset their Adam state)
              -> log (tqdm + metrics.jsonl) -> checkpoint every N steps
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
import pickle
import random
import shutil
import time
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from .adapters.base import check_range
from .distributed import check_supported, launch_strategy, statistics_context
from .inject import adapter_config, adapter_names, on_step_end
from .inject import aux_loss as adapters_aux_loss
from .utils import atomic_directory, make_dirs, output_lock, recover_folder

__all__ = ["TrainConfig", "TrainResult", "TrainingDiverged", "train", "lr_factor"]

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
        check_range("seed", self.seed, low=0, integer=True)
        check_range("save_every", self.save_every, low=0, integer=True)
        check_range("keep_last", self.keep_last, low=1, integer=True)
        check_range("log_every", self.log_every, low=1, integer=True)


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


class TrainingDiverged(ValueError):
    """The loss, a gradient or a trainable weight became NaN or infinite; the checkpoints
    written before (all finite) are kept."""


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


def _collate(dataset, rows: Sequence[int]) -> dict[str, torch.Tensor]:
    items = [dataset[i] for i in rows]
    return {k: torch.stack([torch.as_tensor(it[k]) for it in items]) for k in items[0]}


def _accelerator(config: TrainConfig, has_sparse_layers: bool):
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
    return Accelerator(
        mixed_precision=precision, kwargs_handlers=handlers, cpu=not torch.cuda.is_available()
    )


def trainable_named_parameters(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


def train(
    model: nn.Module,
    dataset: Any,
    config: TrainConfig,
    output_dir: str | os.PathLike | None = None,
    resume: bool = True,
    progress: bool = True,
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

    Returns:
        A :class:`TrainResult`.

    Raises:
        TrainingDiverged: the loss, a gradient or a trainable weight became NaN/inf (the
            checkpoints written before stay; every one of them is finite).
        ValueError: an empty dataset, one without a label token, no trainable parameters,
            save_every without a directory, or ``output_dir`` in use by another process.
    """
    with contextlib.ExitStack() as stack:
        return _train(model, dataset, config, output_dir, resume, progress, stack)


def _train(model, dataset, config, output_dir, resume, progress, stack) -> TrainResult:
    if len(dataset) == 0:
        raise ValueError("the training dataset is empty")
    if config.save_every and output_dir is None:
        raise ValueError("save_every > 0 needs an output directory")
    if not any(label_count(torch.as_tensor(dataset[i]["labels"])) for i in range(len(dataset))):
        raise ValueError(
            "the training dataset has no label token (every label is -100 or rows are one token "
            "long): the loss would be 0 and nothing would train"
        )
    names = adapter_names(model)
    sparse = any(not layer.mergeable for _, layer in _layers(model))
    # issue 17: refuse a variant/strategy pair before any work (distributed.py)
    check_supported(model, launch_strategy())
    seed_everything(config.seed)
    accelerator = _accelerator(config, sparse)
    world, rank = accelerator.num_processes, accelerator.process_index
    # issue 17: MixLoRA's balance loss and router statistics over the global batch
    stack.enter_context(statistics_context(accelerator))
    out = Path(output_dir) if output_dir is not None else None
    if out is not None and accelerator.is_main_process:
        # one writer per folder: a second run there would interleave checkpoints and metrics
        stack.enter_context(output_lock(make_dirs(out)))

    if config.gradient_checkpointing and hasattr(model, "gradient_checkpointing_enable"):
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    params = [p for _, p in trainable_named_parameters(model)]
    if not params:
        raise ValueError("the model has no trainable parameters; attach an adapter first")
    optimizer = torch.optim.AdamW(
        params, lr=config.lr, betas=config.betas, weight_decay=config.weight_decay
    )
    cycle = {"start": 0}  # the LR schedule restarts here (COLA with restart_lr_schedule)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda s: lr_factor(
            s - cycle["start"],
            config.warmup_steps,
            config.max_steps - cycle["start"],
            config.schedule,
        ),
    )
    model, optimizer = accelerator.prepare(model, optimizer)
    inner = accelerator.unwrap_model(model)
    restart_lr = any(getattr(adapter_config(inner, n), "restart_lr_schedule", False) for n in names)

    result = TrainResult()
    start_step = 0
    if out is not None and accelerator.is_main_process:
        _clean_checkpoint_leftovers(out)
    accelerator.wait_for_everyone()
    if out is not None and resume:
        start_step = _resume(
            out, inner, optimizer, scheduler, cycle, result, rank, config, world, accelerator
        )
        result.resumed_from = start_step or None
        result.steps = start_step
    elif out is not None and accelerator.is_main_process:
        # a fresh run: an older run's checkpoints would otherwise outlive ours in the rotation
        # and be what the next resume picks up
        shutil.rmtree(_checkpoint_dir(out), ignore_errors=True)
    accelerator.wait_for_everyone()

    micro_rows = config.batch_size * world  # rows per micro-batch over all processes
    per_step = micro_rows * config.grad_accum
    metrics_file = out / "metrics.jsonl" if out is not None else None
    if metrics_file is not None and accelerator.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        _truncate_metrics(metrics_file, start_step)

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
    run_tokens = 0
    for step in range(start_step, config.max_steps):
        rows = global_rows(len(dataset), config.seed, step * per_step, per_step)
        # the step's loss is the mean over all its label tokens, every process's included
        step_label_tokens = max(label_tokens(dataset, rows), 1)
        lm_total = torch.zeros((), device=accelerator.device)
        aux_total = torch.zeros((), device=accelerator.device)
        step_tokens = 0
        for micro in range(config.grad_accum):
            chunk = rows[micro * micro_rows : (micro + 1) * micro_rows]
            batch = _collate(
                dataset, chunk[rank * config.batch_size : (rank + 1) * config.batch_size]
            )
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
        lm_mean = accelerator.reduce(lm_total, reduction="sum").item()
        aux_mean = accelerator.reduce(aux_total, reduction="sum").item()
        if not math.isfinite(lm_mean) or not math.isfinite(aux_mean):
            bar.close()
            where = _latest_checkpoint(out) if out is not None else None
            raise TrainingDiverged(
                f"loss became {lm_mean} at step {step + 1}; stopped. "
                + (f"Last good checkpoint: {where}" if where else "No checkpoint was written.")
            )
        if config.max_grad_norm > 0:
            accelerator.clip_grad_norm_(params, config.max_grad_norm)
        # a NaN gradient can come with a finite loss, and a finite update can overflow the
        # weights (lr=1e6): neither may reach a checkpoint
        _check_finite(params, "gradient", step, out, bar, grads=True)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        _check_finite(params, "trainable weight", step, out, bar)
        reset = on_step_end(inner, step + 1, optimizer)
        if reset and restart_lr:
            cycle["start"] = step + 1
        # after the hooks: a COLA restart at this step must set the next step's LR already
        scheduler.step()

        tokens = int(
            accelerator.reduce(
                torch.tensor(step_tokens, device=accelerator.device), reduction="sum"
            ).item()
        )
        run_tokens += tokens
        result.tokens += tokens
        result.losses.append(lm_mean)
        result.aux_losses.append(aux_mean)
        result.steps = step + 1
        elapsed = time.perf_counter() - t0
        tps = run_tokens / max(elapsed, 1e-9)
        bar.update(1)
        bar.set_postfix(loss=f"{lm_mean:.4f}", tok_s=f"{tps:,.0f}")
        if (
            metrics_file is not None
            and accelerator.is_main_process
            and ((step + 1) % config.log_every == 0 or step + 1 == config.max_steps)
        ):
            line = {
                "step": step + 1,
                "loss": lm_mean,
                "aux_loss": aux_mean,
                "lr": scheduler.get_last_lr()[0],
                "tokens": result.tokens,
                "tokens_per_s": tps,
                "elapsed_s": elapsed,
            }
            with metrics_file.open("a") as f:
                f.write(json.dumps(line) + "\n")
        if out is not None and config.save_every and (step + 1) % config.save_every == 0:
            _save_checkpoint(
                out, inner, optimizer, scheduler, cycle, result, step + 1, config, accelerator
            )
    bar.close()
    result.wall_time = time.perf_counter() - t0
    result.tokens_per_second = run_tokens / max(result.wall_time, 1e-9)
    if config.gradient_checkpointing and hasattr(inner, "gradient_checkpointing_disable"):
        inner.gradient_checkpointing_disable()
    inner.eval()
    accelerator.wait_for_everyone()
    return result


def _check_finite(params, what: str, step: int, out: Path | None, bar, grads: bool = False):
    tensors = [p.grad for p in params if p.grad is not None] if grads else list(params)
    if not tensors:
        return
    bad = torch.stack([~torch.isfinite(t).all() for t in tensors]).any()
    if bool(bad):
        bar.close()
        where = _latest_checkpoint(out) if out is not None else None
        raise TrainingDiverged(
            f"a {what} became NaN or infinite at step {step + 1}; stopped before it was "
            "saved. "
            + (f"Last good checkpoint: {where}" if where else "No checkpoint was written.")
        )


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def _layers(model: nn.Module):
    from .inject import iter_adapters

    return [(p, layer) for p, _, layer in iter_adapters(model)]


# ---------------------------------------------------------------------------------------------
# checkpoints: adapters (native format, so variant hooks restore e.g. COLA's folded links),
# optimizer, scheduler, RNG, losses so far. Written atomically; the newest K kept.
# ---------------------------------------------------------------------------------------------


def _checkpoint_dir(out: Path) -> Path:
    return out / "checkpoints"


def _checkpoints(out: Path) -> list[Path]:
    """Finished checkpoints (``step-*`` holding ``trainer_state.pt``), oldest first."""
    root = _checkpoint_dir(out)
    if not root.is_dir():
        return []
    return sorted(p for p in root.glob("step-*") if (p / "trainer_state.pt").is_file())


def _latest_checkpoint(out: Path) -> Path | None:
    done = _checkpoints(out)
    return done[-1] if done else None


def _clean_checkpoint_leftovers(out: Path) -> None:
    """Folders a killed run left in ``checkpoints/``: unfinished ``.step-*.tmp-*`` (and any
    ``.old-*``) of dead processes, and the per-step ``.rng-*`` staging folders."""
    root = _checkpoint_dir(out)
    if not root.is_dir():
        return
    recover_folder(root)
    for p in root.glob(".rng-*"):
        shutil.rmtree(p, ignore_errors=True)


def load_checkpoint_file(file: Path) -> Any:
    """``torch.load(weights_only=True)`` with errors that name the file and say why.

    Raises:
        ValueError: a truncated or corrupt file, or a pickle holding more than tensors and
            plain data (refused unread: loading it could run arbitrary code).
    """
    try:
        return torch.load(file, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(
            f"{file}: refused to load: it holds Python objects other than tensors and plain "
            f"data, which could run code when unpickled (weights_only=True; {first})"
        ) from e
    except (OSError, RuntimeError, EOFError, ValueError) as e:
        raise ValueError(f"{file}: truncated or corrupt checkpoint file ({e})") from e


def _rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: Mapping[str, Any]) -> None:
    random.setstate(_as_tuple(state["python"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _as_tuple(x):
    return tuple(_as_tuple(i) for i in x) if isinstance(x, (list, tuple)) else x


def _save_checkpoint(out, model, optimizer, scheduler, cycle, result, step, config, accelerator):
    from .io import save_adapter

    for n, p in trainable_named_parameters(model):  # the loop checks each step; never save one
        if not bool(torch.isfinite(p).all()):
            raise TrainingDiverged(f"{n} is not finite at step {step}; checkpoint not written")
    rank = accelerator.process_index
    target = _checkpoint_dir(out) / f"step-{step:07d}"
    # every rank writes its own RNG state; the main process writes the rest
    rng_dir = _checkpoint_dir(out) / f".rng-{step:07d}"
    rng_dir.mkdir(parents=True, exist_ok=True)
    torch.save(_rng_state(), rng_dir / f"rng-{rank}.pt")
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        with atomic_directory(target) as tmp:
            for name in adapter_names(model):
                save_adapter(model, tmp / "adapters" / name, format="native", name=name)
            torch.save(
                {
                    "step": step,
                    "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(),
                    "cycle_start": cycle["start"],
                    "losses": result.losses,
                    "aux_losses": result.aux_losses,
                    "tokens": result.tokens,
                    "config": asdict(config),
                    "world": accelerator.num_processes,
                    # fp16's loss scale: without it a resumed fp16 run scales differently
                    "scaler": _scaler_state(accelerator),
                },
                tmp / "trainer_state.pt",
            )
            for f in rng_dir.iterdir():
                shutil.copy(f, tmp / f.name)
        shutil.rmtree(rng_dir, ignore_errors=True)
        done = sorted(p for p in _checkpoint_dir(out).glob("step-*"))
        for old in done[: -config.keep_last]:
            shutil.rmtree(old, ignore_errors=True)
        recover_folder(_checkpoint_dir(out))  # e.g. a swapped-out old step folder
    accelerator.wait_for_everyone()


# may change between a run and its resumption (a longer budget, other bookkeeping)
_RESUMABLE_CHANGES = {"max_steps", "save_every", "keep_last", "log_every"}


def _scaler_state(accelerator) -> dict[str, Any] | None:
    scaler = getattr(accelerator, "scaler", None)
    return scaler.state_dict() if scaler is not None else None


def _readable_checkpoint(out: Path) -> tuple[Path, dict[str, Any]] | tuple[None, None]:
    """The newest checkpoint whose trainer state reads; a broken one (a disk that lost the
    file's end) is skipped with a warning naming it."""
    for ckpt in reversed(_checkpoints(out)):
        try:
            return ckpt, load_checkpoint_file(ckpt / "trainer_state.pt")
        except ValueError as e:
            if "refused to load" in str(e):
                raise  # not an accident: do not fall back silently past a tampered file
            warnings.warn(f"{e}; resuming from the checkpoint before it", stacklevel=3)
    return None, None


def _resume(
    out, model, optimizer, scheduler, cycle, result, rank, config, world, accelerator
) -> int:
    from .io import load_adapter

    ckpt, state = _readable_checkpoint(out)
    if ckpt is None:
        return 0
    saved = {**state.get("config", {}), "processes": state.get("world", world)}
    now = {**asdict(config), "processes": world}
    differ = [
        f"{k}: {_plain(saved.get(k))} -> {_plain(v)}"
        for k, v in now.items()
        if k not in _RESUMABLE_CHANGES and _plain(saved.get(k)) != _plain(v)
    ]
    if differ:
        raise ValueError(
            f"{ckpt}: cannot resume, the run was started with other settings "
            f"({'; '.join(differ)}); use another output directory, or resume=False to start "
            "over (deletes its checkpoints)"
        )
    for name in adapter_names(model):
        load_adapter(model, ckpt / "adapters" / name, name=name)
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    cycle["start"] = state["cycle_start"]
    result.losses = list(state["losses"])
    result.aux_losses = list(state["aux_losses"])
    result.tokens = int(state["tokens"])
    scaler = getattr(accelerator, "scaler", None)
    if scaler is not None and state.get("scaler"):
        scaler.load_state_dict(state["scaler"])
    rng_file = ckpt / f"rng-{rank}.pt"
    if rng_file.is_file():
        _set_rng_state(load_checkpoint_file(rng_file))
    return int(state["step"])


def _plain(value):
    return list(value) if isinstance(value, tuple) else value


def _truncate_metrics(file: Path, keep_until_step: int) -> None:
    """Drop metric lines past the resumed step (they belong to the run that was cut off).

    A cut last line (a kill, a full disk, a power loss mid-write) is dropped too; a broken
    line before the end is an error naming the file and line. Rewritten atomically.

    Raises:
        ValueError: a line other than the last is not JSON.
    """
    if not file.is_file():
        return
    text = file.read_text(errors="replace")
    lines = text.splitlines()
    kept = []
    for i, ln in enumerate(lines):
        if not ln.strip():
            continue
        try:
            record = json.loads(ln)
        except json.JSONDecodeError as e:
            if i == len(lines) - 1:
                break  # the partial line of a cut-off write
            raise ValueError(f"{file}, line {i + 1}: not a JSON metrics line ({e})") from e
        if isinstance(record, dict) and record.get("step", 0) <= keep_until_step:
            kept.append(ln)
    tmp = file.with_name(file.name + ".tmp")
    tmp.write_text("".join(ln + "\n" for ln in kept))
    os.replace(tmp, file)
