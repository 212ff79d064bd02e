"""transformers' Trainer (with and without LoRAVariantsCallback) against loravariants.train.

Prints, per variant, the largest gaps over N steps between the Trainer's logged loss and our
loop's LM + aux loss, and between the adapters' weights, for the Trainer's torch AdamW
(``optim="adamw_torch"``, our loop's optimizer) and its default fused AdamW; then what the
Trainer trains without the callback (COLA's chain position, MixLoRA's missing balance term).

    PYTHONPATH=. python benchmarks/trainer_parity.py [--steps 5]
"""

from __future__ import annotations

import argparse
import tempfile
import warnings

import torch
from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainingArguments

import loravariants as lv
from loravariants.adapters import COLAConfig, LoRAConfig, MixLoRAConfig, MultiLoRAConfig
from loravariants.integrations.transformers import LoRAVariantsCallback
from loravariants.train import TrainConfig, global_rows, train

CONFIGS = {
    "lora": lambda: LoRAConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj"]),
    "cola": lambda: COLAConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj"], knots=[2, 4]),
    "multilora": lambda: MultiLoRAConfig(
        num_branches=2, r=2, alpha=4, target_modules=["q_proj", "v_proj"]
    ),
    "mixlora": lambda: MixLoRAConfig(
        num_experts=4, top_k=2, r=2, alpha=4, dropout=0.0, target_modules=["q_proj"]
    ),
}


def model_with(variant: str):
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=128,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
    )
    return lv.attach(LlamaForCausalLM(cfg), CONFIGS[variant]())


def adapter_tensors(model) -> dict[str, torch.Tensor]:
    return {
        f"{p}.{k}": t.detach().clone()
        for p, _, layer in lv.iter_adapters(model)
        for k, t in layer.adapter_state().items()
    }


def run_trainer(variant, rows, config, optim, callback):
    model = model_with(variant).train()
    with tempfile.TemporaryDirectory() as out:
        args = TrainingArguments(
            output_dir=out,
            max_steps=config.max_steps,
            per_device_train_batch_size=config.batch_size,
            gradient_accumulation_steps=config.grad_accum,
            learning_rate=config.lr,
            lr_scheduler_type="constant",
            adam_beta2=config.betas[1],
            optim=optim,
            train_sampling_strategy="sequential",
            logging_steps=1,
            save_strategy="no",
            report_to=[],
            disable_tqdm=True,
            use_cpu=True,
            seed=config.seed,  # COLA draws each new link's A from the process seed
        )
        callbacks = [LoRAVariantsCallback()] if callback else []
        trainer = Trainer(model=model, args=args, train_dataset=rows, callbacks=callbacks)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            trainer.train()
    losses = [r["loss"] for r in trainer.state.log_history if "loss" in r]
    return model, torch.tensor(losses)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=5)
    steps = parser.parse_args().steps
    config = TrainConfig(
        max_steps=steps, batch_size=2, grad_accum=2, lr=1e-2, warmup_steps=0, seed=0
    )
    ids = torch.randint(0, 128, (24, 16), generator=torch.Generator().manual_seed(1))
    dataset = [{"input_ids": r, "labels": r.clone()} for r in ids]
    order = global_rows(len(dataset), config.seed, 0, steps * 4)
    rows = [dataset[i] for i in order]
    print(f"{steps} steps, batch 2 x grad_accum 2, lr 1e-2, constant, clip 1.0, fp32 CPU")
    print(f"{'variant':10} {'optimizer':18} {'max |d loss|':>13} {'max |d weight|':>15}")
    for variant in CONFIGS:
        ours = model_with(variant).train()
        result = train(ours, dataset, config, progress=False)
        want = torch.tensor([a + b for a, b in zip(result.losses, result.aux_losses, strict=True)])
        for optim in ("adamw_torch", "adamw_torch_fused"):
            model, losses = run_trainer(variant, rows, config, optim, callback=True)
            a, b = adapter_tensors(model), adapter_tensors(ours)
            dw = max(float((a[k] - b[k]).abs().max()) for k in b)
            print(f"{variant:10} {optim:18} {float((losses - want).abs().max()):13.2e} {dw:15.2e}")
    print("without the callback:")
    cola, _ = run_trainer("cola", rows, config, "adamw_torch", callback=False)
    print(
        f"  cola: link_index {int(next(iter(lv.adapter_layers(cola).values())).link_index)}"
        f" after {steps} steps with knots [2, 4] (with the callback: 2)"
    )
    ours = model_with("mixlora").train()
    result = train(ours, dataset, config, progress=False)
    _, losses = run_trainer("mixlora", rows, config, "adamw_torch", callback=False)
    print(
        f"  mixlora: step-1 logged loss {float(losses[0]):.6f}; ours LM {result.losses[0]:.6f}"
        f" + aux {result.aux_losses[0]:.6f} = {result.losses[0] + result.aux_losses[0]:.6f}"
    )


if __name__ == "__main__":
    main()
