"""Everything measured on one GPU, in one process, as markdown tables.

    python benchmarks/gpu.py [--parts op model quickstart peft mixlora concurrent flex]
        [--lengths 8192 16384 32768 65536] [--repeats 5] [--baseline OLD_S2.py] [--tiny]

Parts (each one survives the failure of the others: a failed part prints its error and the
script goes on):

* ``op``: S2-Attn (``shifted_sparse_attention``, G = n/4) vs ``scaled_dot_product_attention(
  is_causal=True)``, forward+backward, bf16, (1, 32 heads, n, 128) in the (b, n, h, d) storage
  attention modules produce; time and peak memory. The ideal speed-up is the ratio of causal
  query-key pairs, about 4.27x at G = n/4 (``ideal_speedup``).
* ``flex``: FlexAttention (compiled) with the S2 block mask, at one length (16k), where it
  compiles.
* ``model``: Llama-7B-shaped layers (4 layers, hidden 4096, 32 heads, intermediate 11008,
  vocab 32000), LoRA r=8 on q,k,v,o, bf16, one training step (forward, loss, backward),
  ``attn_implementation="s2_attn"`` vs ``"sdpa"``. It also measures full attention's share
  ``a`` of the full-attention step and prints the cap ``1 / ((1 - a) + a / r)`` that an op
  speed-up ``r`` allows, and how close the model gets to it.
* ``peft``: our LoRA vs peft's, training step, with each library's default adapter dtype and
  with everything in bf16.
* ``mixlora``: our MixLoRA vs the ``mixlora`` package (its own loader reading our export),
  forward time in eval mode (the package as shipped, and with its experts' eval-time dropout
  switched off); and MixLoRA's training-step peak memory against a LoRA of the same adapter
  parameter count.
* ``concurrent``: 4 LoRA jobs trained concurrently on one base vs one after another.
* ``quickstart``: ``loravariants quickstart --quick`` end to end (a fresh process).

Times are medians of interleaved rounds (A, B, A, B, ...) after a warm-up, synchronised with
the device; peak memory is ``torch.cuda.max_memory_allocated`` above what was allocated before
the step. ``--tiny`` shrinks every size so the whole script runs on a CPU in a minute (to test
it, not to measure).
"""

from __future__ import annotations

import argparse
import copy
import os
import platform
import subprocess
import sys
import tempfile
import time
import traceback
from datetime import datetime, timezone
from pathlib import Path

import torch
import torch.nn.functional as F
from _timing import interleaved_medians, load_baseline

import loravariants as lv
from loravariants.adapters import LoRAConfig, MixLoRAConfig
from loravariants.longlora import shifted_sparse_attention

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
#: sizes of the real run and of ``--tiny`` (a CPU check of the script itself)
SIZES = {
    "real": dict(heads=32, head_dim=128, hidden=4096, inter=11008, vocab=32000, layers=4),
    "tiny": dict(heads=4, head_dim=16, hidden=64, inter=128, vocab=256, layers=2),
}


# ----------------------------------------------------------------------------- measuring


def sync() -> None:
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()


def timed(fns: dict, repeats: int) -> dict[str, float]:
    """Median seconds per call, interleaved, each call synchronised with the device."""

    def synced(fn):
        def run():
            fn()
            sync()

        return run

    sync()
    return interleaved_medians({k: synced(f) for k, f in fns.items()}, repeats)


def peak_mib(fn) -> float:
    """Peak device memory of one call above what was allocated before it, MiB."""
    if DEVICE.type != "cuda":
        return float("nan")
    sync()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    fn()
    sync()
    return (torch.cuda.max_memory_allocated() - before) / 2**20


def table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def ideal_speedup(n: int, group: int) -> float:
    """Query-key pairs of causal full attention over those of causal S2 groups (+ both halves'
    partial groups), i.e. the speed-up of a kernel whose time is proportional to pairs."""
    full = n * (n + 1) / 2
    m, rest = divmod(n, group)
    unshifted = m * group * (group + 1) / 2 + rest * (rest + 1) / 2
    half = group // 2
    body = n - half
    m2, rest2 = divmod(body, group)
    shifted = half * (half + 1) / 2 + m2 * group * (group + 1) / 2 + rest2 * (rest2 + 1) / 2
    return full / ((unshifted + shifted) / 2)


def attention_inputs(n: int, size: dict, seed: int = 0):
    """q, k, v (1, h, n, d) viewed from (1, n, h, d) storage, bf16, and an output gradient."""
    g = torch.Generator(device=DEVICE).manual_seed(seed)
    shape = (1, n, size["heads"], size["head_dim"])
    make = lambda: torch.randn(shape, generator=g, device=DEVICE, dtype=torch.bfloat16)  # noqa: E731
    q, k, v = (make().transpose(1, 2).requires_grad_() for _ in range(3))
    return q, k, v, make()


def llama(size: dict, max_len: int, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=size["vocab"],
        hidden_size=size["hidden"],
        intermediate_size=size["inter"],
        num_hidden_layers=size["layers"],
        num_attention_heads=size["heads"],
        num_key_value_heads=size["heads"],
        max_position_embeddings=max_len,
    )
    torch.manual_seed(seed)
    with torch.device(DEVICE):
        return LlamaForCausalLM(config).to(torch.bfloat16)


def training_step(model, ids):
    def run():
        model(input_ids=ids, labels=ids).loss.backward()
        model.zero_grad(set_to_none=True)

    return run


# ----------------------------------------------------------------------------- parts


def op_contenders(n: int, size: dict, group: int | None = None, baseline=None) -> dict:
    """Forward+backward of full causal SDPA and of S2-Attn (G = n/4) on the same inputs, and
    of a ``baseline`` S2 implementation when given."""
    q, k, v, grad = attention_inputs(n, size)
    group = group or n // 4

    def full():
        F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).backward(grad)

    def s2():
        shifted_sparse_attention(q, k, v, group).backward(grad)

    fns = {"full": full, "s2": s2}
    if baseline is not None:
        fns["baseline"] = lambda: baseline(q, k, v, group).backward(grad)
    return fns


def part_op(args, size, found: dict) -> str:
    rows = []
    baseline = load_baseline(args.baseline)
    for n in args.lengths:
        fns = op_contenders(n, size, baseline=baseline)
        t = timed(fns, args.repeats)
        mem = {name: peak_mib(fn) for name, fn in fns.items()}
        found.setdefault("op_speedup", {})[n] = t["full"] / t["s2"]
        found.setdefault("op_full_s", {})[n] = t["full"]
        rows.append(
            [
                n,
                f"{1e3 * t['full']:.2f}",
                f"{1e3 * t['s2']:.2f}",
                f"**{t['full'] / t['s2']:.2f}x**",
                f"{ideal_speedup(n, n // 4):.2f}x",
                f"{mem['full']:,.0f}",
                f"{mem['s2']:,.0f}",
            ]
            + ([f"{t['full'] / t['baseline']:.2f}x"] if baseline else [])
        )
        del fns
    header = ["n", "full ms", "S2 ms", "speed-up", "ideal", "full peak MiB", "S2 peak MiB"]
    header += [f"baseline speed-up ({Path(args.baseline).name})"] if baseline else []
    return table(header, rows)


def part_flex(args, size, found: dict) -> str:
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    n = args.flex_length
    group, heads = n // 4, size["heads"]
    first_shifted = heads - heads // 2

    def s2_mask(b, h, q_idx, kv_idx):
        offset = (h >= first_shifted) * (group - group // 2)  # shifted heads: [0, G/2), ...
        same = (q_idx + offset) // group == (kv_idx + offset) // group
        return same & (kv_idx <= q_idx)

    block_mask = create_block_mask(s2_mask, 1, heads, n, n, device=DEVICE)
    flex = torch.compile(flex_attention)
    q, k, v, grad = attention_inputs(n, size)
    with torch.no_grad():  # the same semantics as ours (bf16 tolerance)
        ours = shifted_sparse_attention(q, k, v, group).float()
        theirs = flex(q, k, v, block_mask=block_mask).transpose(1, 2).float()
        diff = float((ours - theirs).abs().max())

    def flexed():
        flex(q, k, v, block_mask=block_mask).transpose(1, 2).backward(grad)

    t = timed({**op_contenders(n, size, group), "flex": flexed}, args.repeats)
    rows = [
        [n, name, f"{1e3 * t[name]:.2f}", f"{t['full'] / t[name]:.2f}x"]
        for name in ("full", "s2", "flex")
    ]
    return table(["n", "kernel", "ms", "vs full"], rows) + (
        f"\n\nmax |ours - flex| = {diff:.2e} (bf16)"
    )


def part_model(args, size, found: dict) -> str:
    max_len = max(args.lengths)
    model = llama(size, max_len)
    targets = ["q_proj", "k_proj", "v_proj", "o_proj"]
    lv.attach(model, LoRAConfig(r=8, alpha=16, target_modules=targets))
    model.to(torch.bfloat16).train()
    rows = []
    for n in args.lengths:
        ids = torch.randint(0, size["vocab"], (1, n), device=DEVICE)

        def step(attention, ids=ids):
            def run():
                model.set_attn_implementation(attention)
                training_step(model, ids)()

            return run

        t = timed({"sdpa": step("sdpa"), "s2": step("s2_attn")}, args.repeats)
        mem = {"sdpa": peak_mib(step("sdpa")), "s2": peak_mib(step("s2_attn"))}
        # full attention's share of the full-attention step, and the cap it sets
        op_full = found.get("op_full_s", {}).get(n)
        r = found.get("op_speedup", {}).get(n)
        if op_full is None or r is None:  # the op part did not run (or failed) at this n
            op = timed(op_contenders(n, size), args.repeats)
            op_full, r = op["full"], op["full"] / op["s2"]
        a = min(1.0, size["layers"] * op_full / t["sdpa"])
        cap = 1 / ((1 - a) + a / r)
        speedup = t["sdpa"] / t["s2"]
        rows.append(
            [
                n,
                f"{1e3 * t['sdpa']:.1f}",
                f"{1e3 * t['s2']:.1f}",
                f"**{speedup:.2f}x**",
                f"{a:.2f}",
                f"{r:.2f}x",
                f"{cap:.2f}x",
                f"{100 * speedup / cap:.0f}%",
                f"{mem['sdpa']:,.0f}",
                f"{mem['s2']:,.0f}",
            ]
        )
        del ids
    header = [
        "n",
        "sdpa ms",
        "S2 ms",
        "speed-up",
        "attention share a",
        "op speed-up r",
        "cap",
        "of cap",
        "sdpa peak MiB",
        "S2 peak MiB",
    ]
    return table(header, rows)


def part_peft(args, size, found: dict) -> str:
    import peft

    targets = ["q_proj", "k_proj", "v_proj", "o_proj"]
    seq = 64 if args.tiny else 2048
    ids = torch.randint(0, size["vocab"], (2, seq), device=DEVICE)
    rows = []
    for label, adapters_bf16 in (("default dtypes", False), ("everything bf16", True)):
        ours = lv.attach(
            llama(size, seq), LoRAConfig(r=8, alpha=16, init="random", target_modules=targets)
        )
        theirs = peft.get_peft_model(
            llama(size, seq),
            peft.LoraConfig(r=8, lora_alpha=16, target_modules=targets),
            autocast_adapter_dtype=not adapters_bf16,
        )
        for path, layer in lv.adapter_layers(ours).items():
            target = theirs.base_model.model.get_submodule(path)
            target.lora_A["default"].weight.data.copy_(layer.lora_A.data)
            target.lora_B["default"].weight.data.copy_(layer.lora_B.data)
        if adapters_bf16:
            for p in ours.parameters():
                if p.requires_grad:
                    p.data = p.data.to(torch.bfloat16)
        dtype = {
            "ours": next(p for p in ours.parameters() if p.requires_grad).dtype,
            "peft": next(p for p in theirs.parameters() if p.requires_grad).dtype,
        }
        ours.train(), theirs.train()
        with torch.no_grad():
            diff = abs(
                float(ours(input_ids=ids, labels=ids).loss)
                - float(theirs(input_ids=ids, labels=ids).loss)
            )
        t = timed(
            {"ours": training_step(ours, ids), "peft": training_step(theirs, ids)}, args.repeats
        )
        mem = {
            "ours": peak_mib(training_step(ours, ids)),
            "peft": peak_mib(training_step(theirs, ids)),
        }
        rows.append(
            [
                label,
                f"{dtype['ours']} / {dtype['peft']}",
                f"{1e3 * t['ours']:.1f}",
                f"{1e3 * t['peft']:.1f}",
                f"**{t['peft'] / t['ours']:.2f}x**",
                f"{mem['ours']:,.0f} / {mem['peft']:,.0f}",
                f"{diff:.1e}",
            ]
        )
        del ours, theirs
    header = [
        "setting",
        "adapter dtype (ours / peft)",
        "ours ms",
        "peft ms",
        "peft / ours",
        "peak MiB (ours / peft)",
        "|loss diff|",
    ]
    return table(header, rows) + f"\n\n2 x {seq} tokens, 4 layers of the model part's shape."


def part_mixlora(args, size, found: dict) -> str:
    from mixlora.model import inject_adapter_in_model, load_adapter_weights

    seq = 64 if args.tiny else 1024
    ids = torch.randint(0, size["vocab"], (2, seq), device=DEVICE)
    base = llama(size, seq).float()
    mix = MixLoRAConfig(num_experts=8, top_k=2, r=8, dropout=1e-6)
    ours = lv.attach(copy.deepcopy(base), mix)
    for p in ours.parameters():
        if p.requires_grad:
            torch.nn.init.normal_(p, std=0.02)
    with tempfile.TemporaryDirectory() as tmp:
        # our export as it is: the package's loader needs only the base path, which a model
        # built from a config does not have
        lv.save_adapter(ours, tmp, format="mixlora", base_model_name_or_path="in-memory")
        config, weights = load_adapter_weights(tmp, device=str(DEVICE))
    shipped, off = copy.deepcopy(base), copy.deepcopy(base)
    inject_adapter_in_model(shipped, config, weights)
    inject_adapter_in_model(off, config, weights)
    for layer in off.model.layers:  # its experts' dropout runs even in eval: off by hand
        for expert in layer.mlp.mixlora_moes["default"].experts_.values():
            expert.dropout_.p = 0.0
    for model in (ours, shipped, off):
        model.eval()

    def forward(model):
        def run():
            with torch.no_grad():
                model(input_ids=ids)

        return run

    with torch.no_grad():
        diff = float((ours(input_ids=ids).logits - off(input_ids=ids).logits).abs().max())
    t = timed(
        {"ours": forward(ours), "shipped": forward(shipped), "off": forward(off)}, args.repeats
    )
    del shipped, off
    # training-step memory against a LoRA of the same adapter parameter count (q,k,v,o + FFN)
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    count = lambda m: sum(p.numel() for p in m.parameters() if p.requires_grad)  # noqa: E731
    per_rank = count(lv.attach(llama(size, seq), LoRAConfig(r=1, target_modules=targets)))
    lora_r = max(1, round(count(ours) / per_rank))
    lora = lv.attach(
        copy.deepcopy(base), LoRAConfig(r=lora_r, init="random", target_modules=targets)
    )
    ours.train(), lora.train()

    def step(model):
        def run():
            (model(input_ids=ids, labels=ids).loss + lv.aux_loss(model)).backward()
            model.zero_grad(set_to_none=True)

        return run

    mem = {"ours": peak_mib(step(ours)), "lora": peak_mib(step(lora))}
    found["mixlora_forward_ratio"] = t["ours"] / t["off"]
    found["mixlora_memory_ratio"] = mem["ours"] / mem["lora"]
    rows = [
        [
            f"{1e3 * t['ours']:.1f}",
            f"{1e3 * t['shipped']:.1f}",
            f"{1e3 * t['off']:.1f}",
            f"**{t['ours'] / t['shipped']:.2f}x**",
            f"**{t['ours'] / t['off']:.2f}x**",
            f"{diff:.1e}",
        ]
    ]
    header = [
        "ours ms",
        "mixlora ms (as shipped)",
        "mixlora ms (dropout off)",
        "ours / shipped",
        "ours / dropout off",
        "max |logit diff| (dropout off)",
    ]
    memory = table(
        ["MixLoRA peak MiB", f"LoRA r={lora_r} peak MiB", "MixLoRA / LoRA"],
        [[f"{mem['ours']:,.0f}", f"{mem['lora']:,.0f}", f"**{mem['ours'] / mem['lora']:.2f}x**"]],
    )
    return (
        table(header, rows)
        + f"\n\nfloat32, E=8, top-2, r=8, 2 x {seq} tokens, eval forward. The package keeps "
        "its experts in plain dicts that `.eval()` does not reach, so their dropout (1e-6 in the "
        "file: its loader refuses 0) runs in eval; the last column switches it off by hand, the "
        "same arithmetic as ours (goal: ours / package <= 0.6x).\n\nTraining step (forward, "
        f"loss + balance loss, backward), the same tokens, against LoRA r={lora_r} on q,k,v,o "
        f"and the FFN ({count(lora):,} vs {count(ours):,} adapter parameters); peak "
        "`max_memory_allocated` above what was allocated before (goal: <= 1.3x):\n\n" + memory
    )


def part_concurrent(args, size, found: dict) -> str:
    from loravariants.multi import Job, train_concurrent
    from loravariants.train import TrainConfig

    seq, batch, steps, jobs = (32, 2, 2, 4) if args.tiny else (512, 4, 8, 4)
    cfg = TrainConfig(max_steps=steps, batch_size=batch, lr=1e-4, warmup_steps=0)
    g = torch.Generator().manual_seed(0)
    data = {
        f"job{i}": [
            {"input_ids": r, "labels": r.clone()}
            for r in torch.randint(0, size["vocab"], (steps * batch, seq), generator=g)
        ]
        for i in range(jobs)
    }
    lora = LoRAConfig(r=8, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])

    def concurrent():
        model = llama(size, seq)
        for name in data:
            lv.attach(model, lora, name=name)
        results = train_concurrent(model, [Job(n, d, cfg) for n, d in data.items()], progress=False)
        return sum(r.tokens for r in results.values())

    def sequential():
        tokens = 0
        for name, d in data.items():
            model = lv.attach(llama(size, seq), lora, name=name)
            tokens += train_concurrent(model, [Job(name, d, cfg)], progress=False)[name].tokens
            del model
        return tokens

    rows, tps = [], {}
    for _ in range(2):  # the first round warms up
        for name, fn in (("concurrent", concurrent), ("sequential", sequential)):
            sync()
            start = time.perf_counter()
            tokens = fn()
            sync()
            tps[name] = tokens / (time.perf_counter() - start)
    for name in ("concurrent", "sequential"):
        rows.append([name, f"{tps[name]:,.0f}"])
    rows.append(["concurrent / sequential", f"**{tps['concurrent'] / tps['sequential']:.2f}x**"])
    return table(["mode", "tokens/s"], rows) + (
        f"\n\n{jobs} LoRA jobs (r=8, q,k,v,o), {steps} steps x {batch} x {seq} tokens each, "
        "bf16 base; the second of two rounds."
    )


def part_quickstart(args, size, found: dict) -> str:
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [
            sys.executable,
            "-m",
            "loravariants.cli",
            "quickstart",
            "--quick",
            "--quiet",
            "--output",
            str(Path(tmp) / "quick"),
        ]
        start = time.perf_counter()
        done = subprocess.run(cmd, capture_output=True, text=True)
        wall = time.perf_counter() - start
    tail = "\n".join((done.stdout + done.stderr).strip().splitlines()[-14:])
    status = "passed" if done.returncode == 0 else f"FAILED (exit {done.returncode})"
    return f"`loravariants quickstart --quick`: {status} in {wall:.0f} s\n\n```\n{tail}\n```"


PARTS = {  # in the order they run: the ones that matter most first
    "op": ("S2-Attn op vs full causal SDPA (forward+backward, bf16)", part_op),
    "model": ("Whole model: s2_attn vs sdpa, training step", part_model),
    "quickstart": ("quickstart --quick end to end", part_quickstart),
    "peft": ("LoRA: ours vs peft, training step", part_peft),
    "mixlora": ("MixLoRA: ours vs the mixlora package, eval forward", part_mixlora),
    "concurrent": ("Concurrent vs sequential training of 4 LoRA jobs", part_concurrent),
    "flex": ("S2-Attn vs FlexAttention with the S2 block mask", part_flex),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--parts", nargs="+", default=list(PARTS), choices=list(PARTS))
    parser.add_argument("--lengths", nargs="+", type=int, default=None)
    parser.add_argument("--flex-length", type=int, default=None)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument(
        "--baseline",
        default=None,
        help="a .py file with another shifted_sparse_attention (op part)",
    )
    parser.add_argument("--tiny", action="store_true", help="tiny sizes: test the script on a CPU")
    args = parser.parse_args()
    size = SIZES["tiny" if args.tiny else "real"]
    args.lengths = args.lengths or ([256, 512] if args.tiny else [8192, 16384, 32768, 65536])
    args.flex_length = args.flex_length or (256 if args.tiny else 16384)
    gpu = torch.cuda.get_device_name(0) if DEVICE.type == "cuda" else "no GPU"
    import transformers

    print(
        f"# GPU benchmarks\n\n{gpu}; torch {torch.__version__}, transformers "
        f"{transformers.__version__}, Python {platform.python_version()}; "
        f"{datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC; medians of {args.repeats}"
        + (" (--tiny: sizes for testing the script, not measurements)" if args.tiny else "")
    )
    found: dict = {}
    for key in [k for k in PARTS if k in args.parts]:
        title, fn = PARTS[key]
        start = time.perf_counter()
        try:
            body = fn(args, size, found)
        except Exception as e:  # one part's failure must not cost the others
            body = f"FAILED: {type(e).__name__}: {e}\n\n```\n{traceback.format_exc()[-2000:]}```"
        if DEVICE.type == "cuda":
            torch.cuda.empty_cache()
        print(f"\n## {title}\n\n{body}\n\n({time.perf_counter() - start:.0f} s)", flush=True)


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
