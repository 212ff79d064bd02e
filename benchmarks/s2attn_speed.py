"""S2-Attn vs full causal attention, forward+backward, measured side by side.

    python benchmarks/s2attn_speed.py [--lengths 2048 4096 8192 16384] [--repeats 5]

(a) the attention op alone on (1, 8, n, 32) float32 tensors: ``shifted_sparse_attention``
    (G = n/4, SDPA kernel) vs ``scaled_dot_product_attention(is_causal=True)``;
(b) a small Llama (2 layers, hidden 256, intermediate 512, 8 heads, vocab 512) in train mode,
    loss.backward() through everything, ``attn_implementation="s2_attn"`` vs ``"sdpa"``.

Times are medians over interleaved rounds (A, B, A, B, ...) after one warm-up round. Peak
memory is measured separately, one forward+backward per contender in a fresh process: the rise
of its peak resident set over the resident set before the step (inputs and weights excluded).
"""

from __future__ import annotations

import argparse
import gc
import platform
import subprocess
import sys

import torch
import torch.nn.functional as F
from _timing import interleaved_medians, load_baseline, small_llama

import loravariants.longlora  # noqa: F401  (registers "s2_attn")
from loravariants.longlora import shifted_sparse_attention


def peak_mib(part: str, n: int, name: str) -> float:
    """Peak memory of one forward+backward, MiB, measured in a fresh process.

    The child builds the inputs, resets its peak resident set (Linux ``/proc/self/clear_refs``),
    runs one step and reports the rise of the peak (VmHWM) over the resident set before it; a
    fresh process keeps memory cached from other contenders out of the number.
    """
    probe = [sys.executable, __file__, "--probe", part, str(n), name]
    result = subprocess.run(probe, capture_output=True, text=True, check=True)
    return float(result.stdout.strip().splitlines()[-1])


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


def _probe(part: str, n: int, name: str) -> None:
    fn = (op_contenders if part == "op" else model_contenders)(n)[name]
    gc.collect()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # Linux: reset the peak resident set (VmHWM) to the current one
    before = _status_kib("VmRSS")
    fn()
    print((_status_kib("VmHWM") - before) / 1024)


def op_contenders(n: int, baseline=None) -> dict:
    g = torch.Generator().manual_seed(0)
    # (b, n, h, d) storage viewed as (b, h, n, d), the layout attention modules produce
    q, k, v = (
        torch.randn(1, n, 8, 32, generator=g).transpose(1, 2).requires_grad_() for _ in range(3)
    )
    grad = torch.randn(1, n, 8, 32, generator=g)

    def s2():
        out = shifted_sparse_attention(q, k, v, n // 4)
        out.backward(grad)

    def full():
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2)
        out.backward(grad)

    fns = {"s2": s2, "full": full}
    if baseline is not None:  # another implementation of the op, e.g. an earlier version
        fns["baseline"] = lambda: baseline(q, k, v, n // 4).backward(grad)
    return fns


def model_contenders(n: int) -> dict:
    model = small_llama(
        0,
        vocab_size=512,
        intermediate_size=512,
        num_hidden_layers=2,
        num_attention_heads=8,
        num_key_value_heads=8,
        max_position_embeddings=n,
        s2_group_size_ratio=0.25,
    ).train()
    ids = torch.randint(0, 512, (1, n), generator=torch.Generator().manual_seed(1))

    def step(attn: str):
        def run():
            model.config._attn_implementation = attn
            model.zero_grad(set_to_none=True)
            model(ids, labels=ids).loss.backward()

        return run

    return {"s2": step("s2_attn"), "full": step("sdpa")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[2048, 4096, 8192, 16384])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--parts", nargs="+", choices=["op", "model"], default=["op", "model"])
    parser.add_argument(
        "--baseline", default=None, help="a .py file with another shifted_sparse_attention (op)"
    )
    parser.add_argument("--probe", nargs=3, metavar=("PART", "N", "NAME"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.probe:
        part, n, name = args.probe
        _probe(part, int(n), name)
        return
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
        f"{platform.processor() or platform.machine()}, repeats={args.repeats}"
    )
    header = "| part | n | full s | S2 s | speed-up | full peak MiB | S2 peak MiB |"
    print(header)
    print("|" + "---|" * 7)
    for part in args.parts:
        for n in args.lengths:
            baseline = load_baseline(args.baseline)
            fns = op_contenders(n, baseline) if part == "op" else model_contenders(n)
            times = interleaved_medians(fns, repeats=args.repeats, warmup=1)
            del fns
            gc.collect()
            mem = {name: peak_mib(part, n, name) for name in ("full", "s2")}
            print(
                f"| {'(a) op' if part == 'op' else '(b) Llama'} | {n} | {times['full']:.3f} | "
                f"{times['s2']:.3f} | {times['full'] / times['s2']:.2f}x | "
                f"{mem['full']:.0f} | {mem['s2']:.0f} |"
                + (
                    f" baseline {times['full'] / times['baseline']:.2f}x"
                    if "baseline" in times
                    else ""
                ),
                flush=True,
            )


if __name__ == "__main__":
    main()
