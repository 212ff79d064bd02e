"""Helpers shared by the benchmark scripts: interleaved timing, peak memory, a small Llama."""

from __future__ import annotations

import resource
import statistics
import time
from collections.abc import Callable


def interleaved_medians(
    fns: dict[str, Callable[[], object]], repeats: int, warmup: int = 1
) -> dict[str, float]:
    """Run every function once per round, ``repeats`` rounds; median seconds per function.

    Interleaving (A, B, A, B, ...) spreads the machine's drift over all contenders, which
    matters on shared 2-core machines where single timings vary by 20%.
    """
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(ts) for name, ts in times.items()}


def peak_rss_mib() -> float:
    """Peak resident set size of this process so far, MiB (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def small_llama(seed: int = 0, **overrides):
    """A randomly initialised Llama (4 layers, hidden 256 unless overridden), fixed seed."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    fields = dict(
        vocab_size=1024,
        hidden_size=256,
        intermediate_size=688,
        num_hidden_layers=4,
        num_attention_heads=8,
        num_key_value_heads=4,
        max_position_embeddings=512,
    )
    fields.update(overrides)
    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(**fields))


def load_baseline(path: str | None):
    """``shifted_sparse_attention`` from a Python file (e.g. an earlier version of
    ``loravariants/longlora/s2attn.py``), to time side by side; None without a path."""
    if not path:
        return None
    import importlib.util

    spec = importlib.util.spec_from_file_location("s2_baseline", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.shifted_sparse_attention
