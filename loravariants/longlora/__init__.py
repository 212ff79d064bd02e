"""LongLoRA long-context backbone: S2-Attn and context extension."""
