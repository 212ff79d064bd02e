"""Exact spectrum from LoRA factors vs a dense SVD, and analysing a 7B-shaped LoRA.

Measured side by side in one run:

1. one rank-16 update of a 4096 x 4096 layer: ``spectrum((B, A))`` (QR + 16 x 16 core SVD)
   against ``torch.linalg.svd(B @ A)`` in float64 (the dense product's time is not counted) —
   ratio and the largest relative difference of the top 16 singular values;
2. ``analyze()`` of a synthetic 7B-shaped LoRA: 32 layers x q, k, v, o, r = 16, 4096 x 4096 —
   128 updates, every metric; goal under 2 s.

    python benchmarks/svd_speed.py [--dim 4096] [--rank 16] [--layers 32] [--repeats 3]
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(__file__))
from _timing import interleaved_medians  # noqa: E402

from loravariants.analysis import analyze, spectrum, svd  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dim", type=int, default=4096)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3, help="rounds for the fast timings")
    parser.add_argument("--dense-repeats", type=int, default=1, help="rounds for the dense SVD")
    args = parser.parse_args(argv)
    d, r = args.dim, args.rank
    print(
        f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads"
    )

    g = torch.Generator().manual_seed(0)
    B = torch.randn(d, r, generator=g) / r**0.5
    A = torch.randn(r, d, generator=g) / d**0.5

    # 1. one layer: factors vs dense (float64 both)
    dense = B.double() @ A.double()
    fast = interleaved_medians(
        {"values": lambda: spectrum((B, A)), "vectors": lambda: svd((B, A))}, args.repeats
    )
    t_fast, t_vec = fast["values"], fast["vectors"]
    times = []
    for _ in range(args.dense_repeats):
        start = time.perf_counter()
        S_dense = torch.linalg.svd(dense, full_matrices=False).S
        times.append(time.perf_counter() - start)
    t_dense = sorted(times)[len(times) // 2]
    s_fast = spectrum((B, A))
    rel = float(((s_fast - S_dense[:r]).abs() / S_dense[:r]).max())
    print(f"\n[1] rank-{r} update, {d}x{d}")
    print(f"  exact spectrum from factors : {t_fast * 1e3:9.2f} ms")
    print(f"  exact U, S, V from factors  : {t_vec * 1e3:9.2f} ms")
    print(f"  dense torch.linalg.svd (f64): {t_dense * 1e3:9.1f} ms")
    print(f"  speed-up, values            : {t_dense / t_fast:9.0f}x   (goal >= 50x)")
    print(f"  speed-up, U S V             : {t_dense / t_vec:9.0f}x")
    print(f"  max relative diff, top {r}   : {rel:.2e}")
    tail = float(S_dense[r:].max() / S_dense[0])
    print(f"  dense tail s_{r + 1}/s_1       : {tail:.1e} (rank {r} confirmed)")

    # 2. a 7B-shaped LoRA: 32 x (q, k, v, o)
    factors = {}
    for layer in range(args.layers):
        for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
            factors[f"model.layers.{layer}.self_attn.{proj}"] = (
                torch.randn(d, r, generator=g) / r**0.5,
                torch.randn(r, d, generator=g) / d**0.5,
            )
    t = interleaved_medians(
        {
            "default (threads=1)": lambda: analyze(factors),
            f"threads={torch.get_num_threads()}": lambda: analyze(factors, threads=None),
        },
        args.repeats,
    )
    report = analyze(factors)
    print(
        f"\n[2] analyze(): {len(report)} updates ({args.layers} layers x q,k,v,o), "
        f"r={r}, {d}x{d}; median of {args.repeats}; goal < 2 s"
    )
    for name, secs in t.items():
        print(f"  {name:22s}: {secs:7.3f} s  ({secs / len(report) * 1e3:.2f} ms per update)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
