"""Every ```python block of README.md and docs/ runs (issue 18, item 8).

Each block runs on its own, as a reader who copies one would run it: it must import what it
uses (nothing is imported for it). Only the *data* a snippet refers to is given: ``model``
(a tiny Llama), ``path`` (that model saved), ``batch``, ``x``, ``q, k, v``, ..., and the
adapter folders named in the text are created.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from conftest import make_tiny_llama
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
FILES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
_BLOCK = re.compile(r"^```python\n(.*?)^```", re.S | re.M)


def _blocks(file: Path) -> list[str]:
    return _BLOCK.findall(file.read_text())


def _random_lora(model, **kw):
    import loravariants as lv
    from loravariants.adapters import LoRAConfig

    lv.attach(model, LoRAConfig(init="random", **{"r": 4, **kw}))
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.1)
    return model


def _layer(cls, config, dim=128):
    return cls(nn.Linear(dim, dim), config)


@pytest.fixture
def data(tmp_path, monkeypatch):
    """Files and folders the snippets name, in a temp working directory."""
    import loravariants as lv

    monkeypatch.chdir(tmp_path)
    make_tiny_llama().save_pretrained(tmp_path / "tiny")
    make_tiny_llama().save_pretrained(tmp_path / "path" / "to" / "base_model")
    for folder in ("runs/lora/seed0/adapter", "adapter_dir", "runs/multilora/seed0/adapter"):
        lv.save_adapter(_random_lora(make_tiny_llama()), tmp_path / folder)
    return tmp_path


def _namespace(file: Path, root: Path) -> dict:
    """The data of one block (fresh each time; no modules)."""
    from loravariants.adapters import (
        COLAConfig,
        LoRAConfig,
        LoRALinear,
        MixLoRAConfig,
        MultiLoRAConfig,
    )
    from loravariants.adapters.cola import COLALinear
    from loravariants.adapters.multilora import MultiLoRALinear

    tokens = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(0))
    model = make_tiny_llama()
    base_model = make_tiny_llama()
    if file.name == "analysis.md":  # wide enough for intruder_base_k=64
        wide = {"hidden_size": 128, "intermediate_size": 256}
        model = _random_lora(make_tiny_llama(**wide), target_modules=["q_proj", "v_proj"])
        base_model = make_tiny_llama(**wide)
    gen = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(1, 2, 16, 8, generator=gen) for _ in range(3))

    def lora(r):
        layer = _layer(LoRALinear, LoRAConfig(r=r, init="random", target_modules=["x"]))
        nn.init.normal_(layer.lora_B, 0, 0.1)
        return layer

    mix_model = _random_lora(make_tiny_llama(), target_modules=["q_proj"])
    import loravariants as lv

    lv.attach(mix_model, MixLoRAConfig(num_experts=2, r=4, target_modules=[]), name="mix")
    mixlora_ffn = next(
        layer for _, _, layer in lv.iter_adapters(mix_model, "mix") if not layer.mergeable
    )
    return {
        "model": model,
        "path": str(root / "tiny"),
        "batch": {"input_ids": tokens, "labels": tokens},
        "x": torch.randn(4, 512, generator=gen),
        "q": q,
        "k": k,
        "v": v,
        "n": 16,
        "pad_mask": torch.ones(1, 16, dtype=torch.long),
        "target_length": 512,
        "loader": [{"input_ids": tokens, "labels": tokens}] * 2,
        "optimizer": torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.1),
        "layer_r8": lora(8),
        "layer_r64": lora(64),
        "l0": lora(8),
        "l1": lora(8),
        "l2": lora(8),
        "mixlora_ffn": mixlora_ffn,
        "cola_layer": _layer(COLALinear, COLAConfig(r=4, target_modules=["x"])),
        "multilora_layer": _layer(MultiLoRALinear, MultiLoRAConfig(r=4, target_modules=["x"])),
        "base_model": base_model,
    }


def _real_extra_installed() -> bool:
    from loravariants.real_models import REAL_MODELS, MissingExtraError, find_gguf

    try:
        find_gguf(REAL_MODELS["smollm2-135m"])
    except MissingExtraError:
        return False
    return True


@pytest.mark.parametrize("file", [f for f in FILES if _blocks(f)], ids=lambda f: f.name)
def test_every_python_snippet_runs(file, data):
    from loravariants.real_models import MissingExtraError

    for i, block in enumerate(_blocks(file)):
        namespace = _namespace(file, data)
        try:
            exec(compile(block, f"{file.name}[python block {i}]", "exec"), namespace)
        except MissingExtraError as e:
            # a snippet of the real model, run without its optional extra: what the reader sees
            # must be the one line with the install command (with the extra, it must run)
            if _real_extra_installed():
                pytest.fail(f"{file.name}, python block {i}: {e} although the extra is installed")
            assert "pip install" in str(e) and "\n" not in str(e)
        except Exception as e:
            pytest.fail(f"{file.name}, python block {i}:\n{block}\n-> {type(e).__name__}: {e}")
