"""Several named adapters on one model, row routing, detach, step hooks."""

from __future__ import annotations

import pytest
import torch
from conftest import make_tiny_llama
from torch import nn
from torch.testing import assert_close

import loravariants as lv
from loravariants.adapters import LoRAConfig
from loravariants.adapters.base import AdapterHost


def test_two_named_adapters_share_one_frozen_module(tokens):
    model = make_tiny_llama()
    lv.attach(model, LoRAConfig(r=2, init="random", target_modules=["q_proj"]), name="a")
    lv.attach(model, LoRAConfig(r=3, init="random", target_modules=["q_proj", "v_proj"]), name="b")
    host = model.model.layers[0].self_attn.q_proj
    assert isinstance(host, AdapterHost) and list(host.adapters) == ["a", "b"]
    assert lv.adapter_names(model) == ["a", "b"]
    assert len(lv.adapter_layers(model, "a")) == 2 and len(lv.adapter_layers(model, "b")) == 4
    assert all(".adapters." in k for k in lv.adapter_layers(model))
    # the frozen weight is stored once
    assert sum("q_proj.base_layer.weight" in k for k in model.state_dict()) == 2


def test_active_adapters_and_detach_restore_the_base(tokens):
    model = make_tiny_llama()
    ref = model(tokens).logits
    lv.attach(model, LoRAConfig(r=2, init="random"), name="a")
    lv.attach(model, LoRAConfig(r=2, init="random"), name="b")
    both = model(tokens).logits
    lv.set_active_adapters(model, [])
    assert_close(model(tokens).logits, ref, rtol=0, atol=0)
    lv.set_active_adapters(model, None)
    assert_close(model(tokens).logits, both)
    lv.detach(model, "a")
    lv.detach(model, "b")
    assert isinstance(model.model.layers[0].self_attn.q_proj, nn.Linear)
    assert_close(model(tokens).logits, ref, rtol=0, atol=0)
    with pytest.raises(ValueError, match="no adapters"):
        lv.adapter_config(model)


def test_route_rows_applies_each_adapter_to_its_rows_only():
    model = make_tiny_llama()
    batch = torch.randint(0, 128, (4, 12), generator=torch.Generator().manual_seed(3))
    lv.attach(model, LoRAConfig(r=2, init="random"), name="a")
    lv.attach(model, LoRAConfig(r=2, init="random", target_modules=["k_proj"]), name="b")
    expected = {}
    for name in ("a", "b"):
        lv.set_active_adapters(model, [name])
        expected[name] = model(batch).logits
    lv.set_active_adapters(model, [])
    base = model(batch).logits
    lv.set_active_adapters(model, None)
    with lv.route_rows({"a": slice(0, 2), "b": torch.tensor([3])}):
        mixed = model(batch).logits
    assert_close(mixed[:2], expected["a"][:2])
    assert_close(mixed[2], base[2])
    assert_close(mixed[3], expected["b"][3])


def test_duplicate_and_invalid_names(tiny_llama):
    lv.attach(tiny_llama, LoRAConfig())
    with pytest.raises(ValueError, match="already attached"):
        lv.attach(tiny_llama, LoRAConfig())
    with pytest.raises(ValueError, match="adapter name"):
        lv.attach(tiny_llama, LoRAConfig(), name="a.b")


def test_attach_works_on_any_module():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(5, 7), nn.ReLU(), nn.Linear(7, 2))
    x = torch.randn(3, 5)
    ref = net(x)
    lv.attach(net, LoRAConfig(r=2, target_modules=["0", "2"]))
    assert_close(net(x), ref)
    assert [n for n, p in net.named_parameters() if p.requires_grad] == [
        "0.adapters.default.lora_A",
        "0.adapters.default.lora_B",
        "2.adapters.default.lora_A",
        "2.adapters.default.lora_B",
    ]


def test_aux_loss_is_zero_without_extra_losses(tiny_llama, tokens):
    lv.attach(tiny_llama, LoRAConfig())
    tiny_llama(tokens)
    assert lv.aux_loss(tiny_llama).item() == 0.0


def test_on_step_end_resets_optimizer_state_of_returned_params(tiny_llama, tokens):
    lv.attach(tiny_llama, LoRAConfig(r=2, init="random"))
    layer = next(iter(lv.adapter_layers(tiny_llama).values()))
    opt = torch.optim.AdamW([p for p in tiny_llama.parameters() if p.requires_grad])
    tiny_llama(tokens, labels=tokens).loss.backward()
    opt.step()
    assert layer.lora_A in opt.state
    layer.on_step_end = lambda step: [layer.lora_A]  # a variant asking for a reset
    reset = lv.on_step_end(tiny_llama, 1, opt)
    assert reset == [layer.lora_A] and layer.lora_A not in opt.state
    assert layer.lora_B in opt.state


def test_mark_trainable_unknown_module(tiny_llama):
    with pytest.raises(ValueError, match="no module named"):
        lv.mark_trainable(tiny_llama, ["model.nonexistent"])


def test_route_rows_accepts_peft_style_names_per_row():
    model = make_tiny_llama()
    batch = torch.randint(0, 128, (3, 8), generator=torch.Generator().manual_seed(4))
    lv.attach(model, LoRAConfig(r=2, init="random"), name="a")
    lv.attach(model, LoRAConfig(r=2, init="random"), name="b")
    with lv.route_rows({"a": torch.tensor([0]), "b": torch.tensor([2])}):
        by_index = model(batch).logits
    with lv.route_rows(["a", None, "b"]):
        by_name = model(batch).logits
    assert_close(by_name, by_index, rtol=0, atol=0)


def test_route_rows_refuses_merged_adapters(tiny_llama, tokens):
    lv.attach(tiny_llama, LoRAConfig(r=2, init="random"), name="a")
    lv.merge(tiny_llama)
    with pytest.raises(ValueError, match="merged"), lv.route_rows({"a": slice(0, 1)}):
        tiny_llama(tokens)


def test_unknown_adapter_name_is_an_error_everywhere(tiny_llama):
    lv.attach(tiny_llama, LoRAConfig(), name="a")
    for call in (
        lv.merge,
        lv.unmerge,
        lv.aux_loss,
        lambda m, name: lv.on_step_end(m, 1, name=name),
    ):
        with pytest.raises(ValueError, match="no adapter named 'typo'"):
            call(tiny_llama, name="typo")


def test_non_linear_targets_get_a_clear_error():
    from transformers.pytorch_utils import Conv1D

    model = nn.Sequential(nn.Linear(4, 4))
    model.add_module("c_attn", Conv1D(12, 4))
    with pytest.raises(ValueError, match=r"not nn\.Linear.*Conv1D"):
        lv.attach(model, LoRAConfig(target_modules=["c_attn"]))


@pytest.mark.parametrize(
    "field, value", [("alpha", float("nan")), ("dropout", float("nan")), ("alpha", float("inf"))]
)
def test_non_finite_config_values_are_rejected(field, value):
    with pytest.raises(ValueError, match=field):
        LoRAConfig(**{field: value})


def test_null_patterns_mean_no_overrides():
    config = LoRAConfig.from_dict({"variant": "lora", "rank_pattern": None, "alpha_pattern": None})
    assert config.rank_pattern == {} and config.alpha_pattern == {}
