"""Forward+backward time of MixLoRA and MultiLoRA against their obvious alternatives, one run.

    python benchmarks/variants_speed.py [--repeats 10] [--batch 4] [--seq 256]

On one Llama (2 layers, d=256, FFN 688) with the same frozen weights:

* MixLoRA (E=8, k=2, sparse dispatch) vs the dense reference that runs every expert on every
  token and masks by the routing (the same function, checked before timing);
* MultiLoRA (n=4 branches of rank r, stacked: one rank-4r matmul pair) vs plain LoRA of rank
  4r, and vs a per-branch Python loop (the same function, checked before timing).

Median seconds per forward+backward over interleaved repeats, and the ratios.
"""

from __future__ import annotations

import argparse
import platform
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
        G, U, a0 = (t.reshape(-1, t.shape[-1]) for t in ctx)
        xt = x.reshape(-1, x.shape[-1])
        probs, weights, experts = self.route(xt)
        out = torch.zeros_like(xt)
        for e, expert in enumerate(self.experts):
            w = (weights * (experts == e)).sum(-1, keepdim=True)
            g = G + self._lora(expert, "gate_proj", xt)
            u = U + self._lora(expert, "up_proj", xt)
            a = base.act_fn(g) * u
            out = out + w * (base.down_proj(a) + self._lora(expert, "down_proj", a))
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--r", type=int, default=8, help="MultiLoRA branch rank (LoRA gets 4r)")
    args = parser.parse_args()

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
        f"machine: {platform.processor() or platform.machine()}, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads; batch {args.batch} x {args.seq} tokens; "
        f"Llama 2 layers d=256, FFN 688; adapters on q,k,v,o (+ FFN experts for MixLoRA)"
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


if __name__ == "__main__":
    main()
