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
