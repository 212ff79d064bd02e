"""COLA: chain of LoRA links with merge-and-restart, on a tiny Llama."""

from __future__ import annotations

import pytest
import torch
from conftest import make_tiny_llama
from torch import nn
from torch.testing import assert_close

import loravariants as lv
from loravariants.adapters.cola import (
    COLAConfig,
    COLALinear,
    knots_from_chain_length,
    knots_from_epochs,
    restart,
)
from loravariants.adapters.lora import LoRAConfig

TARGETS = ["q_proj", "v_proj"]


def _weights(model: nn.Module) -> dict[str, torch.Tensor]:
    return {p: layer.base.weight.detach().clone() for p, layer in lv.adapter_layers(model).items()}


def _train(model, tokens, steps: int, lr: float = 1e-2, seed: int = 0):
    """A real AdamW loop with lv.on_step_end after every step; returns the losses."""
    torch.manual_seed(seed)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr)
    losses = []
    for step in range(1, steps + 1):
        loss = model(tokens, labels=tokens).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        lv.on_step_end(model, step, opt)
        losses.append(loss.item())
    model.eval()
    return losses, opt


def test_knot_helpers():
    assert knots_from_chain_length(3, 300) == [100, 200]
    assert knots_from_chain_length(1, 10) == []
    assert knots_from_epochs(10, 5) == [10, 20, 30, 40]
    assert knots_from_epochs(10, 5, chain_length=3) == [20, 30]
    assert COLAConfig(chain_length=2, total_steps=9).schedule() == [4]
    assert COLAConfig(knots=[3, 7]).schedule() == [3, 7]
    assert COLAConfig().schedule() == []


def test_restart_keeps_logits_and_zeroes_new_b(tokens):
    model = make_tiny_llama()
    lv.attach(model, COLAConfig(r=4, init="random", target_modules=TARGETS))
    before = model(tokens).logits
    layers = lv.adapter_layers(model)
    old_A = {p: layer.lora_A.detach().clone() for p, layer in layers.items()}
    params = restart(model)
    assert len(params) == 2 * len(layers)
    assert_close(model(tokens).logits, before, atol=1e-6, rtol=0)
    for p, layer in layers.items():
        assert int(layer.link_index) == 1
        assert torch.count_nonzero(layer.lora_B) == 0
        assert not torch.equal(layer.lora_A, old_A[p])  # A redrawn
        assert layer.chain_A.shape == (4, 32) and layer.chain_B.shape[1] == 4


def test_chain_length_one_equals_lora(tokens):
    losses = {}
    for name, config in {
        "lora": LoRAConfig(r=4, target_modules=TARGETS),
        "cola": COLAConfig(r=4, target_modules=TARGETS, chain_length=1, total_steps=6),
    }.items():
        model = make_tiny_llama()
        torch.manual_seed(123)
        lv.attach(model, config)
        losses[name], _ = _train(model, tokens, steps=6)
    assert losses["lora"] == losses["cola"]
    assert losses["lora"][-1] < losses["lora"][0]


def test_accumulated_update_equals_weight_change(tokens):
    model = make_tiny_llama()
    torch.manual_seed(0)
    lv.attach(model, COLAConfig(r=4, target_modules=TARGETS, knots=[2, 4]))
    w0 = _weights(model)
    _train(model, tokens, steps=6)
    layers = lv.adapter_layers(model)
    assert all(int(layer.link_index) == 2 for layer in layers.values())
    assert all(layer.chain_A.shape[0] == 8 for layer in layers.values())
    logits = model(tokens).logits
    lv.merge(model)  # folds the current link only
    assert_close(model(tokens).logits, logits, atol=1e-5, rtol=0)
    for p, layer in layers.items():
        dw = layer.base.weight.detach() - w0[p]
        assert_close(layer.delta_weight(), dw, atol=1e-6, rtol=0)
        B, A = layer.factors()
        assert B.shape[1] == A.shape[0] == 12  # three links of rank 4
        assert_close(B @ A, dw, atol=1e-6, rtol=0)
    lv.unmerge(model)
    assert_close(model(tokens).logits, logits, atol=1e-5, rtol=0)


def test_optimizer_state_reset_at_knot(tokens):
    model = make_tiny_llama()
    lv.attach(model, COLAConfig(r=4, target_modules=TARGETS, knots=[2]))
    layer = next(iter(lv.adapter_layers(model).values()))
    A, B = layer.lora_A, layer.lora_B
    _, opt = _train(model, tokens, steps=2)
    # restarted after step 2: same Parameter objects, state gone, B zero again
    assert layer.lora_A is A and layer.lora_B is B
    assert A not in opt.state and B not in opt.state
    assert torch.count_nonzero(B) == 0
    params_in_opt = {id(p) for g in opt.param_groups for p in g["params"]}
    assert id(A) in params_in_opt and id(B) in params_in_opt
    # the new link trains with the same optimizer
    loss = model(tokens, labels=tokens).loss
    loss.backward()
    opt.step()
    assert torch.count_nonzero(B) > 0 and opt.state[A]["step"] == 1


def test_no_reset_keeps_state_when_rank_unchanged(tokens):
    model = make_tiny_llama()
    lv.attach(model, COLAConfig(r=4, target_modules=TARGETS, knots=[1], reset_optimizer=False))
    layer = next(iter(lv.adapter_layers(model).values()))
    _, opt = _train(model, tokens, steps=1)
    assert layer.lora_A in opt.state and int(layer.link_index) == 1


def test_rank_step_down_keeps_parameters_and_trains(tokens):
    model = make_tiny_llama()
    config = COLAConfig(
        r=8, target_modules=TARGETS, knots=[2, 3], link_ranks=[8, 2], reset_optimizer=False
    )
    lv.attach(model, config)
    layer = next(iter(lv.adapter_layers(model).values()))
    A = layer.lora_A
    w0 = _weights(model)
    losses, opt = _train(model, tokens, steps=5)
    assert layer.lora_A is A and A.shape == (2, 32) and layer.r == 2
    assert layer.chain_A.shape == (8 + 2, 32)  # links of rank 8 and 2 folded
    assert opt.state[A]["exp_avg"].shape == (2, 32)  # state rebuilt at the new shape
    assert all(torch.isfinite(torch.tensor(losses)))
    p, lay = next(iter(lv.adapter_layers(model).items()))
    lay.merge()
    assert_close(lay.delta_weight(), lay.base.weight.detach() - w0[p], atol=1e-6, rtol=0)


def test_native_save_load_folds_chain_into_fresh_base(tokens, tmp_path):
    model = make_tiny_llama()
    lv.attach(model, COLAConfig(r=4, init="random", target_modules=TARGETS, knots=[5]))
    restart(model)
    with torch.no_grad():  # a non-zero current link too
        for layer in lv.adapter_layers(model).values():
            layer.lora_B.normal_()
    expected = model(tokens).logits
    factors = {p: layer.factors() for p, layer in lv.adapter_layers(model).items()}
    lv.save_adapter(model, tmp_path / "cola", format="native")
    fresh = make_tiny_llama()
    lv.load_adapter(fresh, tmp_path / "cola")
    assert_close(fresh(tokens).logits, expected, atol=1e-5, rtol=0)
    for p, layer in lv.adapter_layers(fresh).items():
        assert int(layer.link_index) == 1
        for got, want in zip(layer.factors(), factors[p], strict=True):
            assert_close(got, want)
    # loading again onto the same model replaces the chain instead of adding it twice
    lv.load_adapter(fresh, tmp_path / "cola")
    assert_close(fresh(tokens).logits, expected, atol=1e-5, rtol=0)
    # factors straight from the files
    from loravariants.io import read_factors

    read = read_factors(tmp_path / "cola")
    for p, (B, A) in factors.items():
        assert_close(read[p][0] @ read[p][1], B @ A)


def test_peft_export_is_whole_chain(tokens, tmp_path):
    model = make_tiny_llama()
    lv.attach(model, COLAConfig(r=4, init="random", target_modules=TARGETS))
    restart(model)
    with torch.no_grad():
        for layer in lv.adapter_layers(model).values():
            layer.lora_B.normal_()
    expected = model(tokens).logits
    lv.save_adapter(model, tmp_path / "peft", format="peft")
    fresh = make_tiny_llama()
    lv.load_adapter(fresh, tmp_path / "peft")
    assert_close(fresh(tokens).logits, expected, atol=1e-5, rtol=0)


def test_lossy_dtype_warns():
    base = nn.Linear(8, 6, bias=False).to(torch.bfloat16)
    layer = COLALinear(base, COLAConfig(r=2, init="random", target_modules=["x"]))
    with pytest.warns(UserWarning, match="bfloat16"):
        layer.restart()


def test_restart_refuses_merged_link():
    layer = COLALinear(nn.Linear(8, 6, bias=False), COLAConfig(r=2, target_modules=["x"]))
    layer.merge()
    with pytest.raises(ValueError, match="unmerge"):
        layer.restart()


def test_new_link_draw_is_reproducible_and_per_module():
    """A new link's A depends on the seed, module and link index, not on the RNG's history."""
    draws = []
    for extra_draws in (0, 5):
        torch.manual_seed(42)
        model = make_tiny_llama()
        lv.attach(model, COLAConfig(r=4, target_modules=TARGETS))
        torch.manual_seed(42)
        torch.rand(extra_draws)  # e.g. dropout masks: must not change the new link
        restart(model)
        draws.append(
            {p: layer.lora_A.detach().clone() for p, layer in lv.adapter_layers(model).items()}
        )
    for p in draws[0]:
        assert torch.equal(draws[0][p], draws[1][p])
    q0, q1 = (
        draws[0]["model.layers.0.self_attn.q_proj"],
        draws[0]["model.layers.1.self_attn.q_proj"],
    )
    assert not torch.equal(q0, q1)
    bound = 1 / 32**0.5
    assert q0.abs().max() <= bound and q0.std() > bound / 4  # kaiming-uniform range, like LoRA


def test_detach_takes_the_chain_back_out(tokens):
    model = make_tiny_llama()
    reference = model(tokens).logits
    w0 = {n: p.detach().clone() for n, p in model.named_parameters()}
    lv.attach(model, COLAConfig(r=4, init="random", target_modules=TARGETS))
    restart(model)
    restart(model)
    lv.detach(model)
    for n, p in model.named_parameters():
        assert_close(p, w0[n], atol=1e-6, rtol=0, msg=n)
    assert_close(model(tokens).logits, reference, atol=1e-5, rtol=0)


def test_shared_frozen_module_is_never_written(tokens):
    """With another adapter on the same modules, restarts keep the chain out of W."""
    model = make_tiny_llama()
    w0 = {n: p.detach().clone() for n, p in model.named_parameters()}
    lv.attach(model, LoRAConfig(r=2, init="random", target_modules=TARGETS), name="other")
    lv.attach(model, COLAConfig(r=4, init="random", target_modules=TARGETS), name="cola")
    before = model(tokens).logits
    restart(model, "cola")
    restart(model, "cola")
    assert_close(model(tokens).logits, before, atol=1e-5, rtol=0)
    for n, p in model.named_parameters():
        if not p.requires_grad:
            assert torch.equal(p, w0[n.replace(".base_layer", "")]), n


def test_becoming_shared_unfolds_the_chain(tokens):
    model = make_tiny_llama()
    w0 = {n: p.detach().clone() for n, p in model.named_parameters()}
    lv.attach(model, COLAConfig(r=4, init="random", target_modules=TARGETS))
    restart(model)
    before = model(tokens).logits
    lv.attach(model, LoRAConfig(r=2, target_modules=TARGETS), name="zero_lora")  # B = 0
    assert_close(model(tokens).logits, before, atol=1e-5, rtol=0)
    for n, p in model.named_parameters():
        if not p.requires_grad:
            assert_close(p, w0[n.replace(".base_layer", "")], atol=1e-6, rtol=0, msg=n)
