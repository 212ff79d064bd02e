"""Issue 25's runs through compare: full fine-tuning, train_length: native, lr_grid selection
(resumable, on the selection split), and the evaluation records the statistics read."""

from __future__ import annotations

import json
import math

import pytest
import torch
from _train_script import random_blocks
from conftest import make_tiny_llama
from torch.testing import assert_close

from loravariants.compare import Environment, compare
from loravariants.compare.lr_select import selection_file
from loravariants.config import experiment_from_dict
from loravariants.stats import final_loss


def tiny_env(selection=True):
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, 128, (300,), generator=g)
    return Environment(
        base_path="tiny",
        tokenizer=None,
        device=torch.device("cpu"),
        load_model=lambda: make_tiny_llama(max_position_embeddings=32),
        train_blocks=lambda n: random_blocks(n=16, length=n),
        val_tokens=tokens,
        val_document_lengths=[100, 60, 140],
        selection_tokens=torch.randint(0, 128, (200,), generator=g) if selection else None,
    )


def experiment(tmp_path, runs, **extra):
    data = {
        "output_dir": str(tmp_path / "out"),
        "context": {"target_length": 64},
        "train": {"max_steps": 2, "batch_size": 2, "warmup_steps": 0, "lr": 0.01},
        "eval": {"max_tokens": 256, "lengths": [32, 64]},
        "seeds": [0],
        "runs": runs,
    }
    data.update(extra)
    return experiment_from_dict(data)


def records(tmp_path):
    data = json.loads((tmp_path / "out" / "results.json").read_text())
    return data, {r["key"]: r for r in data["runs"]}


def test_full_finetuning_trains_every_parameter_and_reports_them(tmp_path):
    config = experiment(
        tmp_path, [{"name": "full-ft", "trainable": ["all"]}, {"name": "base"}], seeds=[0]
    )
    compare(config, progress=False, log=lambda line: None, env=tiny_env(selection=False))
    _, runs = records(tmp_path)
    full = runs["full-ft/seed0"]
    assert full["status"] == "ok", full.get("reason")
    base = make_tiny_llama(max_position_embeddings=32)
    total = sum(p.numel() for p in base.parameters())
    assert full["trainable_params"] == full["total_params"] == total
    assert full["adapter_params"] == 0 and full["variant"] == "full"
    assert full["peak_mem_mib"] > 0 and full["lr"] == 0.01
    # every weight moved (the saved model is the trained one)
    from loravariants.compare.protocol import load_full_model

    trained = load_full_model(tmp_path / "out" / "runs" / "full-ft" / "seed0")
    moved = {
        name: not torch.equal(p, trained.state_dict()[name])
        for name, p in base.state_dict().items()
        if "rotary" not in name
    }
    assert all(moved.values()), [n for n, m in moved.items() if not m]
    assert runs["base/seed0"]["status"] == "ok"


def test_records_hold_doc_nll_passkey_outcomes_final_loss_and_lr(tmp_path):
    config = experiment(
        tmp_path,
        [{"name": "lora", "adapter": "lora", "overrides": {"r": 2}}, {"name": "base"}],
        train={"max_steps": 10, "batch_size": 2, "warmup_steps": 0, "lr": 0.01},
    )
    compare(config, progress=False, log=lambda line: None, env=tiny_env(selection=False))
    _, runs = records(tmp_path)
    for key in ("lora/seed0", "base/seed0"):
        record = runs[key]
        assert set(record["doc_nll"]) == {"32", "64"}
        for length, pairs in record["doc_nll"].items():
            assert len(pairs) == 3  # one per validation document, in order
            assert sum(t for _, t in pairs) == 255  # 256 tokens, the first never scored
            ppl = math.exp(sum(n for n, _ in pairs) / sum(t for _, t in pairs))
            assert ppl == pytest.approx(record["ppl"][length], rel=1e-9)
    lora = runs["lora/seed0"]
    assert lora["lr"] == 0.01
    assert lora["train_loss_final"] == pytest.approx(final_loss(lora["loss_curve"]))
    assert lora["train_loss_final"] == pytest.approx(lora["loss_curve"][-1])  # 10 steps: 1
    assert "lr" not in runs["base/seed0"]


def test_a_row_lr_overrides_train_lr(tmp_path):
    config = experiment(tmp_path, [{"name": "lora", "adapter": "lora", "lr": 0.003}])
    compare(config, progress=False, log=lambda line: None, env=tiny_env(selection=False))
    assert records(tmp_path)[1]["lora/seed0"]["lr"] == 0.003


def test_native_length_row_sees_the_same_tokens_per_step(tmp_path):
    config = experiment(
        tmp_path,
        [
            {"name": "longlora", "adapter": "lora", "trainable": ["embed", "norm"]},
            {
                "name": "native",
                "adapter": "lora",
                "trainable": ["embed", "norm"],
                "extend_context": False,
                "train_length": "native",
            },
        ],
    )
    compare(config, progress=False, log=lambda line: None, env=tiny_env(selection=False))
    _, runs = records(tmp_path)
    target, native = runs["longlora/seed0"], runs["native/seed0"]
    assert native["status"] == "ok", native.get("reason")
    assert target["context"] == 64 and native["context"] == 32
    assert native["batch_size"] == 2 * target["batch_size"]  # target / native = 2
    assert native["train_tokens_seen"] == target["train_tokens_seen"] == 2 * 2 * 64
    assert native["train_length"] == "native"


def test_native_length_needs_a_multiple_of_the_native_context(tmp_path):
    config = experiment(
        tmp_path,
        [{"name": "n", "adapter": "lora", "extend_context": False, "train_length": "native"}],
        context={"target_length": 48},
        eval={"max_tokens": 256, "lengths": [32]},
    )
    compare(config, progress=False, log=lambda line: None, env=tiny_env(selection=False))
    assert "multiple of the base's native context" in records(tmp_path)[1]["n/seed0"]["reason"]


def test_lr_grid_selects_on_the_selection_split_and_resumes(tmp_path, monkeypatch):
    import loravariants.compare.run as ev  # the selection scores through run.perplexity

    env = tiny_env()
    scored = []
    real = ev.perplexity

    def spy(model, tokens, *args, **kwargs):
        scored.append(tokens)
        return real(model, tokens, *args, **kwargs)

    monkeypatch.setattr(ev, "perplexity", spy)
    runs = [
        {"name": "lora", "adapter": "lora", "overrides": {"r": 2}},
        {"name": "fixed", "adapter": "lora", "overrides": {"r": 2}, "lr": 0.005},
        {"name": "base"},
    ]
    config = experiment(tmp_path, runs, lr_grid=[1e-4, 0.03], lr_grid_steps=3)
    logs = []
    compare(config, progress=False, log=logs.append, env=env)
    # only `lora` is selected for; every selection score is on the selection tokens
    assert len(scored) == 2 and all(t is env.selection_tokens for t in scored)
    data, runs_ = records(tmp_path)
    selection = data["lr_selection"]
    assert set(selection) == {"lora"}
    entry = selection["lora"]
    assert entry["grid"] == [1e-4, 0.03] and entry["seeds"] == [0] and entry["steps"] == 3
    ppl = entry["selection_ppl"]
    assert entry["chosen"] == min((1e-4, 0.03), key=lambda lr: ppl[f"{lr:g}"])
    assert runs_["lora/seed0"]["lr"] == entry["chosen"]
    assert runs_["fixed/seed0"]["lr"] == 0.005
    for lr in (1e-4, 0.03):
        record = json.loads(selection_file(tmp_path / "out", "lora", lr, 0).read_text())
        assert record["status"] == "ok" and record["selection_ppl"] == ppl[f"{lr:g}"]
        assert record["steps"] == 3
    # a rerun (one more seed) resumes: no selection run again, the same rate
    scored.clear()
    more = experiment(tmp_path, runs, lr_grid=[1e-4, 0.03], lr_grid_steps=3, seeds=[0, 1])
    compare(more, progress=False, log=logs.append, env=tiny_env())
    assert scored == []
    assert records(tmp_path)[1]["lora/seed1"]["lr"] == entry["chosen"]


def test_lr_grid_chooses_the_lowest_selection_perplexity(tmp_path, monkeypatch):
    import loravariants.compare.run as ev  # the selection scores through run.perplexity

    # fixed selection scores: the choice must follow them, whatever the training did
    scores = iter([7.0, 3.0, 5.0])
    monkeypatch.setattr(ev, "perplexity", lambda *a, **k: next(scores))
    config = experiment(
        tmp_path,
        [{"name": "lora", "adapter": "lora", "overrides": {"r": 2}}],
        lr_grid=[1e-3, 2e-3, 3e-3],
        lr_grid_steps=1,
    )
    compare(config, progress=False, log=lambda line: None, env=tiny_env())
    data, runs = records(tmp_path)
    assert data["lr_selection"]["lora"]["chosen"] == 2e-3
    assert data["lr_selection"]["lora"]["selection_ppl"] == {
        "0.001": 7.0,
        "0.002": 3.0,
        "0.003": 5.0,
    }
    assert runs["lora/seed0"]["lr"] == 2e-3


def test_selection_steps_default_to_the_budget_and_a_diverged_rate_loses(tmp_path, monkeypatch):
    import loravariants.compare.run as ev  # the selection scores through run.perplexity

    scores = iter([float("nan"), 4.0])
    monkeypatch.setattr(ev, "perplexity", lambda *a, **k: next(scores))
    config = experiment(
        tmp_path, [{"name": "lora", "adapter": "lora", "overrides": {"r": 2}}], lr_grid=[1.0, 1e-3]
    )
    compare(config, progress=False, log=lambda line: None, env=tiny_env())
    data, runs = records(tmp_path)
    assert data["lr_selection"]["lora"]["steps"] == 2  # train.max_steps
    assert data["lr_selection"]["lora"]["chosen"] == 1e-3
    assert data["lr_selection"]["lora"]["selection_ppl"]["1"] is None
    failed = json.loads(selection_file(tmp_path / "out", "lora", 1.0, 0).read_text())
    assert failed["status"] == "failed" and "nan" in failed["reason"]


def test_full_finetune_and_noshift_rows_together(tmp_path):
    """A smoke run of the two new row kinds beside LoRA (the quickstart's shape)."""
    config = experiment(
        tmp_path,
        [
            {"name": "noshift", "adapter": "lora", "attention": "s2_attn_noshift"},
            {"name": "shift", "adapter": "lora"},
        ],
    )
    compare(config, progress=False, log=lambda line: None, env=tiny_env(selection=False))
    _, runs = records(tmp_path)
    assert runs["noshift/seed0"]["attention"] == "s2_attn_noshift"
    assert runs["noshift/seed0"]["status"] == runs["shift/seed0"]["status"] == "ok"
    # same seed, same init and data: only the attention differs, and it changes training
    a, b = runs["noshift/seed0"]["loss_curve"], runs["shift/seed0"]["loss_curve"]
    assert_close(torch.tensor(a[0]), torch.tensor(b[0]), rtol=0.05, atol=0)
    assert a != b


def test_passkey_outcomes_are_recorded_per_prompt(tmp_path, monkeypatch):
    import loravariants.compare.measure as measure
    from loravariants.evaluate import PasskeyResult

    seen = []

    def fake(model, tokenizer, lengths, trials, seed):
        seen.append(seed)
        hits = [(seed + i) % 2 for i in range(trials)]
        return {
            n: PasskeyResult(n, sum(hits) / trials, trials, [""] * trials, hits) for n in lengths
        }

    monkeypatch.setattr(measure, "passkey_accuracy", fake)
    config = experiment(
        tmp_path,
        [{"name": "lora", "adapter": "lora", "overrides": {"r": 2}}, {"name": "base"}],
        eval={"max_tokens": 256, "lengths": [32], "passkey_lengths": [16, 24], "passkey_trials": 4},
        seeds=[0, 1],
    )
    compare(config, progress=False, log=lambda line: None, env=tiny_env(selection=False))
    _, runs = records(tmp_path)
    for row in ("lora", "base"):
        for seed in (0, 1):
            record = runs[f"{row}/seed{seed}"]
            expected = [(seed + i) % 2 for i in range(4)]
            assert record["passkey_outcomes"] == {"16": expected, "24": expected}
            assert record["passkey"]["16"] == sum(expected) / 4


def test_shards_start_the_selection_at_different_runs_and_share_records(tmp_path):
    from loravariants.compare.lr_select import select_learning_rates, selection_rows

    config = experiment(
        tmp_path,
        [{"name": "a", "adapter": "lora"}, {"name": "b", "adapter": "lora"}],
        lr_grid=[1e-3, 2e-3],
    )
    rows = selection_rows(config)
    trained = []

    def train_row(row, seed, lr, steps):
        trained.append((row.name, lr))
        return torch.nn.Linear(1, 1)

    def score(model):
        return 10.0 + len(trained)  # later runs score worse: the first rate of each row wins

    out = tmp_path / "out"
    second = select_learning_rates(config, out, rows, {}, train_row, score, lambda _: None, 0.5)
    # shard 1 of 2 begins at the third of the four runs (row b), then wraps to row a
    assert trained == [("b", 1e-3), ("b", 2e-3), ("a", 1e-3), ("a", 2e-3)]
    assert second == {"a": 1e-3, "b": 1e-3}
    trained.clear()
    first = select_learning_rates(config, out, rows, {}, train_row, score, lambda _: None, 0.0)
    assert trained == [] and first == second  # every record found, the same choice


def test_shards_share_the_selection_and_the_merge_records_it(tmp_path):
    from loravariants.compare.shard import Shard, merge_shards

    runs = [{"name": "lora", "adapter": "lora", "overrides": {"r": 2}}, {"name": "base"}]
    config = experiment(tmp_path, runs, lr_grid=[1e-4, 0.03], lr_grid_steps=2, seeds=[0, 1])
    for i in (0, 1):
        compare(config, progress=False, log=lambda _: None, env=tiny_env(), shard=Shard(i, 2))
    merge_shards(config)
    data, runs_ = records(tmp_path)
    chosen = data["lr_selection"]["lora"]["chosen"]
    assert chosen in (1e-4, 0.03)
    assert runs_["lora/seed0"]["lr"] == runs_["lora/seed1"]["lr"] == chosen


def test_a_selection_run_places_a_chain_over_its_own_steps(tmp_path, monkeypatch):
    import loravariants.compare.run as ev

    # a chain given by chain_length is spread over the run's steps (COLA's run_overrides):
    # the 3-step selection runs fold at steps 1 and 2 of 3, the 6-step run at 2 and 4 of 6,
    # so the rate is chosen for the schedule the row then trains with
    attached = []
    real = ev._attach_row

    def spy(model, config, row, overrides, name):
        record = real(model, config, row, overrides, name)
        attached.append(record["adapter_config"]["total_steps"])
        return record

    monkeypatch.setattr(ev, "_attach_row", spy)
    row = {"name": "cola", "adapter": "cola", "overrides": {"r": 2, "chain_length": 3}}
    train = {"max_steps": 6, "batch_size": 2, "warmup_steps": 0, "lr": 0.01}
    config = experiment(tmp_path, [row], lr_grid=[1e-3, 2e-3], lr_grid_steps=3, train=train)
    compare(config, progress=False, log=lambda line: None, env=tiny_env())
    assert attached == [3, 3, 6]
    data, runs = records(tmp_path)
    assert runs["cola/seed0"]["adapter_config"]["total_steps"] == 6
    assert data["lr_selection"]["cola"]["steps"] == 3


def test_a_kept_run_at_a_rate_the_selection_no_longer_chooses_runs_again(tmp_path):
    runs = [{"name": "lora", "adapter": "lora", "overrides": {"r": 2}}]
    config = experiment(tmp_path, runs, lr_grid=[1e-4, 0.03], lr_grid_steps=1)
    compare(config, progress=False, log=lambda line: None, env=tiny_env())
    first = records(tmp_path)[0]["lr_selection"]["lora"]["chosen"]
    other = 0.03 if first == 1e-4 else 1e-4
    # the other rate's record now wins the selection (as a re-run selection could decide)
    file = selection_file(tmp_path / "out", "lora", other, 0)
    record = json.loads(file.read_text())
    file.write_text(json.dumps({**record, "selection_ppl": 1.0}))
    logs = []
    compare(config, progress=False, log=logs.append, env=tiny_env())
    data, runs_ = records(tmp_path)
    assert data["lr_selection"]["lora"]["chosen"] == other
    assert runs_["lora/seed0"]["lr"] == other
    assert any(f"trained at lr={first:g}" in line for line in logs)
