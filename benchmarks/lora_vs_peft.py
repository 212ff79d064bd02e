"""Forward+backward time of our LoRA vs peft's LoRA on the same tiny Llama, measured side by side.

    python benchmarks/lora_vs_peft.py [--repeats 30] [--batch 4] [--seq 128]

Both models start from the same weights and the same A, B; the script checks that their losses
agree before timing, then prints median seconds per step (interleaved) and the ratio.
"""

from __future__ import annotations

import argparse
import platform

import peft
import torch
from _timing import interleaved_medians, small_llama
from transformers import LlamaForCausalLM

import loravariants as lv
from loravariants.adapters import LoRAConfig


def build(seed: int = 0) -> LlamaForCausalLM:
    return small_llama(seed)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=128)
    args = parser.parse_args()
    torch.set_num_threads(torch.get_num_threads())
    targets = ["q_proj", "k_proj", "v_proj", "o_proj"]
    ours = lv.attach(build(), LoRAConfig(r=8, alpha=16, init="random", target_modules=targets))
    theirs = peft.get_peft_model(
        build(), peft.LoraConfig(r=8, lora_alpha=16, target_modules=targets)
    )
    for path, layer in lv.adapter_layers(ours).items():
        target = theirs.base_model.model.get_submodule(path)
        target.lora_A["default"].weight.data.copy_(layer.lora_A.data)
        target.lora_B["default"].weight.data.copy_(layer.lora_B.data)
    ours.train()
    theirs.train()
    batch = torch.randint(
        0, 1024, (args.batch, args.seq), generator=torch.Generator().manual_seed(0)
    )

    def step(model):
        def run():
            loss = model(input_ids=batch, labels=batch).loss
            loss.backward()
            model.zero_grad(set_to_none=True)
            return loss

        return run

    loss_ours = ours(input_ids=batch, labels=batch).loss.item()
    loss_theirs = theirs(input_ids=batch, labels=batch).loss.item()
    assert abs(loss_ours - loss_theirs) < 1e-4, (loss_ours, loss_theirs)
    medians = interleaved_medians({"loravariants": step(ours), "peft": step(theirs)}, args.repeats)
    print(
        f"machine: {platform.processor() or platform.machine()}, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads; batch {args.batch} x {args.seq} tokens, "
        f"Llama 4 layers d=256, LoRA r=8 on q,k,v,o; losses agree ({loss_ours:.5f})"
    )
    for name, seconds in medians.items():
        print(f"{name:>13}: {1000 * seconds:8.2f} ms / forward+backward (median of {args.repeats})")
    print(f"ratio peft / loravariants: {medians['peft'] / medians['loravariants']:.3f}x")


if __name__ == "__main__":
    main()
