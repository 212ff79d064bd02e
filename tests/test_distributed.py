"""Issue 17: every variant under ``accelerate launch`` (DDP, gloo on CPU) equals one process at
the same global batch; unsupported variant/strategy pairs are refused before any work.

Each launch costs ~15 s of CPU: MixLoRA (the variant whose balance loss needs a cross-process
reduction) runs in the default suite, the other variants with ``-m slow``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from _train_script import DDP_VARIANTS, variant_main
from conftest import make_tiny_llama
from safetensors.torch import load_file
from torch.testing import assert_close

import loravariants as lv
from loravariants.distributed import (
    STRATEGIES,
    check_supported,
    support_table,
)

HERE = Path(__file__).parent
ROOT = HERE.parent
SCRIPT = str(HERE / "_train_script.py")
DDP_CONFIG = str(ROOT / "configs" / "accelerate" / "ddp.yaml")


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}


def _port() -> str:
    # a port per test process: tests of two checkouts may run at once on one machine
    return str(29600 + os.getpid() % 300)


def launch(
    config: str, args: list[str], processes: int = 2, script: str = SCRIPT
) -> subprocess.CompletedProcess:
    """``accelerate launch --config_file CONFIG SCRIPT ARGS`` in a subprocess (default script:
    tests/_train_script.py)."""
    cmd = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--config_file",
        config,
        "--num_processes",
        str(processes),
        "--main_process_port",
        _port(),
        script,
        *args,
    ]
    return subprocess.run(cmd, env=_env(), timeout=600, capture_output=True, text=True)


def _check_ddp_equals_one_process(variant: str, tmp_path: Path, steps: int = 5) -> None:
    # one process at batch 4 (in this process: no second interpreter start-up) ...
    variant_main([variant, str(tmp_path / "one"), "4", str(steps)])
    # ... and two processes at batch 2 each: the same global batch, the same rows per step
    proc = launch(DDP_CONFIG, ["variant", variant, str(tmp_path / "two"), "2", str(steps)])
    assert proc.returncode == 0, proc.stderr[-3000:]
    one = json.loads((tmp_path / "one" / "result.json").read_text())
    two = json.loads((tmp_path / "two" / "result.json").read_text())
    assert_close(torch.tensor(two["losses"]), torch.tensor(one["losses"]), atol=1e-5, rtol=1e-5)
    assert_close(torch.tensor(two["aux"]), torch.tensor(one["aux"]), atol=1e-5, rtol=1e-5)
    assert two["router"] == one["router"]  # routing of the last step, every process's tokens
    ref = load_file(tmp_path / "one" / "state-rank0.safetensors")
    r0 = load_file(tmp_path / "two" / "state-rank0.safetensors")
    r1 = load_file(tmp_path / "two" / "state-rank1.safetensors")
    assert r0.keys() == ref.keys() == r1.keys()
    for key in ref:  # every tensor, the frozen weights included (COLA folds links into them)
        assert torch.equal(r0[key], r1[key]), f"the two processes differ at {key}"
        assert_close(r0[key], ref[key], atol=1e-5, rtol=1e-4, msg=key)


def test_mixlora_ddp_equals_one_process(tmp_path):
    """Balance loss at coefficient 1 (reduced as one process computes it over the global
    batch), experts that a process's rows do not reach (find_unused_parameters), the router
    statistics of the global batch."""
    _check_ddp_equals_one_process("mixlora", tmp_path)


@pytest.mark.slow
@pytest.mark.parametrize("variant", ["lora", "cola", "multilora", "mixlora-per-layer"])
def test_variant_ddp_equals_one_process(variant, tmp_path):
    """COLA: knots at 2 and 4 (two links folded and redrawn on every rank alike)."""
    _check_ddp_equals_one_process(variant, tmp_path)


@pytest.mark.slow
def test_cola_rank_step_down_is_refused_under_ddp_before_training(tmp_path):
    proc = launch(DDP_CONFIG, ["variant", "cola-step-down", str(tmp_path / "out"), "2", "3"])
    assert proc.returncode != 0
    assert "cannot train under ddp: link_ranks=[2, 1] steps the rank down" in proc.stderr
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------------------------
# the support table and its check (in-process: no launch needed)
# ---------------------------------------------------------------------------------------------


def test_support_table_covers_every_variant_and_strategy():
    from loravariants.adapters.base import VARIANTS as REGISTRY

    table = support_table()
    assert set(table) == set(REGISTRY)
    for variant, row in table.items():
        assert set(row) == set(STRATEGIES), variant
        assert row["single"] is None and row["ddp"] is None, variant


@pytest.mark.parametrize("variant", ["lora", "cola", "mixlora", "multilora"])
def test_unsupported_pair_is_refused_naming_the_alternatives(variant):
    model = lv.attach(make_tiny_llama(), DDP_VARIANTS[variant]())
    with pytest.raises(ValueError) as info:
        check_supported(model, "deepspeed")
    message = str(info.value)
    assert "\n" not in message
    assert f"({variant}) cannot train under deepspeed" in message
    assert "FSDP2 is the supported sharded path" in message
    assert "supported strategies for it: single, ddp, fsdp" in message
    check_supported(model, "ddp")  # supported: no error
    check_supported(model, "fsdp")


def test_cola_rank_step_down_is_refused_under_ddp_only():
    model = lv.attach(make_tiny_llama(), DDP_VARIANTS["cola-step-down"]())
    with pytest.raises(
        ValueError,
        match=r"link_ranks=\[2, 1\] steps the rank down.*strategies for it: single, fsdp ",
    ):
        check_supported(model, "ddp")
    check_supported(model, "single")


@pytest.mark.parametrize(
    ("launch_env", "variant"),
    [("WORLD_SIZE", "cola-step-down"), ("ACCELERATE_USE_DEEPSPEED", "lora")],
)
def test_an_unsupported_launch_is_refused_before_any_work(
    launch_env, variant, monkeypatch, tmp_path
):
    """What ``accelerate launch`` with a DDP (two processes) or DeepSpeed config sets; on a
    machine without GPUs accelerate itself would quietly run DDP for DeepSpeed, so the request
    is what counts."""
    from _train_script import random_blocks

    from loravariants.train import TrainConfig, train

    monkeypatch.setenv(launch_env, "2" if launch_env == "WORLD_SIZE" else "true")
    model = lv.attach(make_tiny_llama(), DDP_VARIANTS[variant]())
    before = {k: v.clone() for k, v in model.state_dict().items()}
    match = rf"\({lv.adapter_config(model).variant}\) cannot train under .*supported strategies"
    with pytest.raises(ValueError, match=match):
        train(model, random_blocks(n=4), TrainConfig(max_steps=1), output_dir=tmp_path / "out")
    assert not (tmp_path / "out").exists()
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
