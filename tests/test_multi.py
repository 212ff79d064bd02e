"""Concurrent multi-adapter training: exact gradients, same losses as sequential runs."""

from __future__ import annotations

import pytest
import torch
from _train_script import random_blocks
from conftest import make_tiny_llama
from torch import nn
from torch.testing import assert_close

import loravariants as lv
from loravariants.adapters import LoRAConfig
from loravariants.multi import Job, causal_lm_loss, train_concurrent
from loravariants.train import TrainConfig, train


class FixedMaskDropout(nn.Module):
    """Dropout whose mask depends only on the input shape: the same rows get the same mask
    whether they run fused with other adapters' rows or alone."""

    def __init__(self, p: float, seed: int) -> None:
        super().__init__()
        self.p, self.seed, self.masks = p, seed, {}

    def forward(self, x):
        key = tuple(x.shape)
        if key not in self.masks:
            g = torch.Generator().manual_seed(self.seed)
            self.masks[key] = (torch.rand(key, generator=g) >= self.p).float() / (1 - self.p)
        return x * self.masks[key]


def _two_adapter_model():
    model = make_tiny_llama()
    lv.attach(model, LoRAConfig(r=4, dropout=0.1, init="random"), name="a")
    lv.attach(
        model,
        LoRAConfig(r=2, dropout=0.1, init="random", target_modules=["k_proj", "o_proj"]),
        name="b",
    )
    for i, (_, _, layer) in enumerate(lv.iter_adapters(model)):
        layer.dropout = FixedMaskDropout(0.1, seed=i)
    return model.train()


def test_fused_gradients_equal_per_adapter_loop_with_dropout():
    model = _two_adapter_model()
    batch = torch.randint(0, 128, (4, 12), generator=torch.Generator().manual_seed(0))
    rows = {"a": slice(0, 2), "b": slice(2, 4)}
    with lv.route_rows(rows):
        logits = model(input_ids=batch).logits
    sum(causal_lm_loss(logits[r], batch[r]) for r in rows.values()).backward()
    fused = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad()
    for name, r in rows.items():
        lv.set_active_adapters(model, [name])
        causal_lm_loss(model(input_ids=batch[r]).logits, batch[r]).backward()
    lv.set_active_adapters(model, None)
    assert any("b" in n for n in fused) and len(fused) == 16
    for n, p in model.named_parameters():
        if p.requires_grad:
            assert p.grad.abs().sum() > 0
            assert_close(fused[n], p.grad, atol=1e-6, rtol=1e-5, msg=n)


def test_concurrent_losses_equal_sequential_runs():
    configs = {
        "a": (
            LoRAConfig(r=4, init="kaiming"),
            TrainConfig(max_steps=4, batch_size=2, grad_accum=2, lr=1e-2, warmup_steps=1, seed=1),
        ),
        "b": (
            LoRAConfig(r=2, target_modules=["k_proj"]),
            TrainConfig(
                max_steps=3,
                batch_size=3,
                grad_accum=2,
                lr=5e-3,
                warmup_steps=0,
                seed=2,
                schedule="cosine",
            ),
        ),
    }
    # masked prompts and 2 micro-batches: both loops weigh micro-batches by label tokens
    data = {"a": random_blocks(seed=5, masked=True), "b": random_blocks(seed=6, masked=True)}
    together = make_tiny_llama()
    for name, (adapter, _) in configs.items():
        lv.attach(together, adapter, name=name)
    init = {k: v.clone() for k, v in together.state_dict().items() if "adapters" in k}
    results = train_concurrent(
        together, [Job(n, data[n], c) for n, (_, c) in configs.items()], progress=False
    )
    for name, (adapter, config) in configs.items():
        alone = lv.attach(make_tiny_llama(), adapter, name=name)
        alone.load_state_dict(
            {**alone.state_dict(), **{k: v for k, v in init.items() if f".{name}." in k}}
        )
        expected = train(alone, data[name], config, progress=False)
        assert len(results[name].losses) == config.max_steps
        assert_close(
            torch.tensor(results[name].losses), torch.tensor(expected.losses), atol=2e-5, rtol=1e-5
        )
        for k, v in alone.state_dict().items():
            if ".adapters." in k:
                assert_close(together.state_dict()[k], v, atol=1e-5, rtol=1e-4, msg=k)


def test_concurrent_rejects_bad_jobs():
    model = make_tiny_llama()
    lv.attach(model, LoRAConfig(), name="a")
    cfg = TrainConfig(max_steps=1)
    with pytest.raises(ValueError, match="no adapter named"):
        train_concurrent(model, [Job("z", random_blocks(), cfg)], progress=False)
    with pytest.raises(ValueError, match="one job"):
        train_concurrent(model, [Job("a", random_blocks(), cfg)] * 2, progress=False)
    lv.mark_trainable(model, ["model.norm"])
    with pytest.raises(ValueError, match="cannot share trainable base modules"):
        train_concurrent(model, [Job("a", random_blocks(), cfg)], progress=False)


def _four_variant_model(dropout: float, cola_knots=(2,)):
    from loravariants.adapters import COLAConfig, MixLoRAConfig, MultiLoRAConfig

    model = make_tiny_llama()
    lv.attach(model, LoRAConfig(r=4, dropout=dropout, init="random"), name="lora")
    lv.attach(
        model, COLAConfig(r=2, dropout=dropout, init="random", knots=list(cola_knots)), name="cola"
    )
    lv.attach(
        model,
        MultiLoRAConfig(num_branches=3, r=2, dropout=dropout, target_modules=["q_proj", "o_proj"]),
        name="multi",
    )
    lv.attach(
        model,
        MixLoRAConfig(num_experts=4, top_k=2, r=2, dropout=dropout, expert_dropout=dropout),
        name="mix",
    )
    seed = 0
    for _, _, layer in lv.iter_adapters(model):
        for child_name, child in list(layer.named_modules()):
            if isinstance(child, nn.Dropout):
                parent = (
                    layer.get_submodule(child_name.rpartition(".")[0])
                    if "." in child_name
                    else layer
                )
                setattr(parent, child_name.rpartition(".")[2], FixedMaskDropout(dropout, seed))
                seed += 1
    # MultiLoRA's paper init has zero scales: give them values so every branch gets gradients
    for _, _, layer in lv.iter_adapters(model, "multi"):
        with torch.no_grad():
            layer.scales.normal_()
    return model.train()


def test_fused_gradients_equal_loop_for_all_four_variants():
    model = _four_variant_model(dropout=0.1)
    assert sum(isinstance(m, FixedMaskDropout) for m in model.modules()) > 0
    batch = torch.randint(0, 128, (8, 10), generator=torch.Generator().manual_seed(7))
    rows = {n: slice(2 * i, 2 * i + 2) for i, n in enumerate(["lora", "cola", "multi", "mix"])}

    def losses_of(logits_by_name):
        return sum(
            causal_lm_loss(logits, batch[rows[n]]) + lv.aux_loss(model, n)
            for n, logits in logits_by_name.items()
        )

    with lv.route_rows(rows):
        logits = model(input_ids=batch).logits
    losses_of({n: logits[r] for n, r in rows.items()}).backward()
    fused = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad()
    for name, r in rows.items():
        lv.set_active_adapters(model, [name])
        losses_of({name: model(input_ids=batch[r]).logits}).backward()
    lv.set_active_adapters(model, None)
    for n, p in model.named_parameters():
        if p.requires_grad:
            assert p.grad is not None, n
            assert_close(fused[n], p.grad, atol=1e-6, rtol=1e-5, msg=n)


def test_cola_restart_in_one_job_leaves_the_others_alone():
    """Same run with and without a COLA knot at step 2: the other adapters end bit-identical
    after step 3 (which uses their Adam state, so a stray reset would show); COLA differs."""
    cfg = TrainConfig(max_steps=3, batch_size=1, lr=1e-2, warmup_steps=0)
    names = ("lora", "cola", "multi", "mix")
    finals = []
    for knots in ([2], [100]):
        model = _four_variant_model(dropout=0.0, cola_knots=knots)
        train_concurrent(model, [Job(n, random_blocks(), cfg) for n in names], progress=False)
        finals.append({k: v.clone() for k, v in model.state_dict().items()})
    with_knot, without = finals
    for key, value in with_knot.items():
        if ".adapters.cola." in key or key.endswith("base_layer.weight") and "proj" in key:
            continue
        assert torch.equal(value, without[key]), key
    cola = [k for k in with_knot if ".adapters.cola.lora_B" in k]
    assert cola and any(not torch.equal(with_knot[k], without[k]) for k in cola)
