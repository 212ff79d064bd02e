"""merge_and_unload, the merged transformers checkpoint, and save_pretrained with adapters."""

from __future__ import annotations

import pytest
import torch
from conftest import make_tiny_llama
from torch import nn
from torch.testing import assert_close
from transformers import AutoModelForCausalLM

import loravariants as lv
from loravariants.adapters import COLAConfig, LoRAConfig, MixLoRAConfig, MultiLoRAConfig
from loravariants.adapters.base import AdapterHost


def _nonzero(model):
    """Give every adapter parameter a non-zero value (fresh B and scales are 0)."""
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if ".adapters." in n:
                p.copy_(0.1 * torch.randn(p.shape, generator=gen))
    return model


@pytest.fixture
def stacked(tokens):
    """LoRA on q, a COLA chain with one folded link on v, MultiLoRA on o, a trained norm."""
    model = make_tiny_llama()
    lv.attach(model, LoRAConfig(r=2, target_modules=["q_proj"]), name="lora")
    lv.attach(model, COLAConfig(r=2, knots=[1], target_modules=["v_proj"]), name="cola")
    _nonzero(model)
    lv.on_step_end(model, 1)  # the knot: link 0 folds into v_proj's weight, link 1 starts
    lv.attach(model, MultiLoRAConfig(r=2, num_branches=2, target_modules=["o_proj"]), name="m")
    lv.mark_trainable(model, ["model.norm"])
    _nonzero(model)
    with torch.no_grad():
        model.model.norm.weight.mul_(1.5)
    return model, model(tokens).logits


def test_merge_and_unload_gives_a_plain_model_with_the_same_outputs(tokens, stacked):
    model, ref = stacked
    out = lv.merge_and_unload(model)
    assert out is model and not lv.adapter_names(model)
    assert not any(isinstance(m, AdapterHost) for m in model.modules())
    assert type(model.model.layers[0].self_attn.v_proj) is nn.Linear
    assert_close(model(tokens).logits, ref, atol=1e-5, rtol=1e-5)
    assert (model(tokens).logits - make_tiny_llama()(tokens).logits).abs().max() > 1e-3


def test_save_pretrained_with_adapters_writes_them_not_the_base(tmp_path, tokens, stacked):
    """Several adapters: one folder each (as peft does), plus the model.safetensors Trainer's
    resume loads; a plain model again (merged) writes a plain checkpoint."""
    from safetensors.torch import load_file

    model, ref = stacked
    model.save_pretrained(tmp_path / "x")
    assert not (tmp_path / "x" / "config.json").exists()
    for name in ("lora", "cola", "m"):
        assert (tmp_path / "x" / name / "loravariants_config.json").is_file()
    fresh = make_tiny_llama()
    lv.attach(fresh, LoRAConfig(r=2, target_modules=["q_proj"]), name="lora")
    lv.attach(fresh, COLAConfig(r=2, knots=[1], target_modules=["v_proj"]), name="cola")
    lv.attach(fresh, MultiLoRAConfig(r=2, num_branches=2, target_modules=["o_proj"]), name="m")
    lv.mark_trainable(fresh, ["model.norm"])
    result = fresh.load_state_dict(load_file(tmp_path / "x" / "model.safetensors"), strict=False)
    assert not result.missing_keys and not result.unexpected_keys
    assert_close(fresh(tokens).logits, ref)  # COLA's folded link and the trained norm too
    lv.merge_and_unload(model)
    model.save_pretrained(tmp_path / "y")  # a plain model again
    assert (tmp_path / "y" / "config.json").is_file()


def test_detaching_the_last_adapter_lifts_the_guard(tmp_path):
    model = lv.attach(make_tiny_llama(), LoRAConfig(r=2))
    lv.detach(model)
    model.save_pretrained(tmp_path / "x")


def test_save_merged_reloads_in_plain_transformers_and_keeps_the_model(tmp_path, tokens, stacked):
    model, ref = stacked
    lv.save_merged(model, tmp_path / "merged")
    assert sorted(lv.adapter_names(model)) == ["cola", "lora", "m"]  # untouched
    assert_close(model(tokens).logits, ref, rtol=0, atol=0)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    assert_close(reloaded(tokens).logits, ref, atol=1e-5, rtol=1e-5)


def test_save_merged_keeps_the_context_extension(tmp_path):
    from loravariants.longlora import extend_context

    model = make_tiny_llama(max_position_embeddings=32)
    extend_context(model, 128, trainable=())
    _nonzero(lv.attach(model, LoRAConfig(r=2)))
    long = torch.randint(0, 128, (1, 128), generator=torch.Generator().manual_seed(0))
    ref = model(long).logits
    lv.save_merged(model, tmp_path / "m")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "m").eval()
    assert reloaded.config.rope_parameters["factor"] == 4.0
    assert_close(reloaded(long).logits, ref, atol=1e-5, rtol=1e-5)


def test_mixlora_cannot_be_merged_and_nothing_changes(tokens):
    model = lv.attach(make_tiny_llama(), MixLoRAConfig(num_experts=2, r=2, top_k=1))
    _nonzero(model)
    ref = model(tokens).logits
    with pytest.raises(ValueError, match="cannot be merged"):
        lv.merge_and_unload(model)
    with pytest.raises(ValueError, match="cannot be merged"):
        lv.save_merged(model, "/nonexistent/never-written")
    assert lv.adapter_names(model) == ["default"]
    assert_close(model(tokens).logits, ref, rtol=0, atol=0)


def test_bf16_merge_warns_about_rounding_drift():
    model = make_tiny_llama().to(torch.bfloat16)
    _nonzero(lv.attach(model, LoRAConfig(r=2)))
    W0 = model.model.layers[0].self_attn.q_proj.base_layer.weight.clone()
    with pytest.warns(UserWarning, match="bfloat16 weights rounds them"):
        for _ in range(5):
            lv.merge(model)
            lv.unmerge(model)
    drift = (model.model.layers[0].self_attn.q_proj.base_layer.weight - W0).abs().max()
    assert drift > 0  # the drift the warning is about is real
