"""Training checkpoints: adapters (native format, so variant hooks restore e.g. COLA's folded
links), optimizer, scheduler, RNG and the losses so far. Written atomically; the newest K kept;
a resumed run must have been started with the same settings.
"""

from __future__ import annotations

import io
import json
import pickle
import random
import shutil
import warnings
from collections.abc import Mapping
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from .inject import adapter_names
from .io import load_adapter, save_adapter
from .io.common import WEIGHTS
from .utils import atomic_directory, atomic_write, config_differences, recover_folder

__all__ = [
    "TrainingDiverged",
    "checkpoint_problem",
    "last_good_checkpoint",
    "load_checkpoint_file",
    "overflows",
    "resume_checkpoint",
    "save_checkpoint",
]


class TrainingDiverged(ValueError):
    """The loss, a gradient or a trainable weight became NaN or infinite; the checkpoints
    written before (all finite) are kept."""


def checkpoint_dir(out: Path) -> Path:
    return out / "checkpoints"


def _checkpoints(out: Path) -> list[Path]:
    """Finished checkpoints (``step-*`` holding ``trainer_state.pt``), oldest first."""
    root = checkpoint_dir(out)
    if not root.is_dir():
        return []
    return sorted(p for p in root.glob("step-*") if (p / "trainer_state.pt").is_file())


def latest_checkpoint(out: Path) -> Path | None:
    done = _checkpoints(out)
    return done[-1] if done else None


def clean_checkpoint_leftovers(out: Path) -> None:
    """Folders a killed run left in ``checkpoints/``: unfinished ``.step-*.tmp-*`` (and any
    ``.old-*``) of dead processes, and the per-step ``.rng-*`` staging folders."""
    root = checkpoint_dir(out)
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


def overflows(tensor: torch.Tensor) -> bool:
    """NaN, ±inf, or so large that its squared norm overflows float32 (an entry above about
    1.8e19).

    A weight that large is finite but dead: the next RMSNorm squares the activations it
    makes, gets inf, multiplies them by ``rsqrt(inf) = 0``, and the model outputs uniform
    logits with a finite loss (``ln(vocab)``) and gradients of exactly 0 from then on: what
    ``lr=1e30`` does in one Adam step. One reduction covers all three cases.
    """
    norm = torch.linalg.vector_norm(tensor.detach(), dtype=torch.float32)
    return not bool(torch.isfinite(norm))


def checkpoint_problem(ckpt: Path, state: Mapping[str, Any]) -> str | None:
    """The first tensor of a checkpoint that is not finite (or does not read), or None.

    Read from the files before anything is loaded into the model: the adapters' weights
    (:func:`overflows`) and the optimizer's state. A checkpoint is checked when written, and
    again when read: a disk, a copy or a hand can change it in between.
    """
    for file in sorted((ckpt / "adapters").glob(f"*/{WEIGHTS}")):
        try:
            with safe_open(str(file), framework="pt") as f:
                for key in f.keys():
                    if overflows(f.get_tensor(key)):
                        return f"{file}: tensor {key!r} is NaN, infinite or too large"
        except Exception as e:  # safetensors' own error type: a cut or overwritten file
            return f"{file}: unreadable ({type(e).__name__})"
    optimizer = state.get("optimizer") if isinstance(state, Mapping) else None
    for index, slots in ((optimizer or {}).get("state") or {}).items():
        for name, value in (slots or {}).items():
            if isinstance(value, torch.Tensor) and not bool(torch.isfinite(value).all()):
                return f"{ckpt / 'trainer_state.pt'}: optimizer state {index}.{name} is not finite"
    return None


def last_good_checkpoint(out: Path) -> Path | None:
    """The newest checkpoint that reads and holds finite tensors only (what a resume would
    start from), or None; named by :class:`TrainingDiverged`."""
    for ckpt in reversed(_checkpoints(out)):
        try:
            state = load_checkpoint_file(ckpt / "trainer_state.pt")
        except ValueError:
            continue
        if checkpoint_problem(ckpt, state) is None:
            return ckpt
    return None


def save_checkpoint(out, model, optimizer, scheduler, cycle, result, step, config, accelerator):
    # the loop checks every step already; a checkpoint must never hold a non-finite weight
    for n, p in model.named_parameters():
        if p.requires_grad and overflows(p):
            raise TrainingDiverged(f"{n} is not finite at step {step}; checkpoint not written")
    rank = accelerator.process_index
    target = checkpoint_dir(out) / f"step-{step:07d}"
    # every rank writes its own RNG state; the main process writes the rest
    rng_dir = checkpoint_dir(out) / f".rng-{step:07d}"
    rng_dir.mkdir(parents=True, exist_ok=True)
    rng = io.BytesIO()
    torch.save(_rng_state(), rng)
    atomic_write(rng_dir / f"rng-{rank}.pt", rng.getvalue())  # never through a planted link
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
        done = sorted(p for p in checkpoint_dir(out).glob("step-*"))
        for old in done[: -config.keep_last]:
            shutil.rmtree(old, ignore_errors=True)
        recover_folder(checkpoint_dir(out))  # e.g. a swapped-out old step folder
    accelerator.wait_for_everyone()


# may change between a run and its resumption (a longer budget, other bookkeeping: how often
# to save, log and validate, and which trackers the lines go to)
_RESUMABLE_CHANGES = {"max_steps", "save_every", "keep_last", "log_every", "report_to"}
_RESUMABLE_CHANGES |= {"eval_every"}


def _scaler_state(accelerator) -> dict[str, Any] | None:
    scaler = getattr(accelerator, "scaler", None)
    return scaler.state_dict() if scaler is not None else None


def _readable_checkpoint(out: Path) -> tuple[Path, dict[str, Any]] | tuple[None, None]:
    """The newest checkpoint whose trainer state reads and whose tensors are finite; a broken
    one (a disk that lost the file's end, a NaN written into it) is skipped with a warning
    naming the file (and the tensor)."""
    for ckpt in reversed(_checkpoints(out)):
        try:
            state = load_checkpoint_file(ckpt / "trainer_state.pt")
        except ValueError as e:
            if "refused to load" in str(e):
                raise  # not an accident: do not fall back silently past a tampered file
            warnings.warn(f"{e}; resuming from the checkpoint before it", stacklevel=3)
            continue
        problem = checkpoint_problem(ckpt, state)
        if problem is None:
            return ckpt, state
        # never resumed (nor exported, nor recorded "ok" by compare): the one before it is
        warnings.warn(f"{problem}; resuming from the checkpoint before it", stacklevel=3)
    return None, None


def resume_checkpoint(
    out, model, optimizer, scheduler, cycle, result, rank, config, world, accelerator
) -> int:
    ckpt, state = _readable_checkpoint(out)
    if ckpt is None:
        return 0
    saved = {**state.get("config", {}), "processes": state.get("world", world)}
    now = {**asdict(config), "processes": world}
    differ = config_differences(saved, now, _RESUMABLE_CHANGES, normalize=_plain)
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


def truncate_metrics(file: Path, keep_until_step: int) -> None:
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
    atomic_write(file, "".join(ln + "\n" for ln in kept))
