"""MultiLoRA: parallel LoRA branches with learnable scales, on a tiny Llama."""

from __future__ import annotations

import pytest
import torch
from conftest import make_tiny_llama
from torch import nn
from torch.testing import assert_close

import loravariants as lv
from loravariants.adapters.lora import LoRAConfig, LoRALinear
from loravariants.adapters.multilora import MultiLoRAConfig, MultiLoRALinear

TARGETS = ["q_proj", "v_proj", "o_proj"]
SHAPES = ["scalar", "channel"]


def _randomise_scales(model: nn.Module) -> None:
    with torch.no_grad():
        for layer in lv.adapter_layers(model).values():
            layer.scales.normal_()


def _loop_update(layer: MultiLoRALinear, x: torch.Tensor) -> torch.Tensor:
    """Reference: one branch at a time."""
    out = 0
    for i in range(layer.num_branches):
        s = layer.scales[i]
        out = out + s * (x @ layer.lora_A[i].T @ layer.lora_B[i].T)
    return out * layer.scaling


@pytest.mark.parametrize("scale_shape", SHAPES)
def test_paper_init_leaves_logits_unchanged(tokens, scale_shape):
    model = make_tiny_llama()
    ref = model(tokens).logits
    lv.attach(
        model, MultiLoRAConfig(num_branches=3, r=2, scale_shape=scale_shape, target_modules=TARGETS)
    )
    layer = next(iter(lv.adapter_layers(model).values()))
    assert torch.count_nonzero(layer.lora_B) > 0  # B is random, only the scales are zero
    assert_close(model(tokens).logits, ref, rtol=0, atol=0)


@pytest.mark.parametrize("scale_shape", SHAPES)
def test_first_step_gradients(tokens, scale_shape):
    model = make_tiny_llama()
    lv.attach(
        model, MultiLoRAConfig(num_branches=3, r=2, scale_shape=scale_shape, target_modules=TARGETS)
    )
    model(tokens, labels=tokens).loss.backward()
    for layer in lv.adapter_layers(model).values():
        assert torch.count_nonzero(layer.lora_A.grad) == 0
        assert torch.count_nonzero(layer.lora_B.grad) == 0
        assert torch.count_nonzero(layer.scales.grad) > 0
        assert layer.scales.grad.shape == layer.scales.shape


def test_one_branch_lora_init_equals_lora():
    torch.manual_seed(0)
    base = nn.Linear(12, 10, bias=False)
    x = torch.randn(3, 5, 12)
    torch.manual_seed(7)
    lora = LoRALinear(base, LoRAConfig(r=4, alpha=8, target_modules=["x"]))
    torch.manual_seed(7)
    multi = MultiLoRALinear(
        base, MultiLoRAConfig(num_branches=1, r=4, alpha=8, init="lora", target_modules=["x"])
    )
    assert_close(multi.lora_A[0], lora.lora_A, rtol=0, atol=0)
    assert torch.equal(multi.scales, torch.ones(1))
    B = torch.randn(10, 4)
    with torch.no_grad():
        lora.lora_B.copy_(B)
        multi.lora_B[0].copy_(B)
    out_l, out_m = lora(x), multi(x)
    assert_close(out_m, out_l)
    g = torch.randn_like(out_l)
    (out_l * g).sum().backward()
    (out_m * g).sum().backward()
    assert_close(multi.lora_A.grad[0], lora.lora_A.grad)
    assert_close(multi.lora_B.grad[0], lora.lora_B.grad)


@pytest.mark.parametrize("scale_shape", SHAPES)
def test_merged_equals_unmerged(tokens, scale_shape):
    model = make_tiny_llama()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    lv.attach(
        model, MultiLoRAConfig(num_branches=3, r=2, scale_shape=scale_shape, target_modules=TARGETS)
    )
    _randomise_scales(model)
    expected = model(tokens).logits
    lv.merge(model)
    assert_close(model(tokens).logits, expected, atol=1e-5, rtol=1e-5)
    lv.unmerge(model)
    for k, v in before.items():
        key = k
        if k.endswith("proj.weight") and any(t in k for t in TARGETS):
            key = k.replace(".weight", ".base_layer.weight")
        assert_close(model.state_dict()[key], v, atol=1e-6, rtol=0)


@pytest.mark.parametrize("scale_shape", SHAPES)
def test_factors_match_delta_weight_and_update(scale_shape):
    torch.manual_seed(0)
    base = nn.Linear(12, 10, bias=False)
    layer = MultiLoRALinear(
        base,
        MultiLoRAConfig(
            num_branches=3, r=2, alpha=4, scale_shape=scale_shape, target_modules=["x"]
        ),
    )
    with torch.no_grad():
        layer.scales.normal_()
    B, A = layer.factors()
    assert B.shape == (10, 6) and A.shape == (6, 12)
    assert_close(B @ A, layer.delta_weight())
    x = torch.randn(4, 12)
    assert_close(layer.update(x), x @ (B @ A).T, atol=1e-5, rtol=1e-5)
    # the explicit construction of the paper: [s_1 B_1 ... s_n B_n] (alpha/r), [A_1; ...; A_n]
    blocks = []
    for i in range(3):
        s = layer.scales[i] if scale_shape == "scalar" else layer.scales[i][:, None]
        blocks.append(s * layer.lora_B[i])
    assert_close(B, torch.cat(blocks, dim=1).detach() * 2.0)
    assert_close(A, torch.cat(list(layer.lora_A), dim=0).detach())


@pytest.mark.parametrize("scale_shape", SHAPES)
def test_many_branches_equal_branch_loop(scale_shape):
    torch.manual_seed(0)
    base = nn.Linear(24, 20, bias=False)
    layer = MultiLoRALinear(
        base, MultiLoRAConfig(num_branches=16, r=3, scale_shape=scale_shape, target_modules=["x"])
    )
    with torch.no_grad():
        layer.scales.normal_()
    x = torch.randn(2, 7, 24)
    fast = layer.update(x)
    slow = _loop_update(layer, x)
    assert_close(fast, slow, atol=1e-5, rtol=1e-5)
    g = torch.randn_like(fast)
    grads_fast = torch.autograd.grad((fast * g).sum(), [layer.lora_A, layer.lora_B, layer.scales])
    grads_slow = torch.autograd.grad((slow * g).sum(), [layer.lora_A, layer.lora_B, layer.scales])
    for a, b in zip(grads_fast, grads_slow, strict=True):
        assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_dropout_only_in_training():
    torch.manual_seed(0)
    layer = MultiLoRALinear(
        nn.Linear(8, 8, bias=False),
        MultiLoRAConfig(num_branches=2, r=2, dropout=0.5, target_modules=["x"]),
    )
    with torch.no_grad():
        layer.scales.fill_(1.0)
    x = torch.randn(4, 8)
    layer.eval()
    assert torch.equal(layer(x), layer(x))
    layer.train()
    assert not torch.equal(layer(x), layer(x))
