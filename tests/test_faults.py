"""Crashes and unlucky machines: what a kill, a full disk or a second process leaves behind.

The first half checks each defence in-process (the state a kill leaves is built by hand); the
second kills real training subprocesses (``tests/_train_script.py fault ...``) at chosen
points, resumes them, and checks the final weights equal an uninterrupted run bit for bit.
A handful of kills run by default; ``pytest -m slow`` runs >= 20 per variant.
"""

from __future__ import annotations

import json
import os
import pickle
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from _train_script import random_blocks
from conftest import make_tiny_llama
from safetensors.torch import load_file

import loravariants as lv
from loravariants import utils
from loravariants.adapters import LoRAConfig
from loravariants.io import read_factors
from loravariants.train import TrainConfig, TrainingDiverged, train
from loravariants.utils import atomic_directory

HERE = Path(__file__).parent
DEAD_PID = 4_000_000_000  # beyond any pid_max: a writer that no longer runs


def _model(config=None):
    return lv.attach(make_tiny_llama(), config or LoRAConfig(r=2, dropout=0.0))


def _state(model) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


# ---------------------------------------------------------------------------------------------
# item 2: an adapter path is never empty
# ---------------------------------------------------------------------------------------------


def test_a_kill_between_the_two_renames_is_recovered_by_the_next_load(tmp_path):
    model = _model()
    target = tmp_path / "adapter"
    lv.save_adapter(model, target)
    # what a kill between `replace(target, old)` and `replace(tmp, target)` leaves
    old = tmp_path / f".adapter.old-{DEAD_PID}-abc"
    os.replace(target, old)
    partial = tmp_path / f".adapter.tmp-{DEAD_PID}-xyz"
    partial.mkdir()
    (partial / "adapter_model.safetensors").write_bytes(b"\0" * 10)
    lv.load_adapter(_model(), target)
    assert target.is_dir() and sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]


def test_leftovers_of_dead_writers_are_cleaned_and_live_ones_kept(tmp_path):
    model = _model()
    target = tmp_path / "adapter"
    for i in range(5):
        (tmp_path / f".adapter.tmp-{DEAD_PID}-{i}").mkdir()
        (tmp_path / f".adapter.old-{DEAD_PID}-{i}").mkdir()
    live = tmp_path / f".adapter.tmp-{os.getpid()}-live"
    live.mkdir()
    lv.save_adapter(model, target)
    lv.save_adapter(model, target)
    assert sorted(p.name for p in tmp_path.iterdir()) == [live.name, "adapter"]


def test_replace_swaps_in_one_step(tmp_path, monkeypatch):
    """The replace is one atomic exchange: no moment without the target (where the OS has it)."""
    target = tmp_path / "d"
    with atomic_directory(target) as tmp:
        (tmp / "f").write_text("old")
    seen = []
    real_replace = os.replace

    def watching_replace(a, b):
        seen.append(target.exists())
        real_replace(a, b)

    monkeypatch.setattr(utils.os, "replace", watching_replace)
    with atomic_directory(target) as tmp:
        (tmp / "f").write_text("new")
    assert (target / "f").read_text() == "new"
    if utils._exchange is not None and sys.platform.startswith("linux"):
        assert seen == []  # renameat2(RENAME_EXCHANGE): no rename pair at all
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d"]


def test_created_folders_honour_the_umask(tmp_path):
    old = os.umask(0o022)
    try:
        with atomic_directory(tmp_path / "d") as tmp:
            (tmp / "f").write_text("x")
    finally:
        os.umask(old)
    assert (tmp_path / "d").stat().st_mode & 0o777 == 0o755


# ---------------------------------------------------------------------------------------------
# item 3: no checkpoint holds a non-finite weight
# ---------------------------------------------------------------------------------------------


def _all_finite(ckpt: Path) -> bool:
    for f in ckpt.rglob("adapter_model.safetensors"):
        if not all(torch.isfinite(t).all() for t in load_file(f).values()):
            return False
    return True


def test_a_huge_lr_never_saves_non_finite_weights(tmp_path):
    config = TrainConfig(max_steps=8, batch_size=2, lr=1e30, warmup_steps=0, save_every=1)
    config.max_grad_norm = 0.0
    with pytest.raises(TrainingDiverged, match="Last good checkpoint|No checkpoint"):
        train(_model(), random_blocks(n=8), config, output_dir=tmp_path, progress=False)
    ckpts = sorted((tmp_path / "checkpoints").glob("step-*"))
    assert all(_all_finite(c) for c in ckpts)


def test_a_nan_gradient_with_a_finite_loss_is_not_saved(tmp_path, monkeypatch):
    model = _model()
    calls = {"n": 0}

    def poison(module, grad_in, grad_out):
        calls["n"] += 1
        if calls["n"] > 2:
            return tuple(torch.full_like(g, float("nan")) if g is not None else g for g in grad_in)
        return None

    model.lm_head.register_full_backward_hook(poison)
    config = TrainConfig(max_steps=6, batch_size=2, lr=1e-2, warmup_steps=0, save_every=1)
    with pytest.raises(TrainingDiverged, match="gradient") as err:
        train(model, random_blocks(n=8), config, output_dir=tmp_path, progress=False)
    ckpts = sorted((tmp_path / "checkpoints").glob("step-*"))
    assert ckpts and all(_all_finite(c) for c in ckpts)
    assert ckpts[-1].name in str(err.value)


def _poison_checkpoint(ckpt: Path) -> None:
    """What a flipped bit, a bad copy or a hand leaves: a NaN in the saved adapter."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    file = ckpt / "adapters" / "default" / "adapter_model.safetensors"
    with safe_open(str(file), framework="pt") as f:
        metadata = f.metadata()
    tensors = load_file(file)
    name = sorted(tensors)[0]
    tensors[name] = torch.full_like(tensors[name], float("nan"))
    save_file(tensors, str(file), metadata=metadata)


def test_a_non_finite_final_checkpoint_is_not_resumed(tmp_path):
    """Issue 27 item 4: checked finite when read too; the one before it is resumed."""
    config = TrainConfig(max_steps=3, batch_size=2, lr=1e-2, warmup_steps=0, save_every=1)
    train(_model(), random_blocks(n=8), config, output_dir=tmp_path, progress=False)
    _poison_checkpoint(tmp_path / "checkpoints" / "step-0000003")
    model = _model()
    with pytest.warns(UserWarning, match="step-0000003.*NaN, infinite or too large"):
        result = train(model, random_blocks(n=8), config, output_dir=tmp_path, progress=False)
    assert result.resumed_from == 2 and result.steps == 3
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_training_diverged_names_the_last_finite_checkpoint(tmp_path):
    """Issue 27 item 4: after a NaN mid-run, the 'last good' checkpoint is a finite one."""
    config = TrainConfig(max_steps=3, batch_size=2, lr=1e-2, warmup_steps=0, save_every=1)
    train(_model(), random_blocks(n=8), config, output_dir=tmp_path, progress=False)
    _poison_checkpoint(tmp_path / "checkpoints" / "step-0000003")
    model = _model()
    model.lm_head.register_full_backward_hook(
        lambda m, grad_in, grad_out: tuple(
            torch.full_like(g, float("nan")) if g is not None else g for g in grad_in
        )
    )
    config.max_steps = 5
    with pytest.warns(UserWarning), pytest.raises(TrainingDiverged) as err:
        train(model, random_blocks(n=8), config, output_dir=tmp_path, progress=False)
    assert "step-0000002" in str(err.value) and "step-0000003" not in str(err.value)


# ---------------------------------------------------------------------------------------------
# items 5, 6, 8 and the smaller items of train()
# ---------------------------------------------------------------------------------------------


def test_a_cut_last_metrics_line_does_not_block_resume(tmp_path):
    config = TrainConfig(max_steps=2, batch_size=2, lr=1e-2, warmup_steps=0, save_every=1)
    train(_model(), random_blocks(n=8), config, output_dir=tmp_path, progress=False)
    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text(metrics.read_text() + '{"step": 3, "loss": 1.2')  # power cut mid-write
    config.max_steps = 3
    result = train(_model(), random_blocks(n=8), config, output_dir=tmp_path, progress=False)
    assert result.resumed_from == 2
    assert [json.loads(ln)["step"] for ln in metrics.read_text().splitlines()] == [1, 2, 3]


def test_a_truncated_trainer_state_falls_back_to_the_checkpoint_before(tmp_path):
    config = TrainConfig(max_steps=3, batch_size=2, lr=1e-2, warmup_steps=0, save_every=1)
    config.keep_last = 3
    train(_model(), random_blocks(n=8), config, output_dir=tmp_path, progress=False)
    state = tmp_path / "checkpoints" / "step-0000003" / "trainer_state.pt"
    state.write_bytes(state.read_bytes()[:100])
    config.max_steps = 4
    with pytest.warns(UserWarning, match="step-0000003.*trainer_state.pt"):
        result = train(_model(), random_blocks(n=8), config, output_dir=tmp_path, progress=False)
    assert result.resumed_from == 2 and result.steps == 4


class _Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def test_a_malicious_trainer_state_is_refused_with_a_reason(tmp_path):
    config = TrainConfig(max_steps=1, batch_size=2, lr=1e-2, warmup_steps=0, save_every=1)
    train(_model(), random_blocks(n=8), config, output_dir=tmp_path, progress=False)
    state = tmp_path / "checkpoints" / "step-0000001" / "trainer_state.pt"
    with state.open("wb") as f:
        pickle.dump({"step": _Evil()}, f, protocol=2)
    config.max_steps = 2
    with pytest.raises(ValueError, match="trainer_state.pt: refused to load.*Python objects"):
        train(_model(), random_blocks(n=8), config, output_dir=tmp_path, progress=False)


def test_checkpoint_leftovers_are_cleaned(tmp_path):
    config = TrainConfig(max_steps=2, batch_size=2, lr=1e-2, warmup_steps=0, save_every=1)
    root = tmp_path / "checkpoints"
    root.mkdir(parents=True)
    (root / f".step-0000001.tmp-{DEAD_PID}-a").mkdir()
    (root / ".rng-0000001").mkdir()
    train(_model(), random_blocks(n=8), config, output_dir=tmp_path, progress=False)
    assert sorted(p.name for p in root.iterdir()) == ["step-0000001", "step-0000002"]


def test_a_dataset_without_label_tokens_is_refused():
    rows = random_blocks(n=4)
    for row in rows:
        row["labels"] = torch.full_like(row["labels"], -100)
    with pytest.raises(ValueError, match="no label token"):
        train(_model(), rows, TrainConfig(max_steps=1, batch_size=2), progress=False)


def test_two_trains_in_one_process_with_other_mixed_precision():
    config = TrainConfig(max_steps=1, batch_size=2, warmup_steps=0, mixed_precision="no")
    train(_model(), random_blocks(n=4), config, progress=False)
    config.mixed_precision = "bf16"
    result = train(_model(), random_blocks(n=4), config, progress=False)
    config.mixed_precision = "no"
    again = train(_model(), random_blocks(n=4), config, progress=False)
    assert result.steps == again.steps == 1


def test_a_second_writer_on_one_output_folder_is_refused(tmp_path):
    config = TrainConfig(max_steps=1, batch_size=2, warmup_steps=0)
    with utils.output_lock(tmp_path):
        with pytest.raises(utils.OutputLocked, match="in use by another"):
            train(_model(), random_blocks(n=4), config, output_dir=tmp_path, progress=False)
    train(_model(), random_blocks(n=4), config, output_dir=tmp_path, progress=False)  # released


# ---------------------------------------------------------------------------------------------
# real kills: a training subprocess SIGKILLs itself at a chosen point, then resumes
# ---------------------------------------------------------------------------------------------

SCRIPT = str(HERE / "_train_script.py")


def _run(args: list[str], timeout: int = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(HERE.parent)}
    return subprocess.run(
        [sys.executable, SCRIPT, "fault", *args],
        env=env,
        timeout=timeout,
        capture_output=True,
        text=True,
    )


def _check_after_kill(out: Path, exchange: bool = True) -> None:
    """What must hold after any kill: the exported adapter is there if it was ever written
    (with the atomic exchange at once; with the two-rename fallback once the next load has
    moved the previous one back) and loads, every finished checkpoint loads (results.json:
    see the comparison kills below)."""
    adapter = out / "adapter"
    if (out / "adapter.written").exists():
        if exchange:
            assert adapter.is_dir(), "the adapter path is empty after a kill"
        read_factors(adapter)
        assert adapter.is_dir()
    for ckpt in (out / "train" / "checkpoints").glob("step-*"):
        if (ckpt / "trainer_state.pt").is_file():
            torch.load(ckpt / "trainer_state.pt", weights_only=True)


def _kill_and_resume(tmp_path, variant, kills, steps=8, no_exchange=False) -> int:
    """Run ``variant`` under each kill point in turn, each run resuming the last, then to the
    end; the final state (frozen weights included) must equal an uninterrupted run's bit for
    bit. A run that finishes before its kill point ends the chain; the rest of the kills
    start a fresh one. Returns the number of kills survived."""
    flags = ["--steps", str(steps), "--reference"] + (["--no-exchange"] if no_exchange else [])
    pending, survived, chain = list(kills), 0, 0
    while pending:
        out = tmp_path / f"{variant}-{chain}"
        fresh = True
        while pending:
            proc = _run([variant, str(out), pending[0], *flags])
            if proc.returncode == 0:
                if fresh:
                    pending.pop(0)  # a point this run never reaches
                break
            assert proc.returncode == -9, f"{pending[0]}: rc {proc.returncode}\n{proc.stderr}"
            pending.pop(0)
            survived += 1
            fresh = False
            _check_after_kill(out, exchange=not no_exchange)
        else:
            proc = _run([variant, str(out), "-", *flags])
            assert proc.returncode == 0, proc.stderr[-3000:]
        _check_after_kill(out)
        got = load_file(out / "final.safetensors")
        expected = load_file(out / "reference.safetensors")
        assert got.keys() == expected.keys()
        differ = [k for k in expected if not torch.equal(got[k], expected[k])]
        assert not differ, f"{len(differ)} tensors differ after resume, e.g. {differ[0]}"
        leftovers = [p.name for p in out.rglob(".*") if ".tmp-" in p.name or ".old-" in p.name]
        assert not leftovers, leftovers
        chain += 1
    return survived


def test_cola_killed_mid_checkpoint_and_in_the_rename_gap_resumes_bit_exact(tmp_path):
    """COLA with two links folded by the end; kills: while a checkpoint's trainer state is
    written (the file cut in half), in the gap between the two renames of an adapter replace."""
    assert (
        _kill_and_resume(tmp_path, "cola", ["torch_save:6:cut", "rename_gap:3"], no_exchange=True)
        == 2
    )


VARIANTS = ["lora", "cola", "multilora", "mixlora"]


@pytest.mark.slow
@pytest.mark.parametrize("variant", VARIANTS)
def test_twenty_random_kills_per_variant(tmp_path, variant):
    """24 kills at seeded random points: half with the atomic exchange, half with the
    two-rename fallback (whose gap gets kills of its own). Per step a run reaches about 2
    torch_save, 2 save_file, 3 replace and 1 step_end points."""
    rng = random.Random(f"kills-{variant}")
    survived = 0
    for no_exchange in (False, True):
        kinds = ["any", "torch_save", "save_file", "replace", "step_end"]
        kinds += ["rename_gap"] if no_exchange else []
        kills = []
        for i in range(12):
            kind = kinds[i % len(kinds)]
            n = rng.randint(1, 12) if kind == "any" else rng.randint(1, 3)
            cut = ":cut" if kind == "torch_save" and rng.random() < 0.5 else ""
            kills.append(f"{kind}:{n}{cut}")
        survived += _kill_and_resume(
            tmp_path / str(no_exchange), variant, kills, steps=16, no_exchange=no_exchange
        )
    print(f"{variant}: {survived} kills survived, resumed bit-exact")
    assert survived >= 20


def test_a_loaded_cola_chain_equals_the_trained_one_bit_for_bit(tmp_path):
    """Item 1: loading folds the saved links one by one, as training did."""
    from loravariants.adapters import COLAConfig

    config = COLAConfig(r=2, dropout=0.0, knots=[1, 2, 3])
    model = lv.attach(make_tiny_llama(), config)
    train(
        model, random_blocks(n=8), TrainConfig(max_steps=4, batch_size=2, lr=0.05), progress=False
    )
    lv.save_adapter(model, tmp_path / "a")
    loaded = lv.load_adapter(make_tiny_llama(), tmp_path / "a")
    want, got = model.state_dict(), loaded.state_dict()
    assert [k for k in want if not torch.equal(want[k], got[k])] == []


def _compare_yaml(tmp_path: Path, runs: str) -> Path:
    file = tmp_path / "exp.yaml"
    file.write_text(
        f"output_dir: {tmp_path / 'out'}\n"
        "context: {target_length: 64}\n"
        "train: {max_steps: 1, batch_size: 2, warmup_steps: 0, lr: 0.01}\n"
        "eval: {max_tokens: 128, lengths: [32]}\n"
        f"runs: {runs}\n"
    )
    return file


def test_a_second_compare_on_one_output_folder_is_refused(tmp_path, monkeypatch, capsys):
    """Item 5: one writer per output folder; the second gets one line and exit 2."""
    from test_compare import _tiny_env

    import loravariants.compare.run as compare_run
    from loravariants.cli import main

    monkeypatch.setattr(compare_run, "load_environment", lambda config, progress: _tiny_env())
    file = _compare_yaml(tmp_path, "[{name: lora, adapter: lora, overrides: {r: 2}}]")
    (tmp_path / "out").mkdir()
    with utils.output_lock(tmp_path / "out"):
        assert main(["compare", "--config", str(file), "--quiet"]) == 2
    assert "in use by another" in capsys.readouterr().err
    assert not (tmp_path / "out" / "results.json").exists()
    assert main(["compare", "--config", str(file), "--quiet"]) == 0


def test_train_run_exits_1_when_its_run_failed_even_with_an_old_adapter(
    tmp_path, monkeypatch, capsys
):
    """Item 5: a failed run must not look like success because an earlier adapter is there."""
    from test_compare import _tiny_env

    import loravariants.compare.run as compare_run
    from loravariants.cli import main

    monkeypatch.setattr(compare_run, "load_environment", lambda config, progress: _tiny_env())

    def broken(*args, **kwargs):  # (a target_modules matching nothing is a config error now)
        raise RuntimeError("the run broke")

    monkeypatch.setattr(compare_run, "_run_one", broken)
    file = _compare_yaml(tmp_path, "[{name: broken, adapter: lora, overrides: {r: 2}}]")
    utils.claim_output_dir(tmp_path / "out")  # the folder of that earlier attempt: ours
    (tmp_path / "out" / "runs" / "broken" / "seed0" / "adapter").mkdir(parents=True)
    assert main(["train", "--config", str(file), "--run", "broken", "--quiet"]) == 1
    assert "the run failed" in capsys.readouterr().err


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="fp16 loss scaling runs on CUDA only")
def test_fp16_resume_restores_the_loss_scale(tmp_path):
    """The GradScaler's scale and growth tracker are checkpointed: an fp16 resume is exact."""
    config = TrainConfig(
        max_steps=4, batch_size=2, lr=1e-2, warmup_steps=0, save_every=1, mixed_precision="fp16"
    )
    whole = train(_model(), random_blocks(n=8), config, output_dir=tmp_path / "a", progress=False)
    config.max_steps = 2
    train(_model(), random_blocks(n=8), config, output_dir=tmp_path / "b", progress=False)
    state = torch.load(
        tmp_path / "b" / "checkpoints" / "step-0000002" / "trainer_state.pt", weights_only=True
    )
    assert state["scaler"] is not None and "scale" in state["scaler"]
    config.max_steps = 4
    resumed = train(_model(), random_blocks(n=8), config, output_dir=tmp_path / "b", progress=False)
    assert resumed.resumed_from == 2 and resumed.losses == whole.losses


def _rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/statm").exists(), reason="reads /proc/self/statm")
def test_rss_stays_flat_over_200_steps_with_checkpoints(tmp_path, monkeypatch):
    """Leak check: 250 steps, a checkpoint every 5 and an adapter export every step; the
    resident memory after step 50 may not grow by more than 32 MiB."""
    import loravariants.train as lv_train

    rss: list[float] = []
    real = lv_train.on_step_end

    def on_step_end(model, step, optimizer):
        reset = real(model, step, optimizer)
        lv.save_adapter(model, tmp_path / "adapter")
        rss.append(_rss_mib())
        return reset

    monkeypatch.setattr(lv_train, "on_step_end", on_step_end)
    config = TrainConfig(max_steps=250, batch_size=2, lr=1e-3, warmup_steps=0, save_every=5)
    train(_model(), random_blocks(n=16), config, output_dir=tmp_path / "run", progress=False)
    growth = max(rss[50:]) - rss[50]
    print(f"RSS at step 50: {rss[50]:.1f} MiB, max after: {max(rss[50:]):.1f} MiB")
    assert growth < 32, f"RSS grew by {growth:.1f} MiB over steps 50-250"


def _run_compare(args: list[str]) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(HERE.parent)}
    return subprocess.run(
        [sys.executable, SCRIPT, "fault-compare", *args],
        env=env,
        timeout=600,
        capture_output=True,
        text=True,
    )


def _records(out: Path) -> dict[str, tuple]:
    data = json.loads((out / "results.json").read_text())
    return {r["key"]: (r["status"], r.get("ppl"), r.get("final_loss")) for r in data["runs"]}


@pytest.mark.slow
def test_compare_killed_at_random_points_finishes_as_if_never_killed(tmp_path):
    """Kills of a two-row comparison (LoRA, COLA with folded links) anywhere in its writes:
    results.json always parses, every finished run's adapter loads, and the resumed
    comparison ends with the uninterrupted one's records (perplexities and final losses
    exactly)."""
    ref = tmp_path / "ref"
    proc = _run_compare([str(ref), "-"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    ticks = json.loads((ref / "ticks.json").read_text())["ticks"]
    rng = random.Random("compare-kills")
    survived, chain = 0, 0
    while survived < 12:
        out = tmp_path / f"out-{chain}"
        while True:  # kill this comparison until a run gets through to the end
            proc = _run_compare([str(out), f"any:{rng.randint(1, ticks // 2)}"])
            if proc.returncode == 0:
                break
            assert proc.returncode == -9, proc.stderr[-3000:]
            survived += 1
            if (out / "results.json").exists():
                json.loads((out / "results.json").read_text())
            for adapter in out.glob("runs/*/seed*/adapter"):
                read_factors(adapter)
        assert _records(out) == _records(ref)
        chain += 1
    print(f"compare: {survived} kills survived in {chain} comparison(s), records equal")
