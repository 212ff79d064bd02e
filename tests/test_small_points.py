"""Smaller points of issue 18: embedding LoRA, string target_modules, seeds."""

from __future__ import annotations

import peft
import pytest
from conftest import make_tiny_llama

import loravariants as lv
from loravariants.adapters import LoRAConfig


@pytest.fixture
def embedding_lora(tmp_path):
    model = peft.get_peft_model(
        make_tiny_llama(), peft.LoraConfig(r=2, target_modules=["embed_tokens", "q_proj"])
    )
    model.save_pretrained(tmp_path / "p")
    return tmp_path / "p"


def test_embedding_lora_is_refused_by_name(embedding_lora):
    with pytest.raises(ValueError, match=r"embedding LoRA .*embed_tokens.* is not supported"):
        lv.load_adapter(make_tiny_llama(), embedding_lora)


def test_analyze_says_it_leaves_embedding_lora_out(embedding_lora):
    from loravariants.analysis import analyze

    with pytest.warns(UserWarning, match="embedding LoRA .* left out"):
        rows = analyze(str(embedding_lora)).rows()
    assert rows and all("q_proj" in r["module"] for r in rows)


def test_a_plain_name_string_target_says_why_it_matched_nothing():
    with pytest.raises(ValueError, match=r"regular expression .*whole module name.*\['q_proj'\]"):
        lv.attach(make_tiny_llama(), LoRAConfig(target_modules="q_proj"))
    # the regex and the list forms both work
    lv.attach(make_tiny_llama(), LoRAConfig(target_modules=r".*\.q_proj"))
    lv.attach(make_tiny_llama(), LoRAConfig(target_modules=["q_proj"]))
