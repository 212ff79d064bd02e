"""An adapter carries the context extension it was trained with (issue 18, item 2).

Loaded into an un-extended base it applies it (with a warning); loaded into a model extended
another way it is refused in one line; peft still loads the config that holds it.
"""

from __future__ import annotations

import json
import warnings

import peft
import pytest
import torch
from conftest import make_tiny_llama
from torch.testing import assert_close

import loravariants as lv
from loravariants.adapters import LoRAConfig
from loravariants.longlora import extend_context
from loravariants.longlora.context import describe_extension

NATIVE = 32  # tiny Llama's max_position_embeddings below


def _tiny():
    return make_tiny_llama(max_position_embeddings=NATIVE)


@pytest.fixture
def long_tokens():
    return torch.randint(0, 128, (1, 4 * NATIVE), generator=torch.Generator().manual_seed(2))


@pytest.fixture
def extended(long_tokens):
    """Extended 4x, trainable norm, a non-zero LoRA: the logits over 128 tokens."""
    model = _tiny()
    extend_context(model, 4 * NATIVE, trainable=("norm",))
    lv.attach(model, LoRAConfig(r=4, init="random", target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():
        model.model.norm.weight.mul_(1.5)
    return model, model(long_tokens).logits


def test_describe_extension():
    model = _tiny()
    assert describe_extension(model) is None
    extend_context(model, 4 * NATIVE, trainable=())
    assert describe_extension(model) == {
        "method": "linear",
        "factor": 4.0,
        "original_length": NATIVE,
        "target_length": 4 * NATIVE,
    }


@pytest.mark.parametrize("fmt", ["native", "peft"])
def test_extension_is_saved_and_applied_on_load(tmp_path, long_tokens, extended, fmt):
    model, ref = extended
    lv.save_adapter(model, tmp_path / "a", format=fmt)
    plain = _tiny()
    with pytest.warns(UserWarning, match=r"applied the adapter's context extended to 128"):
        lv.load_adapter(plain, tmp_path / "a")
    assert_close(plain(long_tokens).logits, ref, rtol=0, atol=0)
    # loading into a model extended the same way is silent and exact
    same = _tiny()
    extend_context(same, 4 * NATIVE, trainable=())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        lv.load_adapter(same, tmp_path / "a")
    assert_close(same(long_tokens).logits, ref, rtol=0, atol=0)


def test_the_unextended_model_really_differs(long_tokens, extended):
    """The test above can fail: without the extension the logits are not the same."""
    model, ref = extended
    plain = _tiny()
    lv.attach(plain, LoRAConfig(r=4, init="random", target_modules=["q_proj", "v_proj"]))
    plain.load_state_dict(model.state_dict(), strict=False)
    assert (plain(long_tokens).logits - ref).abs().max() > 1e-3


@pytest.mark.parametrize("fmt", ["native", "peft"])
def test_another_extension_is_refused_in_one_line(tmp_path, extended, fmt):
    model, _ = extended
    lv.save_adapter(model, tmp_path / "a", format=fmt)
    other = _tiny()
    extend_context(other, 2 * NATIVE, trainable=())
    with pytest.raises(ValueError, match=r"trained with context extended to 128 .* but the model"):
        lv.load_adapter(other, tmp_path / "a")
    assert not lv.adapter_names(other)  # nothing attached


def test_an_unextended_adapter_is_refused_by_an_extended_model(tmp_path):
    model = lv.attach(_tiny(), LoRAConfig(r=2))
    lv.save_adapter(model, tmp_path / "a")
    assert (
        json.loads((tmp_path / "a" / "loravariants_config.json").read_text())["context_extension"]
        is None
    )
    other = _tiny()
    extend_context(other, 2 * NATIVE, trainable=())
    with pytest.raises(ValueError, match="trained with the native context"):
        lv.load_adapter(other, tmp_path / "a")


def test_peft_still_loads_the_config_and_apply_saved_context_prepares_the_base(
    tmp_path, long_tokens, extended
):
    model, ref = extended
    lv.save_adapter(model, tmp_path / "p", format="peft")
    meta = json.loads((tmp_path / "p" / "adapter_config.json").read_text())
    assert meta["loravariants_context_extension"]["target_length"] == 4 * NATIVE
    assert peft.PeftConfig.from_pretrained(str(tmp_path / "p")).r == 4
    base = _tiny()
    with pytest.warns(UserWarning, match="applied"):
        lv.apply_saved_context(base, tmp_path / "p")
    theirs = peft.PeftModel.from_pretrained(base, tmp_path / "p")
    assert_close(theirs(input_ids=long_tokens).logits, ref, atol=1e-5, rtol=1e-5)


def test_unextended_adapters_write_no_peft_key(tmp_path):
    model = lv.attach(_tiny(), LoRAConfig(r=2))
    lv.save_adapter(model, tmp_path / "p", format="peft")
    assert "loravariants_context_extension" not in json.loads(
        (tmp_path / "p" / "adapter_config.json").read_text()
    )
