"""Shared fixtures: tiny randomly initialised models built from configs (no downloads)."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

TINY_FIELDS = dict(
    vocab_size=128,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=128,
)


def write_tiny_corpus(root) -> None:
    """24 small text documents in ``root`` (a corpus for tiny base-model builds)."""
    words = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu".split()
    for i in range(24):
        body = " ".join(words[(i + j) % len(words)] for j in range(60))
        (root / f"doc{i:02d}.txt").write_text(f"def f{i}(x):\n    return x + {i}\n# {body}\n")


def tiny_base_config(corpus_dir, **overrides):
    """A ``BaseModelConfig`` that builds in seconds on ``corpus_dir``."""
    from loravariants.base_model import BaseModelConfig

    fields = dict(
        vocab_size=300,
        hidden_size=32,
        num_layers=2,
        num_heads=2,
        num_kv_heads=1,
        intermediate_size=64,
        context_length=32,
        data_source=str(corpus_dir),
        tokenizer_chars=20_000,
        steps=4,
        batch_size=2,
        warmup_steps=1,
        val_tokens=128,
        # a 32-token context has no room for a retrieval example (tests turn them on)
        passkey_fraction=0.0,
        kv_fraction=0.0,
    )
    fields.update(overrides)
    return BaseModelConfig(**fields)


def tiny_config(config_cls=LlamaConfig, **overrides):
    """A tiny config of any Llama-like family (Llama, Mistral, Qwen2, ...)."""
    return config_cls(**{**TINY_FIELDS, **overrides})


def tiny_llama_config(**overrides) -> LlamaConfig:
    return tiny_config(LlamaConfig, **overrides)


def make_tiny_llama(seed: int = 0, **overrides) -> LlamaForCausalLM:
    """A tiny fp32 Llama in eval mode with a fixed initialisation."""
    torch.manual_seed(seed)
    return LlamaForCausalLM(tiny_llama_config(**overrides)).eval()


@pytest.fixture
def tiny_llama() -> LlamaForCausalLM:
    return make_tiny_llama()


@pytest.fixture
def tokens() -> torch.Tensor:
    return torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(1))
