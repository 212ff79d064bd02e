"""How one row trains under issue 25's protocol: its learning rate, its training length and
batch (``train_length: native``), and full fine-tuning (``trainable: [all]``).

The comparison's run loop (``run.py``) and the learning-rate selection (``lr_select.py``) both
build a row's training from these, so a selection run trains exactly as the row will.

``train_length: native`` -- the same tokens at the base's native length, without position
interpolation (LongLoRA's "more in-domain training" control)::

    target row : batch b  x  target tokens          = b * target tokens per step
    native row : batch b * (target / native)  x  native tokens = the same per step
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import AutoModelForCausalLM

from ..config import ExperimentConfig, RunSpec
from ..train import TrainConfig

__all__ = [
    "batch_scale",
    "row_train_config",
    "mark_full_finetune",
    "save_full_model",
    "load_full_model",
    "FULL_MODEL_DIR",
]

#: where a full fine-tuning run keeps its weights (``runs/<row>/seed<s>/model``)
FULL_MODEL_DIR = "model"


def batch_scale(config: ExperimentConfig, row: RunSpec, native: int) -> int:
    """How many native-length rows one target-length row's tokens make (1 unless the row
    trains with ``train_length: native`` on a base shorter than the target).

    Raises:
        ValueError: the target length is not a multiple of the native one (no batch matches
            the tokens exactly).
    """
    target = config.context.target_length
    if row.train_length != "native" or not target or target <= native:
        return 1
    if target % native:
        raise ValueError(
            f"runs[{row.name}].train_length: native needs context.target_length ({target}) "
            f"to be a multiple of the base's native context ({native}), so the tokens per "
            "step match"
        )
    return target // native


def row_train_config(
    config: ExperimentConfig,
    row: RunSpec,
    seed: int,
    native: int,
    lr: float,
    max_steps: int | None = None,
) -> TrainConfig:
    """The row's :class:`TrainConfig`: the experiment's, at this seed and rate, with its
    batch scaled for ``train_length: native`` (the same tokens per optimizer step).

    Args:
        config: the experiment.
        row: the trained row.
        seed: the run's seed.
        native: the base's native context.
        lr: the learning rate (the row's, the selection's, or ``train.lr``).
        max_steps: a shorter budget (the learning-rate selection); None: ``train.max_steps``.
    """
    fields: dict[str, Any] = {**asdict(config.train), "seed": seed, "lr": lr}
    fields["batch_size"] = config.train.batch_size * batch_scale(config, row, native)
    if max_steps is not None:
        fields["max_steps"] = max_steps
        fields["warmup_steps"] = min(config.train.warmup_steps, max_steps)
    return TrainConfig(**fields)


def mark_full_finetune(model: nn.Module) -> int:
    """Every parameter of the base trains (``trainable: [all]``). Returns their count (each
    shared tensor once)."""
    unique = {id(p): p for p in model.parameters()}  # tied embeddings counted once
    for p in unique.values():
        p.requires_grad_(True)
    return sum(p.numel() for p in unique.values())


def save_full_model(model: nn.Module, run_dir: Path) -> Path:
    """A full fine-tuning run's weights (it has no adapter to save): ``run_dir/model``."""
    folder = run_dir / FULL_MODEL_DIR
    model.save_pretrained(folder)
    return folder


def load_full_model(run_dir: Path) -> nn.Module:
    """The weights :func:`save_full_model` wrote, with their context extension (fp32)."""
    return AutoModelForCausalLM.from_pretrained(run_dir / FULL_MODEL_DIR, dtype=torch.float32)
