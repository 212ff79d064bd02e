"""Issue 17: LoRA under FSDP2 (``accelerate launch --config_file configs/accelerate/fsdp.yaml``,
gloo on CPU) equals one process at the same global batch: losses, every model tensor (the
sharded frozen base gathered) and the adapter ``save_adapter`` writes on each process. Other
variants, and checkpoints under FSDP, are refused before any work.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from _train_script import DDP_VARIANTS, random_blocks, variant_main
from conftest import make_tiny_llama
from safetensors.torch import load_file
from test_distributed import ROOT, launch
from torch.testing import assert_close

import loravariants as lv
from loravariants.distributed import check_supported, supported_strategies
from loravariants.train import TrainConfig, train

FSDP_CONFIG = str(ROOT / "configs" / "accelerate" / "fsdp.yaml")


def test_lora_fsdp_equals_one_process(tmp_path):
    steps = 5
    variant_main(["lora", str(tmp_path / "one"), "4", str(steps)])
    proc = launch(FSDP_CONFIG, ["variant", "lora", str(tmp_path / "two"), "2", str(steps)])
    assert proc.returncode == 0, proc.stderr[-3000:]
    one = json.loads((tmp_path / "one" / "result.json").read_text())
    two = json.loads((tmp_path / "two" / "result.json").read_text())
    # sharded for real: the frozen decoder-layer weights were DTensors, the adapters whole
    assert one["sharded"] == []
    assert any(".layers.0.self_attn.q_proj." in n for n in two["sharded"]), two["sharded"]
    assert not set(two["sharded"]) & set(two["trainable"])
    assert two["trainable"] == one["trainable"] != []
    assert_close(torch.tensor(two["losses"]), torch.tensor(one["losses"]), atol=1e-5, rtol=1e-5)
    ref = load_file(tmp_path / "one" / "state-rank0.safetensors")
    for rank in (0, 1):
        state = load_file(tmp_path / "two" / f"state-rank{rank}.safetensors")
        assert state.keys() == ref.keys()
        for key in ref:
            assert_close(state[key], ref[key], atol=1e-5, rtol=1e-4, msg=key)
        # the adapter as the library saves it, from each process of the sharded run
        saved = load_file(tmp_path / "two" / f"adapter-rank{rank}" / "adapter_model.safetensors")
        want = load_file(tmp_path / "one" / "adapter-rank0" / "adapter_model.safetensors")
        assert saved.keys() == want.keys() and saved
        for key in want:
            assert_close(saved[key], want[key], atol=1e-5, rtol=1e-4, msg=key)
    # B starts at zero: the compared adapter did train
    assert all(ref[k].abs().sum() > 0 for k in ref if k.endswith("lora_B"))


def test_only_plain_lora_supports_fsdp():
    lora = lv.attach(make_tiny_llama(), DDP_VARIANTS["lora"]())
    check_supported(lora, "fsdp")
    assert supported_strategies(lv.adapter_config(lora)) == ["single", "ddp", "fsdp"]
    # COLA is a LoRAConfig subclass: it must not inherit LoRA's FSDP support
    for variant in ("cola", "multilora", "mixlora"):
        model = lv.attach(make_tiny_llama(), DDP_VARIANTS[variant]())
        with pytest.raises(ValueError, match=r"cannot train under fsdp.*for it: single, ddp \("):
            check_supported(model, "fsdp")


@pytest.mark.parametrize("resume_from_checkpoint", [False, True])
def test_checkpoints_under_fsdp_are_refused_before_any_work(
    resume_from_checkpoint, monkeypatch, tmp_path: Path
):
    out = tmp_path / "out"
    config = TrainConfig(max_steps=1, save_every=1)
    if resume_from_checkpoint:  # a checkpoint written by a one-process run
        model = lv.attach(make_tiny_llama(), DDP_VARIANTS["lora"]())
        train(model, random_blocks(n=4), config, output_dir=out, progress=False)
        config = TrainConfig(max_steps=2)
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    model = lv.attach(make_tiny_llama(), DDP_VARIANTS["lora"]())
    before = {k: v.clone() for k, v in model.state_dict().items()}
    listing = sorted(out.rglob("*")) if out.exists() else None
    match = "holds a checkpoint" if resume_from_checkpoint else "save_every > 0 is not supported"
    with pytest.raises(ValueError, match=match):
        train(model, random_blocks(n=4), config, output_dir=out, progress=False)
    assert (sorted(out.rglob("*")) if out.exists() else None) == listing
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
