"""Concurrent (ASPEN/m-LoRA-style) vs sequential training of 4 adapters, measured side by side.

    python benchmarks/concurrent_training.py [--steps 8] [--rounds 3] [--seq 128] [--batch 2]
        [--size wide|small] [--ceiling]

Four adapters — LoRA, COLA, MultiLoRA, MixLoRA — each train ``steps`` steps of ``batch`` x
``seq`` tokens. "concurrent": one frozen base, one fused forward/backward per step
(``loravariants.multi.train_concurrent``). "sequential": four model copies (what four separate
jobs hold), trained one after another with the same loop. Every mode runs in a fresh process
(clean peak RSS), modes interleaved over ``rounds``; the script prints median total tokens/s,
peak RSS and the ratios.

``--ceiling`` adds what batching alone buys on this machine: one LoRA job trained on the same
number of tokens as one fused step of four jobs ("lora-fused": ``steps`` steps of 4 x ``batch``
rows) vs in four times as many small steps ("lora-split"), training time only. Concurrent
training cannot beat this ratio by much: it is the same fusion without the routing.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import time

import torch

SIZES = {
    # weight-dominated, the regime concurrency is for (~118M params, 470 MB fp32 a copy)
    "wide": dict(
        vocab_size=8192,
        hidden_size=1024,
        intermediate_size=2816,
        num_hidden_layers=8,
        num_attention_heads=16,
        num_key_value_heads=8,
    ),
    # activation-dominated (~5M params): four copies cost almost nothing
    "small": dict(
        vocab_size=4096,
        hidden_size=256,
        intermediate_size=688,
        num_hidden_layers=4,
        num_attention_heads=8,
        num_key_value_heads=4,
    ),
}
SIZE = {"name": "wide"}


def build_model(seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(max_position_embeddings=1024, **SIZES[SIZE["name"]])
    return LlamaForCausalLM(config)


def adapters():
    from loravariants.adapters import COLAConfig, LoRAConfig, MixLoRAConfig, MultiLoRAConfig

    return {
        "lora": LoRAConfig(r=8, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]),
        "cola": COLAConfig(r=8, target_modules=["q_proj", "v_proj"], chain_length=2, total_steps=8),
        "multilora": MultiLoRAConfig(num_branches=4, r=4, target_modules=["q_proj", "v_proj"]),
        "mixlora": MixLoRAConfig(num_experts=8, top_k=2, r=8, expert_r=8),
    }


def data(n: int, seq: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, SIZES[SIZE["name"]]["vocab_size"], (n, seq), generator=g)
    return [{"input_ids": row, "labels": row.clone()} for row in ids]


def worker(mode: str, steps: int, seq: int, batch: int) -> dict:
    import loravariants as lv
    from loravariants.compare import PeakMemory
    from loravariants.multi import Job, train_concurrent
    from loravariants.train import TrainConfig

    cfg = TrainConfig(max_steps=steps, batch_size=batch, lr=1e-3, warmup_steps=0)
    sets = {name: data(steps * batch, seq, i) for i, name in enumerate(adapters())}
    if mode.startswith("lora-"):
        return _lora_batching(mode, steps, seq, batch)
    with PeakMemory() as mem:
        start = time.perf_counter()
        if mode == "concurrent":
            model = build_model()
            for name, config in adapters().items():
                lv.attach(model, config, name=name)
            jobs = [Job(name, sets[name], cfg) for name in adapters()]
            results = train_concurrent(model, jobs, progress=False)
            tokens = sum(r.tokens for r in results.values())
        else:
            copies = {
                name: lv.attach(build_model(), config, name=name)
                for name, config in adapters().items()
            }
            tokens = 0
            for name, model in copies.items():
                # the same loop, one job at a time: a job per model copy
                results = train_concurrent(model, [Job(name, sets[name], cfg)], progress=False)
                tokens += results[name].tokens
        wall = time.perf_counter() - start
    return {
        "mode": mode,
        "tokens_per_s": tokens / wall,
        "peak_rss_mib": mem.peak_mib,
        "wall_s": wall,
        "tokens": tokens,
    }


def _lora_batching(mode: str, steps: int, seq: int, batch: int) -> dict:
    """One LoRA job, 4 x steps x batch rows, as big steps ("lora-fused") or small ones."""
    import loravariants as lv
    from loravariants.multi import Job, train_concurrent
    from loravariants.train import TrainConfig

    fused = mode == "lora-fused"
    cfg = TrainConfig(
        max_steps=steps if fused else 4 * steps,
        batch_size=4 * batch if fused else batch,
        lr=1e-3,
        warmup_steps=0,
    )
    model = lv.attach(build_model(), adapters()["lora"], name="lora")
    job = Job("lora", data(4 * steps * batch, seq, 0), cfg)
    start = time.perf_counter()
    result = train_concurrent(model, [job], progress=False)["lora"]
    wall = time.perf_counter() - start
    return {"mode": mode, "tokens_per_s": result.tokens / wall, "peak_rss_mib": float("nan")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--size", choices=sorted(SIZES), default="wide")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--ceiling", action="store_true", help="also measure batching alone")
    parser.add_argument(
        "--worker",
        choices=["concurrent", "sequential", "lora-fused", "lora-split"],
        help=argparse.SUPPRESS,
    )
    args = parser.parse_args()
    SIZE["name"] = args.size
    if args.worker:
        print(json.dumps(worker(args.worker, args.steps, args.seq, args.batch)))
        return
    modes = ["concurrent", "sequential"] + (["lora-fused", "lora-split"] if args.ceiling else [])
    runs: dict[str, list[dict]] = {mode: [] for mode in modes}
    for _ in range(args.rounds):
        for mode in runs:
            out = (
                subprocess.run(
                    [
                        sys.executable,
                        __file__,
                        "--worker",
                        mode,
                        "--steps",
                        str(args.steps),
                        "--seq",
                        str(args.seq),
                        "--batch",
                        str(args.batch),
                        "--size",
                        args.size,
                    ],
                    check=True,
                    capture_output=True,
                    text=True,
                )
                .stdout.strip()
                .splitlines()[-1]
            )
            runs[mode].append(json.loads(out))
    med = {
        m: {k: statistics.median(r[k] for r in rs) for k in ("tokens_per_s", "peak_rss_mib")}
        for m, rs in runs.items()
    }
    print(
        f"machine: {platform.machine()}, {torch.get_num_threads()} threads, torch "
        f"{torch.__version__}; 4 adapters x {args.steps} steps x {args.batch} x {args.seq} "
        f"tokens; Llama '{args.size}' {SIZES[args.size]};"
        f" medians of {args.rounds} interleaved rounds"
    )
    for mode, m in med.items():
        print(
            f"{mode:>11}: {m['tokens_per_s']:8.0f} tokens/s   peak RSS {m['peak_rss_mib']:7.0f} MiB"
        )
    if args.ceiling:
        ceiling = med["lora-fused"]["tokens_per_s"] / med["lora-split"]["tokens_per_s"]
        print(f"ceiling, batching alone (one LoRA job, 4x rows per step): {ceiling:.2f}x")
    c, s = med["concurrent"], med["sequential"]
    print(f"throughput concurrent / sequential: {c['tokens_per_s'] / s['tokens_per_s']:.2f}x")
    print(
        f"peak RSS concurrent / sequential (4 model copies): "
        f"{c['peak_rss_mib'] / s['peak_rss_mib']:.2f}x"
    )


if __name__ == "__main__":
    main()
