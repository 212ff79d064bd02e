"""LoRA layer and the shared adapter machinery (attach, merge, freezing), on a tiny Llama."""

from __future__ import annotations

import math

import peft
import pytest
import torch
from conftest import make_tiny_llama
from torch import nn
from torch.testing import assert_close

import loravariants as lv
from loravariants.adapters import LoRAConfig, LoRALinear


def test_zero_init_leaves_logits_unchanged(tiny_llama, tokens):
    ref = tiny_llama(tokens).logits
    lv.attach(tiny_llama, LoRAConfig(r=4, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]))
    assert_close(tiny_llama(tokens).logits, ref, rtol=0, atol=0)


def test_only_adapter_parameters_require_grad(tiny_llama):
    lv.attach(tiny_llama, LoRAConfig(r=4))
    trainable = {n for n, p in tiny_llama.named_parameters() if p.requires_grad}
    assert trainable and all(".adapters.default.lora_" in n for n in trainable)
    # 2 layers x (q, v) x (A: 4x32 + B: out x 4); v_proj out = 2 kv heads x 8 = 16
    expected = 2 * ((4 * 32 + 32 * 4) + (4 * 32 + 16 * 4))
    summary = lv.trainable_parameters(tiny_llama)
    assert summary.trainable == expected
    assert 0 < summary.percent < 100 and "trainable%" in str(summary)


def test_scaling_and_rslora():
    base = nn.Linear(6, 5, bias=False)
    assert LoRALinear(base, LoRAConfig(r=4, alpha=8, target_modules=["x"])).scaling == 2.0
    rs = LoRALinear(base, LoRAConfig(r=4, alpha=8, use_rslora=True, target_modules=["x"]))
    assert rs.scaling == pytest.approx(8 / math.sqrt(4))


def test_standalone_layer_golden_values():
    """A LoRA layer on a bare nn.Linear, fixed seed: h = W0 x + s B A x."""
    torch.manual_seed(0)
    base = nn.Linear(4, 3, bias=False)
    layer = LoRALinear(base, LoRAConfig(r=2, alpha=4, init="random", target_modules=["x"]))
    x = torch.arange(8, dtype=torch.float32).reshape(2, 4) / 8
    expected = x @ base.weight.T + 2.0 * x @ layer.lora_A.T @ layer.lora_B.T
    assert_close(layer(x), expected)
    assert_close(layer.delta_weight(), 2.0 * layer.lora_B @ layer.lora_A)
    B, A = layer.factors()
    assert_close(B @ A, layer.delta_weight())
    golden = torch.tensor([[-0.4029, 0.0516, -0.0578], [-0.9509, 0.3294, -0.0294]])
    assert_close(layer(x).detach(), golden, atol=1e-4, rtol=0)


def test_merge_then_unmerge_restores_weights(tokens):
    model = make_tiny_llama()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    lv.attach(model, LoRAConfig(r=4, init="random", target_modules=["q_proj", "o_proj"]))
    unmerged = model(tokens).logits
    lv.merge(model)
    assert_close(model(tokens).logits, unmerged, atol=1e-5, rtol=1e-5)
    lv.merge(model)  # idempotent
    lv.unmerge(model)
    after = {
        k.replace(".base_layer", ""): v
        for k, v in model.state_dict().items()
        if "adapters" not in k
    }
    for key, value in before.items():
        assert_close(after[key], value, atol=1e-7, rtol=0)
    assert_close(model(tokens).logits, unmerged, atol=1e-6, rtol=0)


def _copy_into_peft(ours: nn.Module, theirs: nn.Module) -> None:
    for path, layer in lv.adapter_layers(ours).items():
        target = theirs.base_model.model.get_submodule(path)
        target.lora_A["default"].weight.data.copy_(layer.lora_A.data)
        target.lora_B["default"].weight.data.copy_(layer.lora_B.data)


@pytest.mark.parametrize("use_rslora", [False, True])
def test_matches_peft_forward_and_gradients(tokens, use_rslora):
    ours = lv.attach(
        make_tiny_llama(),
        LoRAConfig(
            r=4, alpha=8, init="random", use_rslora=use_rslora, target_modules=["q_proj", "v_proj"]
        ),
    )
    theirs = peft.get_peft_model(
        make_tiny_llama(),
        peft.LoraConfig(
            r=4, lora_alpha=8, use_rslora=use_rslora, target_modules=["q_proj", "v_proj"]
        ),
    )
    _copy_into_peft(ours, theirs)
    out_ours = ours(tokens, labels=tokens)
    out_theirs = theirs(input_ids=tokens, labels=tokens)
    assert_close(out_ours.logits, out_theirs.logits, atol=1e-6, rtol=1e-5)
    out_ours.loss.backward()
    out_theirs.loss.backward()
    for path, layer in lv.adapter_layers(ours).items():
        target = theirs.base_model.model.get_submodule(path)
        assert_close(layer.lora_A.grad, target.lora_A["default"].weight.grad, atol=1e-6, rtol=1e-5)
        assert_close(layer.lora_B.grad, target.lora_B["default"].weight.grad, atol=1e-6, rtol=1e-5)


def test_regex_target_modules_follow_peft_rules(tiny_llama):
    lv.attach(tiny_llama, LoRAConfig(target_modules=r".*layers\.1\.self_attn\.(q|k)_proj"))
    assert sorted(lv.adapter_layers(tiny_llama)) == [
        "model.layers.1.self_attn.k_proj",
        "model.layers.1.self_attn.q_proj",
    ]


def test_target_matching_nothing_is_a_clear_error(tiny_llama):
    with pytest.raises(ValueError, match="matches no module.*q_proj"):
        lv.attach(tiny_llama, LoRAConfig(target_modules=["query"]))


def test_rank_pattern_sets_per_module_rank(tiny_llama):
    lv.attach(
        tiny_llama, LoRAConfig(r=4, rank_pattern={"v_proj": 2}, alpha_pattern={"v_proj": 1.0})
    )
    layers = lv.adapter_layers(tiny_llama)
    assert layers["model.layers.0.self_attn.v_proj"].r == 2
    assert layers["model.layers.0.self_attn.v_proj"].scaling == 0.5
    assert layers["model.layers.0.self_attn.q_proj"].r == 4


def test_dropout_only_in_training(tiny_llama, tokens):
    lv.attach(tiny_llama, LoRAConfig(r=4, dropout=0.5, init="random"))
    tiny_llama.eval()
    assert_close(tiny_llama(tokens).logits, tiny_llama(tokens).logits, rtol=0, atol=0)
    tiny_llama.train()
    assert not torch.equal(tiny_llama(tokens).logits, tiny_llama(tokens).logits)


def test_adapter_params_are_fp32_on_a_bf16_base(tokens):
    model = make_tiny_llama().to(torch.bfloat16)
    lv.attach(model, LoRAConfig(r=4, init="random"))
    layer = next(iter(lv.adapter_layers(model).values()))
    assert layer.lora_A.dtype == torch.float32
    assert model(tokens).logits.dtype == torch.bfloat16


def test_attach_follows_the_model_mode(tiny_llama):
    lv.attach(tiny_llama.eval(), LoRAConfig(r=2, dropout=0.5))
    assert not any(layer.training for layer in lv.adapter_layers(tiny_llama).values())
