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
        # the hooks ran (and LoRA, MultiLoRA need none): no warning
        warnings.simplefilter("error", UserWarning)
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


SFT_VARIANTS = [
    "cola",
    "mixlora",
    pytest.param("lora", marks=pytest.mark.slow),
    pytest.param("multilora", marks=pytest.mark.slow),
]


@pytest.mark.parametrize("variant", SFT_VARIANTS)
def test_sft_trainer_steps_equal_our_loop(tmp_path, variant):
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    from loravariants.data.tokenizer import train_tokenizer

    vocab = 300
    tokenizer = train_tokenizer(["alpha beta gamma delta"] * 4, vocab_size=vocab)
    dataset, config = rows_dataset(vocab=vocab), train_config()
    mine = lv.attach(make_tiny_llama(vocab_size=vocab), CONFIGS[variant]())
    result = train(mine, dataset, config, progress=False)
    expected = [a + b for a, b in zip(result.losses, result.aux_losses, strict=True)]
    model = lv.attach(make_tiny_llama(vocab_size=vocab), CONFIGS[variant]()).train()
    rows = [{"input_ids": r["input_ids"].tolist()} for r in in_our_order(dataset, config)]
    args = trainer_args(tmp_path, config).to_dict()
    args = SFTConfig(**{k: v for k, v in args.items() if k in SFTConfig.__dataclass_fields__})
    args.dataset_kwargs = {"skip_prepare_dataset": True}  # rows are tokenized already
    trainer = SFTTrainer(
        model=model,
        args=args,
        train_dataset=Dataset.from_list(rows),
        processing_class=tokenizer,
        callbacks=[LoRAVariantsCallback()],
    )
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        trainer.train()
    assert_close(torch.tensor(logged_losses(trainer)), torch.tensor(expected), atol=2e-5, rtol=0)
    theirs, want = adapter_tensors(model), adapter_tensors(mine)
    for key in want:
        assert_close(theirs[key], want[key], atol=2e-5, rtol=1e-4, msg=key)


@pytest.mark.parametrize("variant", ["cola", "mixlora"])
def test_a_variant_that_needs_the_hooks_warns_once_without_the_callback(tmp_path, variant):
    dataset, config = rows_dataset(), train_config()
    model = attached(variant)
    trainer = Trainer(
        model=model,
        args=trainer_args(tmp_path, config),
        train_dataset=in_our_order(dataset, config),
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.train()
    ours = [str(w.message) for w in caught if "LoRAVariantsCallback" in str(w.message)]
    assert len(ours) == 1, ours
    assert "\n" not in ours[0] and f"({variant})" in ours[0]
    assert ("on_step_end" if variant == "cola" else "aux_loss") in ours[0]


def test_restart_lr_schedule_is_refused_in_one_line(tmp_path):
    dataset, config = rows_dataset(), train_config(steps=2)
    model = lv.attach(make_tiny_llama(), COLAConfig(r=2, knots=[1], restart_lr_schedule=True))
    trainer = Trainer(
        model=model,
        args=trainer_args(tmp_path, config),
        train_dataset=in_our_order(dataset, config),
        callbacks=[LoRAVariantsCallback()],
    )
    with pytest.raises(ValueError, match=r"restart_lr_schedule=True.*loravariants.train"):
        trainer.train()


# -- saving and resuming through the Trainer ---------------------------------------------------


def test_save_pretrained_writes_the_adapters_that_load_adapter_reads(tmp_path, tokens):
    model = attached("cola")
    train(model, rows_dataset(), train_config(steps=3), progress=False)  # one knot passed
    model.eval()
    model.save_pretrained(tmp_path / "a")
    names = sorted(p.name for p in (tmp_path / "a").iterdir())
    assert names == ["adapter_model.safetensors", "loravariants_config.json", "model.safetensors"]
    fresh = lv.load_adapter(make_tiny_llama(), tmp_path / "a")
    assert int(next(iter(lv.adapter_layers(fresh).values())).link_index) == 1
    assert_close(fresh(tokens).logits, model(tokens).logits)
    # model.safetensors: the adapter tensors under the model's own names, for Trainer's resume
    resume = load_file(tmp_path / "a" / "model.safetensors")
    assert "model.layers.0.self_attn.q_proj.adapters.default.chain_A" in resume
    assert not any(k.endswith("base_layer.weight") for k in resume)  # never the frozen base


def test_save_pretrained_peft_format_loads_in_peft(tmp_path, tokens):
    import peft

    model = attached("lora")
    train(model, rows_dataset(), train_config(steps=2), progress=False)
    model.eval().save_pretrained(tmp_path / "p", format="peft")
    theirs = peft.PeftModel.from_pretrained(make_tiny_llama(), tmp_path / "p")
    assert_close(theirs(tokens).logits, model(tokens).logits, atol=1e-5, rtol=1e-5)


def test_save_pretrained_keeps_other_files_and_never_replaces_a_full_model(tmp_path):
    (tmp_path / "tokenizer.json").write_text("{}")
    model = attached("lora")
    model.save_pretrained(tmp_path)
    assert (tmp_path / "tokenizer.json").read_text() == "{}"
    full = tmp_path / "full"
    make_tiny_llama().save_pretrained(full)
    before = (full / "model.safetensors").read_bytes()
    with pytest.raises(ValueError, match="not a loravariants adapter checkpoint"):
        model.save_pretrained(full)
    assert (full / "model.safetensors").read_bytes() == before
    assert not (full / "loravariants_config.json").exists()


def test_loading_a_checkpoint_into_other_adapters_is_refused_in_one_line(tmp_path):
    attached("lora").save_pretrained(tmp_path)
    other = lv.attach(make_tiny_llama(), LoRAConfig(r=4, target_modules=["k_proj"]))
    with pytest.raises(ValueError, match=r"no tensors for adapter 'default'.*attach the ones"):
        other.load_state_dict(load_file(tmp_path / "model.safetensors"), strict=False)


def test_trainer_save_model_and_checkpoints_write_the_adapters(tmp_path):
    dataset, config = rows_dataset(), train_config(steps=2)
    model = attached("mixlora")
    trainer = Trainer(
        model=model,
        args=trainer_args(tmp_path, config, save_strategy="steps", save_steps=1),
        train_dataset=in_our_order(dataset, config),
        callbacks=[LoRAVariantsCallback()],
    )
    trainer.train()
    trainer.save_model()
    for folder in (tmp_path / "checkpoint-1", tmp_path / "checkpoint-2", tmp_path):
        assert (folder / "loravariants_config.json").is_file(), folder
        assert (folder / "model.safetensors").is_file(), folder
    assert (tmp_path / "checkpoint-2" / "optimizer.pt").is_file()
    fresh = lv.load_adapter(make_tiny_llama(), tmp_path)
    want, got = adapter_tensors(model), adapter_tensors(fresh)
    for key in want:
        assert torch.equal(got[key], want[key]), key


def resume_matches_uninterrupted(tmp_path, variant: str) -> None:
    """5 steps with a checkpoint at 3, then a fresh model resumed from it: steps 4-5 and the
    final adapters equal the uninterrupted run's (COLA: the knot at 4 falls after the resume)."""
    dataset, config = rows_dataset(), train_config(steps=5)
    order = in_our_order(dataset, config)
    whole = attached(variant)
    args = trainer_args(tmp_path / "run", config, save_strategy="steps", save_steps=3)
    first = Trainer(model=whole, args=args, train_dataset=order, callbacks=[LoRAVariantsCallback()])
    first.train()
    model = attached(variant)  # a new process would start like this: a fresh base, attached
    at_start = adapter_tensors(model)
    resumed = Trainer(
        model=model, args=args, train_dataset=order, callbacks=[LoRAVariantsCallback()]
    )
    resumed.train(resume_from_checkpoint=str(tmp_path / "run" / "checkpoint-3"))
    assert_close(
        torch.tensor(logged_losses(resumed)[3:]),  # 1-3: the checkpoint's history
        torch.tensor(logged_losses(first)[3:]),
        atol=1e-6,
        rtol=0,
    )
    want, got = adapter_tensors(whole), adapter_tensors(model)
    assert any(not torch.equal(at_start[k], got[k]) for k in got if k in at_start)
    for key in want:
        assert_close(got[key], want[key], atol=1e-6, rtol=0, msg=key)
    if variant == "cola":
        assert int(next(iter(lv.adapter_layers(model).values())).link_index) == 2


@pytest.mark.parametrize("variant", ["cola", "mixlora"])
def test_a_resumed_trainer_run_equals_an_uninterrupted_one(tmp_path, variant):
    resume_matches_uninterrupted(tmp_path, variant)


@pytest.mark.slow
@pytest.mark.parametrize("variant", ["lora", "multilora"])
def test_a_resumed_trainer_run_equals_an_uninterrupted_one_slow(tmp_path, variant):
    resume_matches_uninterrupted(tmp_path, variant)


# -- coexisting with peft ----------------------------------------------------------------------


def test_get_peft_model_on_our_adapters_is_refused_in_one_line(tokens):
    import peft
    from peft.tuners.tuners_utils import BaseTunerLayer

    model = attached("lora").eval()
    before = model(tokens).logits
    config = peft.LoraConfig(r=2, target_modules=["q_proj", "v_proj"])
    with pytest.raises(ValueError, match=r"^peft cannot wrap .*lv.merge_and_unload") as err:
        peft.get_peft_model(model, config)
    assert "\n" not in str(err.value)
    assert not any(isinstance(m, BaseTunerLayer) for m in model.modules())
    assert_close(model(tokens).logits, before)
    # a plain attribute probe of ours is still an AttributeError
    host = model.model.layers[0].self_attn.q_proj
    assert not hasattr(host, "no_such_attribute")
