"""extend_context: RoPE position interpolation, rebuilt rotary modules, trainable embed/norm."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from conftest import make_tiny_llama, tiny_config
from torch import nn
from torch.testing import assert_close
from transformers import MistralConfig, MistralForCausalLM, Qwen2Config, Qwen2ForCausalLM

import loravariants as lv
from loravariants.longlora import extend_context


def rotary(model):
    return model.model.rotary_emb


def cos_sin(model, positions):
    x = torch.zeros(1, dtype=torch.float32)
    pos = torch.as_tensor(positions)[None]
    return rotary(model)(x, pos)


def test_linear_updates_config_and_interpolates_positions():
    model = make_tiny_llama()  # max_position_embeddings 128
    before_cos, before_sin = cos_sin(model, [0, 1, 5, 64, 127])
    old_inv_freq = rotary(model).inv_freq.clone()
    assert extend_context(model, 512) is model
    cfg = model.config
    assert cfg.max_position_embeddings == 512
    assert cfg.rope_parameters["rope_type"] == "linear"
    assert cfg.rope_parameters["factor"] == 4.0
    assert_close(rotary(model).inv_freq, old_inv_freq / 4)
    # position p * factor after interpolation == position p before
    after_cos, after_sin = cos_sin(model, [0, 4, 20, 256, 508])
    assert_close(after_cos, before_cos)
    assert_close(after_sin, before_sin)


def test_forward_uses_the_new_rotary():
    model = make_tiny_llama()
    ids = torch.randint(0, 128, (1, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before = model(ids).logits
        extend_context(model, 256)
        after = model(ids).logits
    assert not torch.allclose(before, after)


def test_embed_and_norms_trainable_lm_head_not():
    model = make_tiny_llama()
    extend_context(model, 256)
    names = lv.extra_trainable_modules(model)
    assert "model.embed_tokens" in names
    assert "model.norm" in names
    assert "model.layers.0.input_layernorm" in names
    assert "model.layers.1.post_attention_layernorm" in names
    assert not any("lm_head" in n for n in names)
    assert model.model.embed_tokens.weight.requires_grad
    assert all(p.requires_grad for n, p in model.named_parameters() if "norm" in n)
    assert not model.model.layers[0].self_attn.q_proj.weight.requires_grad
    if model.lm_head.weight is not model.model.embed_tokens.weight:
        assert not model.lm_head.weight.requires_grad


def test_trainable_subset_and_none():
    model = make_tiny_llama()
    extend_context(model, 256, trainable=("norm",))
    assert "model.embed_tokens" not in lv.extra_trainable_modules(model)
    other = make_tiny_llama()
    extend_context(other, 256, trainable=())
    assert lv.extra_trainable_modules(other) == []


def test_dynamic_and_yarn():
    model = make_tiny_llama()
    extend_context(model, 512, method="dynamic")
    assert model.config.rope_parameters == {
        "rope_type": "dynamic",
        "factor": 4.0,
        "rope_theta": 10000.0,
    }
    assert model.config.max_position_embeddings == 128  # dynamic NTK scales beyond this
    assert rotary(model).rope_type == "dynamic"
    ids = torch.randint(0, 128, (1, 200), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.isfinite(model(ids).logits).all()

    model = make_tiny_llama()
    old_inv_freq = rotary(model).inv_freq.clone()
    extend_context(model, 512, method="yarn")
    params = model.config.rope_parameters
    assert params["rope_type"] == "yarn" and params["factor"] == 4.0
    assert params["original_max_position_embeddings"] == 128
    assert model.config.max_position_embeddings == 512
    assert rotary(model).attention_scaling > 1.0
    inv = rotary(model).inv_freq
    assert_close(inv[0], old_inv_freq[0])  # high frequencies kept
    assert inv[-1] < old_inv_freq[-1]  # low frequencies interpolated


def test_extending_twice_rescales_from_the_original_length():
    model = make_tiny_llama()
    extend_context(model, 256)
    extend_context(model, 512)
    assert model.config.rope_parameters["factor"] == 4.0
    assert model.config.max_position_embeddings == 512


@pytest.mark.parametrize(
    "family", [(MistralConfig, MistralForCausalLM), (Qwen2Config, Qwen2ForCausalLM)]
)
def test_other_families(family):
    config_cls, model_cls = family
    torch.manual_seed(0)
    model = model_cls(tiny_config(config_cls, max_position_embeddings=64))
    old = rotary(model).inv_freq.clone()
    extend_context(model, 256)
    assert model.config.rope_parameters["factor"] == 4.0
    assert_close(rotary(model).inv_freq, old / 4)
    assert model.model.embed_tokens.weight.requires_grad


def test_bad_arguments():
    model = make_tiny_llama()
    with pytest.raises(ValueError, match="target_length"):
        extend_context(model, 128)
    with pytest.raises(ValueError, match="target_length"):
        extend_context(model, 64)
    with pytest.raises(ValueError, match="target_length"):
        extend_context(model, 256.0)
    with pytest.raises(ValueError, match="method"):
        extend_context(model, 256, method="ntk")
    with pytest.raises(ValueError, match="trainable"):
        extend_context(model, 256, trainable=("lm_head",))
    # nothing changed by the failed calls
    assert model.config.max_position_embeddings == 128
    assert model.config.rope_parameters["rope_type"] == "default"


def tiny_gemma3(**overrides):
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    torch.manual_seed(0)
    fields = dict(
        head_dim=8,
        sliding_window=16,
        layer_types=["sliding_attention", "full_attention"],
    )
    return Gemma3ForCausalLM(tiny_config(Gemma3TextConfig, **{**fields, **overrides})).eval()


def test_gemma3_per_layer_type_rotary():
    model = tiny_gemma3()
    old = {t: getattr(rotary(model), f"{t}_inv_freq").clone() for t in model.config.layer_types}
    thetas = {t: p["rope_theta"] for t, p in model.config.rope_parameters.items()}
    extend_context(model, 512)
    assert model.config.max_position_embeddings == 512
    for layer_type, params in model.config.rope_parameters.items():
        assert params == {"rope_type": "linear", "factor": 4.0, "rope_theta": thetas[layer_type]}
        assert_close(getattr(rotary(model), f"{layer_type}_inv_freq"), old[layer_type] / 4)
    ids = torch.randint(0, 128, (1, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.isfinite(model(ids).logits).all()


def test_layer_types_scaled_differently_need_original_length():
    # Gemma3 checkpoints: only full attention is linearly scaled (here x4 over 32 tokens)
    rope = {
        "full_attention": {"rope_type": "linear", "factor": 4.0, "rope_theta": 1e6},
        "sliding_attention": {"rope_type": "default", "rope_theta": 1e4},
    }
    model = tiny_gemma3(rope_parameters=rope)
    before = copy.deepcopy(model.config.rope_parameters)
    with pytest.raises(ValueError, match="original_length"):
        extend_context(model, 512)
    assert model.config.rope_parameters == before
    assert model.config.max_position_embeddings == 128
    extend_context(model, 512, original_length=32)
    assert {p["factor"] for p in model.config.rope_parameters.values()} == {16.0}


def test_no_rotary_module_changes_nothing():
    model = make_tiny_llama()
    model.model.rotary_emb = nn.Identity()
    with pytest.raises(ValueError, match="rotary"):
        extend_context(model, 512)
    assert model.config.max_position_embeddings == 128
    assert model.config.rope_parameters["rope_type"] == "default"
    assert lv.extra_trainable_modules(model) == []


def test_failure_while_rebuilding_restores_config_and_modules(monkeypatch):
    model = make_tiny_llama()
    module = rotary(model)
    before = copy.deepcopy(model.config.rope_parameters)

    def boom(self, *args, **kwargs):
        raise RuntimeError("boom")

    monkeypatch.setattr(type(module), "__init__", boom)
    with pytest.raises(RuntimeError, match="boom"):
        extend_context(model, 512)
    assert model.config.rope_parameters == before
    assert model.config.max_position_embeddings == 128
    assert rotary(model) is module


def test_original_length_for_longlora_style_checkpoints():
    # LongLoRA's fine-tune.py sets the linear factor but leaves max_position_embeddings at L
    rope = {"rope_type": "linear", "factor": 4.0, "rope_theta": 10000.0}
    model = make_tiny_llama(max_position_embeddings=64, rope_parameters=dict(rope))
    extend_context(model, 512, original_length=64)
    assert model.config.rope_parameters["factor"] == 8.0
    assert model.config.max_position_embeddings == 512
    assert_close(rotary(model).inv_freq, make_tiny_llama().model.rotary_emb.inv_freq / 8)
    # without it, max_position_embeddings is read as the extended length: L = 64 / 4
    other = make_tiny_llama(max_position_embeddings=64, rope_parameters=dict(rope))
    extend_context(other, 512)
    assert other.config.rope_parameters["factor"] == 32.0
    with pytest.raises(ValueError, match="target_length"):
        extend_context(make_tiny_llama(rope_parameters=dict(rope)), 512, original_length=128)
    with pytest.raises(ValueError, match="original_length"):
        extend_context(make_tiny_llama(), 512, original_length=0)


# Oracle, transcribed from dvlab-research/LongLoRA, fine-tune.py ("Set RoPE scaling factor"):
# the factor it sets for a model whose config has max_position_embeddings and rope_scaling.
def _longlora_scaling_factor(max_position_embeddings, rope_scaling, model_max_length):
    orig_rope_scaling = rope_scaling
    if orig_rope_scaling is None:
        orig_rope_scaling = {"factor": 1}
    orig_rope_scaling_factor = (
        orig_rope_scaling["factor"] if "factor" in orig_rope_scaling.keys() else 1
    )
    orig_ctx_len = max_position_embeddings
    if orig_ctx_len:
        orig_ctx_len *= orig_rope_scaling_factor
        if model_max_length > orig_ctx_len:
            scaling_factor = float(math.ceil(model_max_length / orig_ctx_len))
            return {"type": "linear", "factor": scaling_factor}
    return None


@pytest.mark.parametrize("native, target", [(256, 1000), (128, 512), (128, 300), (100, 101)])
def test_ceil_rounding_is_longloras_factor(native, target):
    model = make_tiny_llama(max_position_embeddings=native)
    old_inv_freq = rotary(model).inv_freq.clone()
    extend_context(model, target, factor_rounding="ceil")
    reference = _longlora_scaling_factor(native, None, target)
    factor = model.config.rope_parameters["factor"]
    assert factor == reference["factor"] and factor == float(math.ceil(target / native))
    assert model.config.max_position_embeddings == native * int(factor) >= target
    assert_close(rotary(model).inv_freq, old_inv_freq / factor)
    exact = make_tiny_llama(max_position_embeddings=native)
    extend_context(exact, target)  # the default: target / native, unrounded
    assert exact.config.rope_parameters["factor"] == target / native
    assert exact.config.max_position_embeddings == target


def test_ceil_rounding_example_from_the_issue_and_bad_value():
    model = make_tiny_llama(max_position_embeddings=256)
    extend_context(model, 1000, factor_rounding="ceil")
    assert model.config.rope_parameters["factor"] == 4.0  # exact would be 3.90625
    # the convention holds: L is read back as max_position_embeddings / factor = 256
    extend_context(model, 2048, factor_rounding="ceil")
    assert model.config.rope_parameters["factor"] == 8.0
    with pytest.raises(ValueError, match="factor_rounding"):
        extend_context(make_tiny_llama(), 512, factor_rounding="round")


def test_context_config_factor_rounding_field():
    from loravariants.config import ContextConfig

    assert ContextConfig().factor_rounding == "exact"
    assert ContextConfig(factor_rounding="ceil").factor_rounding == "ceil"
    with pytest.raises(ValueError, match="context.factor_rounding"):
        ContextConfig(factor_rounding="up")
