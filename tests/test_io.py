"""Saving and loading adapters: native and peft formats, corrupt files, atomic writes."""

from __future__ import annotations

import json

import peft
import pytest
import torch
from conftest import make_tiny_llama
from torch.testing import assert_close

import loravariants as lv
from loravariants.adapters import LoRAConfig
from loravariants.io import read_factors


@pytest.fixture
def trained(tokens):
    """A tiny Llama with a non-zero LoRA and a trainable, modified final norm."""
    model = make_tiny_llama()
    lv.attach(model, LoRAConfig(r=4, alpha=8, init="random", target_modules=["q_proj", "v_proj"]))
    lv.mark_trainable(model, ["model.norm"])
    with torch.no_grad():
        model.model.norm.weight.mul_(1.5)
    return model, model(tokens).logits


@pytest.mark.parametrize("fmt", ["native", "peft"])
def test_round_trip(tmp_path, tokens, trained, fmt):
    model, ref = trained
    lv.save_adapter(model, tmp_path / "a", format=fmt)
    fresh = lv.load_adapter(make_tiny_llama(), tmp_path / "a")
    assert_close(fresh(tokens).logits, ref, rtol=0, atol=0)
    assert fresh.model.norm.weight.requires_grad
    assert sorted(lv.adapter_layers(fresh)) == sorted(lv.adapter_layers(model))


def test_native_records_config_and_version(tmp_path, trained):
    model, _ = trained
    lv.save_adapter(model, tmp_path / "a")
    meta = json.loads((tmp_path / "a" / "loravariants_config.json").read_text())
    assert meta["library_version"] == lv.__version__
    assert meta["config"]["variant"] == "lora" and meta["config"]["r"] == 4
    assert meta["extra_trainable"] == ["model.norm"]


def test_peft_loads_our_adapter_with_same_logits(tmp_path, tokens, trained):
    model, ref = trained
    lv.save_adapter(model, tmp_path / "p", format="peft")
    theirs = peft.PeftModel.from_pretrained(make_tiny_llama(), tmp_path / "p")
    assert_close(theirs(input_ids=tokens).logits, ref, atol=1e-6, rtol=1e-5)


def test_we_load_a_peft_saved_adapter(tmp_path, tokens):
    theirs = peft.get_peft_model(
        make_tiny_llama(),
        peft.LoraConfig(
            r=4,
            lora_alpha=16,
            target_modules=["q_proj", "v_proj", "o_proj"],
            rank_pattern={"o_proj": 2},
            modules_to_save=["norm"],
            init_lora_weights=False,
        ),
    )
    with torch.no_grad():
        theirs.base_model.model.model.norm.modules_to_save["default"].weight.mul_(0.5)
    ref = theirs(input_ids=tokens).logits
    theirs.save_pretrained(tmp_path / "p")
    ours = lv.load_adapter(make_tiny_llama(), tmp_path / "p")
    assert_close(ours(tokens).logits, ref, atol=1e-6, rtol=1e-5)
    assert lv.adapter_layers(ours)["model.layers.0.self_attn.o_proj"].r == 2
    factors = read_factors(tmp_path / "p")  # files only, no model
    layer = lv.adapter_layers(ours)["model.layers.1.self_attn.q_proj"]
    B, A = factors["model.layers.1.self_attn.q_proj"]
    assert_close(B @ A, layer.delta_weight())


def test_load_into_an_already_attached_adapter(tmp_path, tokens, trained):
    model, ref = trained
    lv.save_adapter(model, tmp_path / "a")
    target = lv.attach(
        make_tiny_llama(), LoRAConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj"])
    )
    lv.load_adapter(target, tmp_path / "a", name="default")
    target.model.norm.weight.data.copy_(model.model.norm.weight)
    assert_close(target(tokens).logits, ref, rtol=0, atol=0)


def test_mismatched_adapter_names_the_file(tmp_path, trained):
    model, _ = trained
    lv.save_adapter(model, tmp_path / "a")
    other = lv.attach(
        make_tiny_llama(), LoRAConfig(r=2, alpha=8, target_modules=["q_proj", "v_proj"])
    )
    with pytest.raises(ValueError, match=r"adapter_model\.safetensors.*shape"):
        lv.load_adapter(other, tmp_path / "a", name="default")
    wider = make_tiny_llama(hidden_size=64, intermediate_size=64)
    with pytest.raises(ValueError, match="adapter_model.safetensors"):
        lv.load_adapter(wider, tmp_path / "a")


@pytest.mark.parametrize("broken", ["weights", "config", "missing"])
def test_corrupt_files_raise_errors_naming_the_file(tmp_path, trained, broken):
    model, _ = trained
    path = tmp_path / "a"
    lv.save_adapter(model, path)
    if broken == "weights":
        (path / "adapter_model.safetensors").write_bytes(b"\x00garbage")
        error, name = ValueError, "adapter_model.safetensors"
    elif broken == "config":
        (path / "loravariants_config.json").write_text("{not json")
        error, name = ValueError, "loravariants_config.json"
    else:
        (path / "adapter_model.safetensors").unlink()
        error, name = FileNotFoundError, "adapter_model.safetensors"
    with pytest.raises(error, match=name):
        lv.load_adapter(make_tiny_llama(), path)
    with pytest.raises(FileNotFoundError, match="nowhere"):
        lv.load_adapter(make_tiny_llama(), tmp_path / "nowhere")


def test_failed_save_leaves_previous_directory_intact(tmp_path, trained, monkeypatch):
    model, _ = trained
    path = tmp_path / "a"
    lv.save_adapter(model, path)
    before = sorted(p.name for p in path.iterdir())

    def explode(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr("loravariants.io.common.save_file", explode)
    with pytest.raises(OSError, match="disk full"):
        lv.save_adapter(model, path)
    assert sorted(p.name for p in path.iterdir()) == before
    assert [p.name for p in tmp_path.iterdir()] == ["a"]  # no temporary left behind


def test_save_rejects_unknown_format(tmp_path, trained):
    with pytest.raises(ValueError, match="format must be one of"):
        lv.save_adapter(trained[0], tmp_path / "x", format="onnx")


def test_native_read_factors_match_layers(tmp_path, trained):
    model, _ = trained
    lv.save_adapter(model, tmp_path / "a")
    factors = read_factors(tmp_path / "a")
    for path, layer in lv.adapter_layers(model).items():
        B, A = factors[path]
        assert_close(B @ A, layer.delta_weight())


def _snapshot(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_load_into_a_merged_adapter_swaps_the_merged_delta(tmp_path, tokens, trained):
    model, ref = trained
    lv.save_adapter(model, tmp_path / "a")
    target = make_tiny_llama()
    base = _snapshot(target)
    lv.attach(target, LoRAConfig(r=4, alpha=8, init="random", target_modules=["q_proj", "v_proj"]))
    lv.merge(target)
    lv.load_adapter(target, tmp_path / "a")  # merged stays merged, now with the loaded delta
    assert_close(target(tokens).logits, ref, rtol=1e-5, atol=1e-5)
    lv.unmerge(target)
    q = "model.layers.0.self_attn.q_proj.weight"
    assert_close(
        target.model.layers[0].self_attn.q_proj.base_layer.weight, base[q], atol=1e-6, rtol=0
    )


def test_a_failed_load_leaves_the_model_as_it_was(tmp_path, tokens, trained):
    model, _ = trained  # LoRA on 2 layers + a modified, trainable final norm
    lv.save_adapter(model, tmp_path / "a")
    # a 3-layer model: layers 0-1 and the norm fit, layer 2 has no tensors in the file
    deeper = make_tiny_llama(num_hidden_layers=3)
    before = _snapshot(deeper)
    with pytest.raises(ValueError, match="adapter_model.safetensors"):
        lv.load_adapter(deeper, tmp_path / "a")
    assert lv.adapter_names(deeper) == [] and lv.extra_trainable_modules(deeper) == []
    after = deeper.state_dict()
    assert after.keys() == before.keys()
    assert all(torch.equal(after[k], before[k]) for k in before)
    # an adapter that was attached keeps its own weights
    other = lv.attach(
        make_tiny_llama(num_hidden_layers=3),
        LoRAConfig(r=4, alpha=8, init="random", target_modules=["q_proj", "v_proj"]),
    )
    before = _snapshot(other)
    with pytest.raises(ValueError):
        lv.load_adapter(other, tmp_path / "a", name="default")
    assert all(torch.equal(other.state_dict()[k], before[k]) for k in before)


def test_nested_modules_to_save_round_trip(tmp_path, tokens):
    model = make_tiny_llama()
    lv.attach(model, LoRAConfig(r=2, init="random", target_modules=["q_proj"]))
    lv.mark_trainable(model, ["model.layers.1.mlp"])
    with torch.no_grad():
        model.model.layers[1].mlp.down_proj.weight.mul_(2.0)
    ref = model(tokens).logits
    for fmt in ("peft", "native"):
        lv.save_adapter(model, tmp_path / fmt, format=fmt)
        fresh = lv.load_adapter(make_tiny_llama(), tmp_path / fmt)
        assert_close(fresh(tokens).logits, ref, rtol=0, atol=0)


def test_save_never_replaces_a_folder_of_other_files(tmp_path, trained, monkeypatch):
    model, _ = trained
    mine = tmp_path / "outputs"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    with pytest.raises(ValueError, match=r"notes\.txt"):
        lv.save_adapter(model, mine)
    assert (mine / "notes.txt").read_text() == "keep me"
    monkeypatch.chdir(mine)
    with pytest.raises(ValueError, match="working directory"):
        lv.save_adapter(model, ".")
    lv.save_adapter(model, tmp_path / "a")
    lv.save_adapter(model, tmp_path / "a", format="peft")  # an adapter folder is replaced
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == [
        "adapter_config.json",
        "adapter_model.safetensors",
    ]


def test_loading_a_file_with_another_alpha_into_an_attached_adapter_is_refused(tmp_path, trained):
    model, _ = trained
    lv.save_adapter(model, tmp_path / "a")  # alpha 8
    other = lv.attach(make_tiny_llama(), LoRAConfig(r=4, alpha=16, target_modules=["q_proj"]))
    with pytest.raises(ValueError, match=r"alpha=8.*alpha=16"):
        lv.load_adapter(other, tmp_path / "a", name="default")
