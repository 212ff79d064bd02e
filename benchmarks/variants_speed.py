"""MixLoRA and MultiLoRA against their obvious alternatives and against the `mixlora` package.

    python benchmarks/variants_speed.py [--parts dispatch package memory profile] [--repeats 10]
        [--batch 4] [--seq 256] [--r 8] [--package-batch 4] [--package-seq 512]

Parts, each printed with its ratios (all contenders of a part measured side by side in one run):

* ``dispatch`` (one Llama: 2 layers, d=256, FFN 688, the same frozen weights; forward+backward):
  MixLoRA (E=8, k=2) vs the dense reference that runs every expert on every token and masks by
  the routing (the same function, checked before timing); MultiLoRA (n=4 branches of rank r,
  stacked) vs plain LoRA of rank 4r and vs a per-branch Python loop (checked the same way).
* ``package``: eval forward of our MixLoRA (E=8, top-2, r=8, on a 4-layer hidden-256 Llama,
  4 x 512 tokens) vs the `mixlora` package's own model loading our export: as shipped (its
  experts' dropout, 1e-6 in the file, still runs in eval: it keeps them in plain dicts that
  ``.eval()`` does not reach) and with that dropout switched off (the same arithmetic as ours;
  logits checked equal before timing).
* ``memory``: peak memory of one training step (forward, loss + balance loss, backward, AdamW
  step) of MixLoRA and of a LoRA of the same adapter parameter count (on q,k,v,o and the FFN
  projections, rank chosen to match), same model and tokens as ``package``; each contender in
  a fresh process, as the rise of the peak resident set (Linux VmHWM) over the resident set
  before the step, with glibc told to map every block of 64 KiB or more on its own
  (``MALLOC_MMAP_THRESHOLD_``), so that freed tensors leave the resident set.
* ``profile``: ``torch.profiler`` of our MixLoRA at the ``package`` shapes: self CPU time by
  operator over the whole model for the eval forward and for one training step (forward,
  loss + balance loss, backward), with the share of the expert computation (``_Experts``) and
  the page faults of one eval forward.

Times are medians over interleaved repeats (A, B, C, ... per round).
"""

from __future__ import annotations

import argparse
import copy
import gc
import os
import platform
import subprocess
import sys
import tempfile
from typing import Any

import torch
from _timing import interleaved_medians, small_llama
from torch import nn
from transformers import LlamaForCausalLM

import loravariants as lv
from loravariants.adapters.lora import LoRAConfig
from loravariants.adapters.mixlora import MixLoRAConfig, MixLoRAFFN
from loravariants.adapters.multilora import MultiLoRAConfig, MultiLoRALinear

ATTENTION = ["q_proj", "k_proj", "v_proj", "o_proj"]


def build(seed: int = 0) -> LlamaForCausalLM:
    return small_llama(seed, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4)


class DenseMixLoRAFFN(MixLoRAFFN):
    """Slow reference: every expert on every token, weighted by the (masked) routing."""

    def update(self, x: torch.Tensor, ctx: Any = None) -> torch.Tensor:
        base = self.base
        G, U, a0 = (t.reshape(-1, t.shape[-1]) for t in ctx[:3])
        xt = x.reshape(-1, x.shape[-1])
        probs, weights, experts = self.route(xt)
        out = torch.zeros_like(xt)

        def lora(expert: nn.Module, proj: str, h: torch.Tensor) -> torch.Tensor:
            return h @ expert.lora_A[proj].T @ expert.lora_B[proj].T * self.scaling

        for e, expert in enumerate(self.experts):
            w = (weights * (experts == e)).sum(-1, keepdim=True)
            g = G + lora(expert, "gate_proj", xt)
            u = U + lora(expert, "up_proj", xt)
            a = base.act_fn(g) * u
            out = out + w * (base.down_proj(a) + lora(expert, "down_proj", a))
        return (out - base.down_proj(a0)).reshape(x.shape)


class LoopMultiLoRALinear(MultiLoRALinear):
    """Per-branch Python loop, the naive form of the same update."""

    def update(self, x: torch.Tensor, ctx: Any = None) -> torch.Tensor:
        out = 0
        for i in range(self.num_branches):
            s = self.scales[i]
            out = out + s * (x @ self.lora_A[i].T @ self.lora_B[i].T)
        return out * self.scaling


def _swap_class(model: nn.Module, old: type, new: type) -> None:
    for layer in lv.adapter_layers(model).values():
        if type(layer) is old:
            layer.__class__ = new


def _randomise(model: nn.Module) -> None:
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.requires_grad and ("lora_B" in name or "router" in name or "scales" in name):
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)


def part_dispatch(args) -> None:
    models: dict[str, nn.Module] = {}
    mix = MixLoRAConfig(
        num_experts=8, top_k=2, r=8, alpha=16, dropout=0.0, target_modules=ATTENTION
    )
    for name in ("mixlora_sparse", "mixlora_dense"):
        models[name] = lv.attach(build(), mix)
        torch.manual_seed(2)  # same adapter init for both
    _swap_class(models["mixlora_dense"], MixLoRAFFN, DenseMixLoRAFFN)
    multi = MultiLoRAConfig(num_branches=4, r=args.r, alpha=16, target_modules=ATTENTION)
    models["multilora"] = lv.attach(build(), multi)
    models["multilora_loop"] = lv.attach(build(), multi)
    _swap_class(models["multilora_loop"], MultiLoRALinear, LoopMultiLoRALinear)
    lora = LoRAConfig(r=4 * args.r, alpha=16, init="random", target_modules=ATTENTION)
    models["lora_4r"] = lv.attach(build(), lora)
    for model in models.values():
        _randomise(model)
        model.train()

    batch = torch.randint(
        0, 1024, (args.batch, args.seq), generator=torch.Generator().manual_seed(0)
    )

    # same function before timing: the fast paths against their references
    with torch.no_grad():
        for fast, slow in (("mixlora_sparse", "mixlora_dense"), ("multilora", "multilora_loop")):
            models[slow].load_state_dict(models[fast].state_dict())
            a = models[fast](input_ids=batch, labels=batch).loss.item()
            b = models[slow](input_ids=batch, labels=batch).loss.item()
            assert abs(a - b) < 1e-4, (fast, a, b)

    def step(model: nn.Module):
        def run():
            loss = model(input_ids=batch, labels=batch).loss + lv.aux_loss(model)
            loss.backward()
            model.zero_grad(set_to_none=True)

        return run

    medians = interleaved_medians({n: step(m) for n, m in models.items()}, args.repeats)
    print(
        f"\ndispatch: batch {args.batch} x {args.seq} tokens; Llama 2 layers d=256, FFN 688; "
        "adapters on q,k,v,o (+ FFN experts for MixLoRA); forward+backward"
    )
    for name, seconds in medians.items():
        ms = 1000 * seconds
        print(f"{name:>15}: {ms:8.1f} ms / forward+backward (median of {args.repeats})")
    m = medians
    mix_ratio = m["mixlora_dense"] / m["mixlora_sparse"]
    print(f"MixLoRA dense reference / sparse (E=8, k=2): {mix_ratio:.2f}x")
    multi_ratio = m["multilora"] / m["lora_4r"]
    print(f"MultiLoRA (n=4, r={args.r}) / LoRA (r={4 * args.r}): {multi_ratio:.3f}x")
    print(f"MultiLoRA per-branch loop / stacked: {m['multilora_loop'] / m['multilora']:.3f}x")


# ----------------------------------------------------------------------------- package, memory

#: MixLoRA as the issue measures it: E=8, top-2, r=8 (experts and attention LoRA)
PACKAGE_MIX = dict(num_experts=8, top_k=2, r=8, alpha=16, dropout=1e-6)
ALL_LINEAR = ATTENTION + ["gate_proj", "up_proj", "down_proj"]


def trainable(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def lora_rank_matching(params: int) -> int:
    """The LoRA rank (on q,k,v,o and the FFN projections of ``small_llama``) whose adapter
    has the parameter count closest to ``params``."""
    per_rank = trainable(lv.attach(small_llama(0), LoRAConfig(r=1, target_modules=ALL_LINEAR)))
    return max(1, round(params / per_rank))


def part_package(args) -> None:
    from mixlora.model import inject_adapter_in_model, load_adapter_weights

    base = small_llama(0)  # 4 layers, hidden 256, FFN 688
    ids = torch.randint(
        0, 1024, (args.package_batch, args.package_seq), generator=torch.Generator().manual_seed(0)
    )
    ours = lv.attach(copy.deepcopy(base), MixLoRAConfig(**PACKAGE_MIX))
    _randomise(ours)
    with tempfile.TemporaryDirectory() as tmp:
        lv.save_adapter(ours, tmp, format="mixlora", base_model_name_or_path="in-memory")
        config, weights = load_adapter_weights(tmp, device="cpu")
    shipped, off = copy.deepcopy(base), copy.deepcopy(base)
    inject_adapter_in_model(shipped, config, weights)
    inject_adapter_in_model(off, config, weights)
    for layer in off.model.layers:  # the experts' dropout, out of .eval()'s reach: off by hand
        for expert in layer.mlp.mixlora_moes["default"].experts_.values():
            expert.dropout_.p = 0.0
    models = {"ours": ours, "mixlora_shipped": shipped, "mixlora_no_dropout": off}
    for model in models.values():
        model.eval()
    with torch.no_grad():
        diff = float((ours(input_ids=ids).logits - off(input_ids=ids).logits).abs().max())
    assert diff < 1e-4, diff  # the same function before timing

    def forward(model: nn.Module):
        def run():
            with torch.no_grad():
                model(input_ids=ids)

        return run

    m = interleaved_medians({n: forward(model) for n, model in models.items()}, args.repeats)
    print(
        f"\npackage: eval forward, Llama 4 layers d=256, FFN 688, {args.package_batch} x "
        f"{args.package_seq} tokens, MixLoRA E=8 top-2 r=8; max |logit diff| vs the package "
        f"(dropout off) {diff:.1e}"
    )
    for name, seconds in m.items():
        print(f"{name:>20}: {1000 * seconds:8.1f} ms / forward (median of {args.repeats})")
    print(f"ours / mixlora package as shipped: {m['ours'] / m['mixlora_shipped']:.3f}x")
    print(f"ours / mixlora package, its dropout off: {m['ours'] / m['mixlora_no_dropout']:.3f}x")


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


def _memory_probe(name: str, batch: int, seq: int, lora_r: int) -> None:
    """In a fresh process: one training step of ``name``; prints the adapter's parameter count,
    the rise of the peak resident set over the resident set before the step (MiB), and the
    peak itself (MiB)."""
    if name == "mixlora":
        model = lv.attach(small_llama(0), MixLoRAConfig(**PACKAGE_MIX))
    else:
        model = lv.attach(small_llama(0), LoRAConfig(r=lora_r, target_modules=ALL_LINEAR))
    _randomise(model)
    model.train()
    ids = torch.randint(0, 1024, (batch, seq), generator=torch.Generator().manual_seed(0))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    gc.collect()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # Linux: reset the peak resident set (VmHWM) to the current one
    before = _status_kib("VmRSS")
    loss = model(input_ids=ids, labels=ids).loss + lv.aux_loss(model)
    loss.backward()
    optimizer.step()
    peak = _status_kib("VmHWM")
    print(trainable(model), (peak - before) / 1024, peak / 1024)


def part_memory(args) -> None:
    mix_params = trainable(lv.attach(small_llama(0), MixLoRAConfig(**PACKAGE_MIX)))
    lora_r = lora_rank_matching(mix_params)
    rows = {}
    for name in ("lora", "mixlora"):
        probe = [sys.executable, __file__, "--memory-probe", name]
        probe += [str(args.package_batch), str(args.package_seq), str(lora_r)]
        # glibc keeps freed memory resident unless every large block is its own mapping; with
        # this the peak resident set follows the live tensors (without it, repeated runs of one
        # contender differed by 60%)
        env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
        out = subprocess.run(probe, capture_output=True, text=True, check=True, env=env).stdout
        params, rise, peak = out.split()
        rows[name] = (int(params), float(rise), float(peak))
    print(
        f"\nmemory: one training step (forward, loss + balance loss, backward, AdamW), Llama 4 "
        f"layers d=256, {args.package_batch} x {args.package_seq} tokens, fp32; each in a fresh "
        "process"
    )
    for name, (params, rise, peak) in rows.items():
        what = "MixLoRA E=8 top-2 r=8" if name == "mixlora" else f"LoRA r={lora_r} (q,k,v,o,FFN)"
        print(
            f"{name:>8} ({what}): {params:,} adapter parameters, step peak +{rise:.0f} MiB "
            f"(peak RSS {peak:.0f} MiB)"
        )
    ratio = rows["mixlora"][1] / rows["lora"][1]
    print(f"MixLoRA / LoRA, training-step peak (rise): {ratio:.2f}x")
    print(f"MixLoRA / LoRA, peak RSS: {rows['mixlora'][2] / rows['lora'][2]:.2f}x")


def part_profile(args) -> None:
    import resource

    from torch.profiler import ProfilerActivity, profile

    model = lv.attach(small_llama(0), MixLoRAConfig(**PACKAGE_MIX))
    _randomise(model)
    ids = torch.randint(
        0, 1024, (args.package_batch, args.package_seq), generator=torch.Generator().manual_seed(0)
    )

    def forward() -> None:
        with torch.no_grad():
            model(input_ids=ids)

    def train_step() -> None:
        (model(input_ids=ids, labels=ids).loss + lv.aux_loss(model)).backward()
        model.zero_grad(set_to_none=True)

    for what, mode, fn in (("eval forward", False, forward), ("training step", True, train_step)):
        model.train(mode)
        fn()  # warm-up
        faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        fn()
        faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(args.repeats):
                fn()
        events = prof.key_averages()
        total = sum(e.self_cpu_time_total for e in events)
        experts = sum(e.cpu_time_total for e in events if e.key == "_Experts")
        print(
            f"\nprofile, {what} (MixLoRA E=8 top-2 r=8, {args.package_batch} x "
            f"{args.package_seq} tokens, {args.repeats} runs): the expert Function (_Experts, "
            f"forward) {100 * experts / total:.0f}% of the self CPU time; {faults} page faults "
            "in one run"
        )
        for e in sorted(events, key=lambda e: -e.self_cpu_time_total)[:12]:
            share = 100 * e.self_cpu_time_total / total
            print(f"{e.key:>45}: {share:5.1f}%  ({e.count // args.repeats} calls per run)")


PARTS = {
    "dispatch": part_dispatch,
    "package": part_package,
    "memory": part_memory,
    "profile": part_profile,
}


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--memory-probe":
        name, batch, seq, lora_r = sys.argv[2:6]
        _memory_probe(name, int(batch), int(seq), int(lora_r))
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--parts", nargs="+", default=list(PARTS), choices=list(PARTS))
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--r", type=int, default=8, help="MultiLoRA branch rank (LoRA gets 4r)")
    parser.add_argument("--package-batch", type=int, default=4)
    parser.add_argument("--package-seq", type=int, default=512)
    args = parser.parse_args()
    print(
        f"machine: {platform.processor() or platform.machine()}, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads"
    )
    for name in args.parts:
        PARTS[name](args)


if __name__ == "__main__":
    main()
