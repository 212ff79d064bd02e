"""Formats are registered like variants: a format of a test's own, declared by a variant of a
test's own, goes through save_adapter / load_adapter / saved_variant with nothing in io/
naming it."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import peft
import pytest
import torch
from conftest import make_tiny_llama
from safetensors.torch import load_file, save_file
from torch.testing import assert_close
from toy_variant import GatedLoRAConfig

import loravariants as lv
from loravariants.adapters import AdapterConfig, COLAConfig, LoRAConfig
from loravariants.adapters.base import FORMATS, AdapterFormat, register_format
from loravariants.io import saved_variant

MARK = "toy_format.json"


class ToyFormat(AdapterFormat):
    """The config as JSON, each layer's ``adapter_state`` as safetensors."""

    name = "toyfmt"

    def detect(self, directory: Path) -> bool:
        return (directory / MARK).is_file()

    def save(self, model, path, name, config, base_model_name_or_path) -> Path:
        path.mkdir(parents=True)
        tensors = {
            f"{p}.{k}": t.contiguous()
            for p, _, layer in lv.iter_adapters(model, name)
            for k, t in layer.adapter_state().items()
        }
        save_file(tensors, str(path / "t.safetensors"))
        (path / MARK).write_text(json.dumps(config.to_dict()))
        return path

    def load(self, model, directory, name):
        config = AdapterConfig.from_dict(json.loads((directory / MARK).read_text()))
        lv.attach(model, config, name=name or "default")
        tensors = load_file(str(directory / "t.safetensors"))
        for p, _, layer in lv.iter_adapters(model, name or "default"):
            layer.load_adapter_state({k: tensors[f"{p}.{k}"] for k in layer.adapter_state()})
        return model

    def saved_variant(self, directory: Path) -> str:
        return json.loads((directory / MARK).read_text())["variant"]


@dataclass
class _ToyInToyFormat(GatedLoRAConfig):  # not registered: the toy variant, one more format
    formats: ClassVar[tuple[str, ...]] = ("native", "toyfmt")


@pytest.fixture
def toy_format():
    register_format(ToyFormat)
    try:
        yield
    finally:
        del FORMATS["toyfmt"]


def test_a_format_of_ones_own_round_trips(toy_format, tmp_path, tokens):
    model = lv.attach(make_tiny_llama(), _ToyInToyFormat(r=2, target_modules=["q_proj"]))
    with torch.no_grad():
        for _, _, layer in lv.iter_adapters(model):
            layer.lora_B.normal_(generator=torch.Generator().manual_seed(0))
    want = model.eval()(tokens).logits
    lv.save_adapter(model, tmp_path / "a", format="toyfmt")
    assert (tmp_path / "a" / MARK).is_file() and saved_variant(tmp_path / "a") == "toy"
    fresh = lv.load_adapter(make_tiny_llama(), tmp_path / "a").eval()
    assert_close(fresh(tokens).logits, want)

    plain = lv.attach(make_tiny_llama(), LoRAConfig(r=2))
    with pytest.raises(ValueError, match="format 'toyfmt' cannot hold a lora adapter"):
        lv.save_adapter(plain, tmp_path / "b", format="toyfmt")


def test_formats_are_the_registered_ones(toy_format, tmp_path):
    assert list(FORMATS)[:3] == ["native", "peft", "mixlora"] and "toyfmt" in FORMATS
    model = lv.attach(make_tiny_llama(), LoRAConfig(r=2))
    with pytest.raises(ValueError, match=r"format must be one of \[.*'toyfmt'\], got 'onnx'"):
        lv.save_adapter(model, tmp_path / "c", format="onnx")
    with pytest.raises(TypeError, match="must set the class attribute `name`"):
        register_format(type("Nameless", (AdapterFormat,), {}))
    with pytest.raises(TypeError, match="'peft' is already registered"):
        register_format(type("Impostor", (AdapterFormat,), {"name": "peft"}))


@pytest.mark.parametrize("variant", ["lora", "cola"])
def test_peft_export_scales_as_the_variant_says(variant, tmp_path, tokens):
    """rsLoRA: LoRA's layers go to peft as trained, so the file says use_rslora; COLA (a LoRA
    subclass) goes as its folded factors, so it must not: peft's logits are ours in both."""
    cls = LoRAConfig if variant == "lora" else COLAConfig
    model = lv.attach(make_tiny_llama(), cls(r=4, alpha=8, use_rslora=True, init="random"))
    want = model.eval()(tokens).logits
    lv.save_adapter(model, tmp_path / "p", format="peft")
    written = json.loads((tmp_path / "p" / "adapter_config.json").read_text())
    assert written["use_rslora"] is (variant == "lora")
    theirs = peft.PeftModel.from_pretrained(make_tiny_llama(), tmp_path / "p").eval()
    assert_close(theirs(tokens).logits, want, atol=1e-5, rtol=1e-5)
