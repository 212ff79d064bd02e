"""Issue 29: ``loravariants train --run ROW`` under a launcher (``accelerate launch -m
loravariants train ...``) trains that row over the processes, ``train.batch_size`` rows per
process; the main process writes the adapter into the row's usual folder and records the run,
as the one-process command at the same global batch does (adapter and figures equal).

A tiny built-in base is built once per test (a corpus of 24 small files, 4 steps) into the
test's own cache folder, which the launched processes share.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import write_tiny_corpus
from safetensors.torch import load_file
from test_distributed import DDP_CONFIG, ROOT, _port
from torch.testing import assert_close

from loravariants.cli import main

FSDP_CONFIG = str(ROOT / "configs" / "accelerate" / "fsdp.yaml")


def _experiment(tmp_path: Path) -> Path:
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    write_tiny_corpus(corpus)
    base = (
        "{vocab_size: 300, hidden_size: 32, num_layers: 2, num_heads: 2, num_kv_heads: 1, "
        f"intermediate_size: 64, context_length: 32, data_source: '{corpus}', "
        "tokenizer_chars: 20000, steps: 4, batch_size: 2, warmup_steps: 1, val_tokens: 128, "
        "passkey_fraction: 0.0, kv_fraction: 0.0}"
    )
    file = tmp_path / "exp.yaml"
    file.write_text(
        f"base_model_config: {base}\n"
        f"data: {{source: '{corpus}'}}\n"
        "context: {target_length: 64}\n"
        "train: {max_steps: 3, batch_size: 4, warmup_steps: 0, lr: 0.01}\n"
        "eval: {max_tokens: 128, lengths: [32, 64]}\n"
        "seeds: [0]\n"
        "runs:\n"
        "  - {name: lora, adapter: lora, overrides: {r: 2, dropout: 0.0}}\n"
        # a chain of 3 over 3 steps: knots after steps 1 and 2 fold links into the sharded base
        "  - {name: cola, adapter: cola, trainable: [norm],\n"
        "     overrides: {r: 2, dropout: 0.0, chain_length: 3}}\n"
    )
    return file


def _launch(launch_config: str, args: list[str], env: dict) -> subprocess.CompletedProcess:
    cmd = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--config_file",
        launch_config,
        "--num_processes",
        "2",
        "--main_process_port",
        _port(),
        "-m",
        "loravariants",
        *args,
    ]
    return subprocess.run(cmd, env=env, timeout=600, capture_output=True, text=True)


def _record(out: Path, key: str) -> dict:
    runs = json.loads((out / "results.json").read_text())["runs"]
    return next(r for r in runs if r["key"] == key)


def _figures(record: dict) -> dict:
    """Every number of a run's record, nested ones (perplexities, passkey) flattened."""
    from test_shard import _figures as flatten

    return {
        k: v
        for k, v in flatten(record).items()
        if isinstance(v, (int, float)) and not isinstance(v, bool) and "peak_mem" not in k
    }


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["fsdp", "ddp"])
def test_launched_train_command_equals_the_one_process_command(strategy, tmp_path, monkeypatch):
    file = _experiment(tmp_path)
    cache = tmp_path / "cache"
    monkeypatch.setenv("XDG_CACHE_HOME", str(cache))  # the tiny base is built here, once
    args = ["train", "--config", str(file), "--run", "cola", "--seed", "0", "--quiet"]
    assert main([*args, f"output_dir={tmp_path / 'one'}"]) == 0  # batch 4, one process
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": str(ROOT),
        "XDG_CACHE_HOME": str(cache),
    }
    launch_config = FSDP_CONFIG if strategy == "fsdp" else DDP_CONFIG
    two = [*args, f"output_dir={tmp_path / 'two'}", "train.batch_size=2"]  # x 2 processes
    proc = _launch(launch_config, two, env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"adapter: {tmp_path / 'two' / 'runs' / 'cola' / 'seed0' / 'adapter'}" in proc.stdout
    # written once, by the main process, into the row's usual folder, and recorded
    one_dir = tmp_path / "one" / "runs" / "cola" / "seed0" / "adapter"
    two_dir = tmp_path / "two" / "runs" / "cola" / "seed0" / "adapter"
    want = load_file(one_dir / "adapter_model.safetensors")
    got = load_file(two_dir / "adapter_model.safetensors")
    assert got.keys() == want.keys() and got
    for key in want:
        assert_close(got[key], want[key], atol=1e-5, rtol=1e-4, msg=key)
    a, b = _record(tmp_path / "one", "cola/seed0"), _record(tmp_path / "two", "cola/seed0")
    assert a["status"] == b["status"] == "ok"
    fa, fb = _figures(a), _figures(b)
    assert fa.keys() == fb.keys() and any("ppl" in k for k in fa), sorted(fa)
    for key in fa:
        same = math.isclose(fa[key], fb[key], rel_tol=1e-4, abs_tol=1e-6)
        assert same or (math.isnan(fa[key]) and math.isnan(fb[key])), (key, fa[key], fb[key])
    assert (tmp_path / "two" / "report.md").is_file()
    # the other row is still reported as not run, as after the one-process command
    assert "lora/seed0" not in {
        r["key"]
        for r in json.loads((tmp_path / "two" / "results.json").read_text())["runs"]
        if r.get("status") == "ok"
    }


def test_an_unsupported_launch_of_the_train_command_is_refused_before_any_work(
    tmp_path, monkeypatch, capsys
):
    """A DeepSpeed launch: one line naming the supported strategies, exit 2, nothing built or
    written (the base model would be built first otherwise)."""
    file = _experiment(tmp_path)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    monkeypatch.setenv("WORLD_SIZE", "2")
    args = ["train", "--config", str(file), "--run", "cola", f"output_dir={tmp_path / 'out'}"]
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert "row 'cola' (cola) cannot train under deepspeed" in err[0]
    assert "supported strategies for it: single, ddp, fsdp" in err[0]
    assert not (tmp_path / "out").exists() and not (tmp_path / "cache").exists()
    assert torch.distributed.is_initialized() is False
