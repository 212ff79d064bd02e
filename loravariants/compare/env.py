"""What every run of a comparison shares, loaded once: the base model, tokenizer and data.

The environment is a typed object (:class:`Environment`); tests build one by hand around a tiny
random model instead of building the base model.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from transformers import AutoModelForCausalLM

from ..base_model import resolve_base_model
from ..config import ExperimentConfig
from ..data import load_validation_tokens, make_train_blocks
from ..evaluate import split_at_eos


@dataclass
class Environment:
    """The shared inputs of every run of one comparison.

    Attributes:
        base_path: the base model's folder (recorded in results.json).
        tokenizer: its tokenizer (passkey prompts); ``None`` when no metric needs one.
        device: where runs train and evaluate.
        load_model: builds a fresh copy of the base model (fp32).
        train_blocks: ``seq_len -> dataset`` of packed training blocks (cached per length).
        val_tokens: the evaluation tokens, shape ``(n,)``.
        val_document_lengths: the lengths of the documents of ``val_tokens`` (per-document
            NLL, ``record["doc_nll"]``); None: the stream counts as one document.
        selection_tokens: the ``lr_grid`` selection split's tokens ``(m,)`` (None without
            ``lr_grid``), disjoint from ``val_tokens``' documents and the training documents.
    """

    base_path: str
    tokenizer: Any
    device: torch.device
    load_model: Callable[[], nn.Module]
    train_blocks: Callable[[int], Any]
    val_tokens: torch.Tensor
    val_document_lengths: list[int] | None = None
    selection_tokens: torch.Tensor | None = None

    @classmethod
    def of(cls, env: Environment | Mapping[str, Any]) -> Environment:
        """An :class:`Environment` as it is, or one built from a mapping of its fields."""
        return env if isinstance(env, Environment) else cls(**env)


def load_environment(config: ExperimentConfig, progress: bool) -> Environment:
    """Load the base model once (path + tokenizer) and the data once, for every run."""
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

    val_tokens = load_validation_tokens(config.data, tokenizer, config.eval.max_tokens)
    selection = None
    if config.lr_grid is not None:
        # as many tokens as the test split gets (the selection documents may be far longer):
        # the selection costs what one evaluation costs
        selection = load_validation_tokens(
            config.data, tokenizer, int(val_tokens.numel()), split="selection"
        )
    return Environment(
        base_path=str(base_path),
        tokenizer=tokenizer,
        device=device,
        load_model=load_model,
        train_blocks=train_blocks,
        val_tokens=val_tokens,
        val_document_lengths=split_at_eos(val_tokens, tokenizer.eos_token_id),
        selection_tokens=selection,
    )
