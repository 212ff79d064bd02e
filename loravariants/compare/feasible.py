"""Can this machine run the experiment at all? Checked when ``compare`` (``train``, ``eval``,
``pretrain-base``) starts, before the base model, the data or any folder exists.

::

    base shape   built-in BaseModelConfig, or a local folder's config.json (no weights read)
      -> memory  a lower bound in bytes of what one step needs: the weights, one training
                 micro-batch (logits + the residual stream kept for backward), one evaluation
                 window, the built-in base's own pretraining; refused above the machine's
                 RAM (or its largest GPU), naming the keys that ask for it
      -> rows    each trained row's adapter attached to a shape-only (meta) copy of the base:
                 a target_modules that matches nothing and an unreachable match_params are
                 config errors, not failed runs

A hub name (or a packaged real model not converted yet) has no local shape: only what the
config says alone is checked then, the rest when the model is loaded (still before any folder
is created).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

__all__ = ["check_feasible", "machine_memory", "memory_lower_bound"]

# bytes per value of the lower bound: bf16, the smallest the loop ever computes in
_BYTES = 2


def _shape(config: Any):
    """The base model's transformers config without its weights, or None when unknown here."""
    builtin = config.builtin_base()
    if builtin is not None:
        return builtin.llama_config()
    local = Path(config.base_model).expanduser()
    if (local / "config.json").is_file():
        from transformers import AutoConfig

        try:
            return AutoConfig.from_pretrained(local)
        except (OSError, ValueError):
            return None  # the load reports it, naming the file
    return None


def machine_memory() -> int:
    """Bytes of the largest memory a run can use: physical RAM or the largest GPU."""
    try:
        ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):
        ram = 0
    gpu = 0
    if torch.cuda.is_available():
        gpu = max(
            torch.cuda.get_device_properties(i).total_memory
            for i in range(torch.cuda.device_count())
        )
    return max(ram, gpu) or 1 << 62  # unknown: no bound


def _param_count(shape) -> int:
    h, vocab = int(shape.hidden_size), int(shape.vocab_size)
    heads = int(shape.num_attention_heads)
    kv = int(getattr(shape, "num_key_value_heads", None) or heads)
    inter = int(getattr(shape, "intermediate_size", 4 * h))
    head_dim = int(getattr(shape, "head_dim", None) or h // heads)
    per_layer = 2 * h * heads * head_dim + 2 * h * kv * head_dim + 3 * h * inter
    embeddings = vocab * h * (1 if getattr(shape, "tie_word_embeddings", False) else 2)
    return embeddings + int(shape.num_hidden_layers) * per_layer


def memory_lower_bound(config: Any, shape) -> dict[str, int]:
    """Bytes each part of the experiment needs at least, by the keys that set it.

    Returns:
        ``{what (the keys to lower): bytes}``; the weights are needed beside every other part.
    """
    h, vocab, layers = int(shape.hidden_size), int(shape.vocab_size), int(shape.num_hidden_layers)
    native = int(shape.max_position_embeddings)
    context = config.context.target_length or native
    batch = config.train.batch_size
    # logits of every position and the residual stream of every layer, for one micro-batch
    train = batch * context * (vocab + h * layers) * _BYTES
    lengths = config.eval.lengths or [context]
    window = max(lengths) * (vocab + h * layers) * _BYTES
    parts = {
        "the base's weights (base_model / base_model_config)": _param_count(shape) * _BYTES,
        "one training micro-batch (train.batch_size x context.target_length)": train,
        "one evaluation window (eval.lengths / context.target_length)": window,
    }
    builtin = config.builtin_base()
    if builtin is not None:  # built (pretrained) on first use
        pretrain = builtin.batch_size * builtin.context_length * (vocab + h * layers) * _BYTES
        parts["pretraining the built-in base (base_model_config.batch_size x context_length)"] = (
            pretrain
        )
    return parts


def _gib(n: int) -> str:
    return f"{n / 2**30:,.1f} GiB"


def check_feasible(config: Any, rows: bool = True) -> None:
    """Refuse, in one line, an experiment this machine cannot hold or whose rows cannot be
    built; reads no weights and writes nothing.

    Args:
        config: the :class:`~loravariants.config.ExperimentConfig`.
        rows: also attach every trained row's adapter to a meta copy of the base.

    Raises:
        ValueError: naming the keys (or the row) and what they ask for.
    """
    shape = _shape(config)
    if shape is None:
        return
    parts = memory_lower_bound(config, shape)
    weights_key = next(iter(parts))
    weights = parts[weights_key]
    what, largest = max(((k, v) for k, v in parts.items() if k != weights_key), key=lambda x: x[1])
    have = machine_memory()
    if weights + largest > have:
        culprit = what if largest >= weights else weights_key
        raise ValueError(
            f"{culprit}: at least {_gib(weights + largest)} of memory needed ({_gib(largest)} "
            f"for {what.split(' (')[0]}, {_gib(weights)} for the weights), more than this "
            f"machine's {_gib(have)}; lower it"
        )
    if rows:
        _check_rows(config, shape)


def _meta_model(shape):
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(shape)


def _check_rows(config: Any, shape) -> None:
    """Every trained row's adapter on a shape-only base: its targets exist, its rank can be
    matched to ``match_params``."""
    from ..config import load_adapter_spec
    from ..inject import attach
    from .plan import MATCH_TOLERANCE, match_rank

    tolerance = config.match_params_tolerance
    for row in config.runs:
        if not row.has_adapter:  # untrained, or full fine-tuning: no adapter to build
            continue
        overrides = config.adapter_overrides(row)
        try:
            if config.match_params:
                overrides, _ = match_rank(
                    lambda: _meta_model(shape),
                    row.adapter,
                    overrides,
                    config.match_params,
                    config.spec_dir,
                    tolerance=MATCH_TOLERANCE if tolerance is None else tolerance,
                )
            attach(_meta_model(shape), load_adapter_spec(row.adapter, overrides, config.spec_dir))
        except ValueError as e:
            raise ValueError(f"runs[{row.name}]: {e}") from None
        except (NotImplementedError, RuntimeError, TypeError):
            pass  # a variant that cannot be built on meta tensors: its run reports it
