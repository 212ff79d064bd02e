"""The shared training loop: learning, exact resume, divergence, multi-process equality."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from _train_script import random_blocks
from conftest import make_tiny_llama
from torch.optim.optimizer import register_optimizer_step_pre_hook
from torch.testing import assert_close

import loravariants as lv
from loravariants.adapters import LoRAConfig
from loravariants.train import TrainConfig, TrainingDiverged, lr_factor, train

HERE = Path(__file__).parent


def _model():
    return lv.attach(make_tiny_llama(), LoRAConfig(r=4, dropout=0.1))


def test_loss_decreases_and_result_fields(tmp_path):
    config = TrainConfig(max_steps=12, batch_size=4, lr=1e-2, warmup_steps=2, log_every=4)
    result = train(_model(), random_blocks(), config, output_dir=tmp_path, progress=False)
    assert len(result.losses) == 12 and result.steps == 12
    assert sum(result.losses[-3:]) / 3 < sum(result.losses[:3]) / 3
    assert result.tokens == 12 * 4 * 15 and result.tokens_per_second > 0
    lines = [json.loads(ln) for ln in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [ln["step"] for ln in lines] == [4, 8, 12]


def test_same_seed_same_losses():
    config = TrainConfig(max_steps=4, batch_size=2, lr=1e-2, warmup_steps=0)
    a = train(_model(), random_blocks(), config, progress=False).losses
    b = train(_model(), random_blocks(), config, progress=False).losses
    assert a == b


def test_killed_and_resumed_run_matches_uninterrupted(tmp_path):
    config = TrainConfig(
        max_steps=6,
        batch_size=2,
        lr=1e-2,
        warmup_steps=2,
        schedule="cosine",
        save_every=3,
        keep_last=2,
    )
    full_model = _model()
    full = train(full_model, random_blocks(), config, output_dir=tmp_path / "full", progress=False)
    ckpts = sorted((tmp_path / "full" / "checkpoints").glob("step-*"))
    assert [p.name for p in ckpts] == ["step-0000003", "step-0000006"]
    # The process "dies" after step 3: only the step-3 checkpoint exists when we come back.
    import shutil

    shutil.copytree(tmp_path / "full", tmp_path / "cut")
    shutil.rmtree(tmp_path / "cut" / "checkpoints" / "step-0000006")
    resumed_model = _model()
    resumed = train(
        resumed_model, random_blocks(), config, output_dir=tmp_path / "cut", progress=False
    )
    assert resumed.resumed_from == 3
    assert resumed.losses == full.losses
    for (name, a), b in zip(
        full_model.state_dict().items(), resumed_model.state_dict().values(), strict=True
    ):
        assert torch.equal(a, b), name
    steps = [
        json.loads(ln)["step"]
        for ln in (tmp_path / "cut" / "metrics.jsonl").read_text().splitlines()
    ]
    assert steps == [1, 2, 3, 4, 5, 6]


def test_keep_last_prunes_old_checkpoints(tmp_path):
    config = TrainConfig(max_steps=4, batch_size=2, warmup_steps=0, save_every=1, keep_last=2)
    train(_model(), random_blocks(), config, output_dir=tmp_path, progress=False)
    names = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert names == ["step-0000003", "step-0000004"]


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path, monkeypatch):
    model = _model()
    config = TrainConfig(max_steps=5, batch_size=2, warmup_steps=0, save_every=2)
    calls = {"n": 0}
    original = type(model).forward

    def poisoned(self, *args, **kwargs):
        out = original(self, *args, **kwargs)
        calls["n"] += 1
        if calls["n"] == 3:
            out.loss = out.loss * float("nan")
        return out

    monkeypatch.setattr(type(model), "forward", poisoned)
    with pytest.raises(TrainingDiverged, match="step 3.*step-0000002"):
        train(model, random_blocks(), config, output_dir=tmp_path, progress=False)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step-0000002"]


def test_grad_accumulation_equals_larger_batch():
    """2 micro-batches of 2 rows = 1 batch of 4 rows (equal token counts per row)."""
    big = TrainConfig(max_steps=3, batch_size=4, lr=1e-2, warmup_steps=0)
    small = TrainConfig(max_steps=3, batch_size=2, grad_accum=2, lr=1e-2, warmup_steps=0)
    m1 = lv.attach(make_tiny_llama(), LoRAConfig(r=4))
    m2 = lv.attach(make_tiny_llama(), LoRAConfig(r=4))
    l1 = train(m1, random_blocks(), big, progress=False).losses
    l2 = train(m2, random_blocks(), small, progress=False).losses
    assert_close(torch.tensor(l1), torch.tensor(l2), atol=1e-5, rtol=1e-5)


def test_grad_accumulation_weighs_label_tokens_not_micro_batches():
    """Rows with different numbers of label tokens (masked prompts): 4x1, 2x2 and 1x4 rows per
    step give the same losses and weights, as one batch of 4 would."""
    data = random_blocks(masked=True)
    counts = {int((b["labels"][1:] != -100).sum()) for b in data[:8]}
    assert len(counts) > 2  # the test needs uneven rows
    runs = []
    for batch_size, accum in ((4, 1), (2, 2), (1, 4)):
        model = lv.attach(make_tiny_llama(), LoRAConfig(r=4, init="random"))
        config = TrainConfig(
            max_steps=3, batch_size=batch_size, grad_accum=accum, lr=1e-2, warmup_steps=0
        )
        result = train(model, data, config, progress=False)
        runs.append((result.losses, lv.adapter_layers(model)))
    for losses, layers in runs[1:]:
        assert_close(torch.tensor(losses), torch.tensor(runs[0][0]), atol=1e-5, rtol=1e-5)
        for path, layer in layers.items():
            assert_close(layer.lora_B, runs[0][1][path].lora_B, atol=1e-5, rtol=1e-4)


def test_cola_lr_schedule_restarts_on_the_new_links_first_step():
    from loravariants.adapters import COLAConfig

    used = []
    hook = register_optimizer_step_pre_hook(
        lambda opt, args, kwargs: used.append(opt.param_groups[0]["lr"])
    )
    try:
        model = lv.attach(make_tiny_llama(), COLAConfig(r=2, knots=[4], restart_lr_schedule=True))
        config = TrainConfig(max_steps=8, batch_size=2, lr=0.3, warmup_steps=3)
        train(model, random_blocks(), config, progress=False)
    finally:
        hook.remove()
    expected = [0.1, 0.2, 0.3, 0.3, 0.1, 0.2, 0.3, 0.3]  # warm-up again from step 5
    assert_close(torch.tensor(used), torch.tensor(expected))


def test_fresh_run_drops_old_checkpoints_and_resume_checks_settings(tmp_path):
    def run(seed, steps=4, resume=True):
        config = TrainConfig(max_steps=steps, batch_size=2, warmup_steps=0, save_every=1, seed=seed)
        return train(
            _model(), random_blocks(), config, output_dir=tmp_path, resume=resume, progress=False
        )

    run(seed=0)
    with pytest.raises(ValueError, match=r"cannot resume.*seed: 0 -> 1"):
        run(seed=1)
    run(seed=1, steps=2, resume=False)  # starts over: the seed-0 checkpoints are gone
    names = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert names == ["step-0000001", "step-0000002"]
    finished = run(seed=1, steps=2)  # nothing left to do
    assert finished.resumed_from == 2 and finished.steps == 2 and len(finished.losses) == 2
    longer = run(seed=1, steps=3)  # a larger budget may resume
    assert longer.resumed_from == 2 and longer.steps == 3


def test_lr_schedule_shapes():
    assert lr_factor(0, 4, 10, "constant") == 0.25
    assert lr_factor(3, 4, 10, "constant") == 1.0
    assert lr_factor(9, 4, 10, "constant") == 1.0
    assert lr_factor(4, 4, 10, "linear") == 1.0 and lr_factor(10, 4, 10, "linear") == 0.0
    assert lr_factor(7, 4, 10, "cosine") == pytest.approx(0.5)


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"max_steps": 0}, "max_steps"),
        ({"lr": 0}, "lr"),
        ({"schedule": "step"}, "schedule"),
        ({"betas": (0.9, 1.0)}, "betas"),
        ({"mixed_precision": "fp8"}, "mixed_precision"),
    ],
)
def test_bad_train_config_names_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        TrainConfig(**kwargs)


def test_two_processes_equal_one_process_at_same_global_batch(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(HERE.parent)}
    script = str(HERE / "_train_script.py")
    subprocess.run(
        [sys.executable, script, str(tmp_path / "one"), "4"], check=True, env=env, timeout=300
    )
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node",
            "2",
            "--master_port",
            "29517",
            script,
            str(tmp_path / "two"),
            "2",
        ],
        env=env,
        timeout=300,
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    one = torch.load(tmp_path / "one" / "adapter-rank0.pt")
    r0 = torch.load(tmp_path / "two" / "adapter-rank0.pt")
    r1 = torch.load(tmp_path / "two" / "adapter-rank1.pt")
    for key in one:
        assert torch.equal(r0[key], r1[key]), f"ranks differ at {key}"
        assert_close(r0[key], one[key], atol=1e-5, rtol=1e-4)
    l1 = json.loads((tmp_path / "one" / "losses.json").read_text())
    l2 = json.loads((tmp_path / "two" / "losses.json").read_text())
    assert_close(torch.tensor(l1), torch.tensor(l2), atol=1e-5, rtol=1e-5)
