"""LongLoRA long-context backbone: S2-Attn and context extension.

Importing this package registers the transformers attention implementation ``"s2_attn"``.
"""

from .context import extend_context
from .s2attn import (
    group_size_for,
    register,
    s2_attention_forward,
    s2_block_mask,
    shifted_sparse_attention,
)

register()

__all__ = [
    "extend_context",
    "group_size_for",
    "register",
    "s2_attention_forward",
    "s2_block_mask",
    "shifted_sparse_attention",
]
