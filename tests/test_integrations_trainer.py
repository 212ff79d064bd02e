"""Every variant under transformers' Trainer and TRL's SFTTrainer, against our own loop.

The two sides share the optimizer implementation (torch AdamW, ``optim="adamw_torch"``), the
schedule (constant, no warm-up), clipping and the batches (the Trainer reads our loop's rows in
our loop's order, sequentially), so N Trainer steps must equal N steps of
``loravariants.train.train``: the logged loss is our LM loss plus our aux loss, and the
adapters' weights agree.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from conftest import make_tiny_llama
from safetensors.torch import load_file
from torch.testing import assert_close
from transformers import Trainer, TrainingArguments

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
STEPS, BATCH, ACCUM, SEQ = 5, 2, 2, 16


def rows_dataset(n: int = 24, vocab: int = 128, seed: int = 1) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (n, SEQ), generator=g)
    return [{"input_ids": row, "labels": row.clone()} for row in ids]


def attached(variant: str, **model_kwargs):
    model = lv.attach(make_tiny_llama(**model_kwargs), CONFIGS[variant]())
    return model.train()


def train_config(steps: int = STEPS) -> TrainConfig:
    return TrainConfig(
        max_steps=steps,
        batch_size=BATCH,
        grad_accum=ACCUM,
        lr=1e-2,
        warmup_steps=0,
        schedule="constant",
        betas=(0.9, 0.95),
        max_grad_norm=1.0,
        seed=0,
    )


def in_our_order(dataset, config: TrainConfig) -> list[dict[str, torch.Tensor]]:
    """The rows our loop reads, in its order: the Trainer reads them sequentially."""
    per_step = config.batch_size * config.grad_accum
    rows = global_rows(len(dataset), config.seed, 0, config.max_steps * per_step)
    return [dataset[i] for i in rows]


def trainer_args(out, config: TrainConfig, **overrides) -> TrainingArguments:
    fields = dict(
        output_dir=str(out),
        max_steps=config.max_steps,
        per_device_train_batch_size=config.batch_size,
        gradient_accumulation_steps=config.grad_accum,
        learning_rate=config.lr,
        lr_scheduler_type="constant",
        warmup_steps=0,
        weight_decay=0.0,
        adam_beta1=config.betas[0],
        adam_beta2=config.betas[1],
        max_grad_norm=config.max_grad_norm,
        optim="adamw_torch",  # our loop's torch.optim.AdamW, not the fused default
        train_sampling_strategy="sequential",
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        disable_tqdm=True,
        use_cpu=True,
        seed=0,
    )
    fields.update(overrides)
    return TrainingArguments(**fields)


def logged_losses(trainer) -> list[float]:
    return [row["loss"] for row in trainer.state.log_history if "loss" in row]


def adapter_tensors(model) -> dict[str, torch.Tensor]:
    return {
        f"{path}.{key}": t.detach().clone()
        for path, _, layer in lv.iter_adapters(model)
        for key, t in layer.adapter_state().items()
    }


def ours(variant: str, dataset, config: TrainConfig):
    model = attached(variant)
    result = train(model, dataset, config, progress=False)
    return model, [a + b for a, b in zip(result.losses, result.aux_losses, strict=True)], result


@pytest.mark.parametrize("variant", list(CONFIGS))
def test_trainer_steps_equal_our_loop(tmp_path, variant):
    dataset, config = rows_dataset(), train_config()
    mine, expected, result = ours(variant, dataset, config)
    model = attached(variant)
    trainer = Trainer(
        model=model,
        args=trainer_args(tmp_path, config),
        train_dataset=in_our_order(dataset, config),
        callbacks=[LoRAVariantsCallback()],
    )
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # the hooks ran: no warning
        trainer.train()
    assert_close(torch.tensor(logged_losses(trainer)), torch.tensor(expected), atol=2e-5, rtol=0)
    theirs, want = adapter_tensors(model), adapter_tensors(mine)
    assert theirs.keys() == want.keys()
    for key in want:
        assert_close(theirs[key], want[key], atol=2e-5, rtol=1e-4, msg=key)
    if variant == "mixlora":  # the balance term is in the logged loss, and it is not zero
        assert min(result.aux_losses) > 1e-3
    if variant == "cola":
        layer = next(iter(lv.adapter_layers(model).values()))
        assert int(layer.link_index) == 2  # knots 2 and 4 of 5 steps
        assert layer.chain_A.shape[0] == 2 * 4


def test_cola_resets_adam_at_the_knots(tmp_path):
    """At a knot the new link's Adam state is gone: one step later its step count is 1."""
    dataset, config = rows_dataset(), train_config(steps=3)
    model = lv.attach(make_tiny_llama(), CONFIGS["cola"]())
    seen: dict[int, float] = {}

    class Probe(LoRAVariantsCallback.__mro__[1]):  # a plain TrainerCallback after ours
        def on_step_end(self, args, state, control, optimizer=None, **kwargs):
            layer = next(iter(lv.adapter_layers(model).values()))
            st = optimizer.state.get(layer.lora_A, {})
            seen[state.global_step] = float(st["step"]) if "step" in st else 0.0

    trainer = Trainer(
        model=model,
        args=trainer_args(tmp_path, config),
        train_dataset=in_our_order(dataset, config),
        callbacks=[LoRAVariantsCallback(), Probe()],
    )
    trainer.train()
    # step 1: one Adam step; step 2 is the knot: state reset (0); step 3: 1 again
    assert seen == {1: 1.0, 2: 0.0, 3: 1.0}
