"""The comparison: end-to-end quickstart, resume, failures, parameter matching, statistics."""

from __future__ import annotations

import csv
import json

import pytest
import torch
from _train_script import random_blocks
from conftest import make_tiny_llama

from loravariants.cli import main
from loravariants.compare import Environment, PeakMemory, compare, match_rank, mean_ci
from loravariants.config import experiment_from_dict
from loravariants.train import TrainConfig  # noqa: F401  (fields used in the YAML below)


def test_quickstart_quick_end_to_end(tmp_path, monkeypatch, capsys):
    """The real command on the real built-in pipeline (tiny base preset), in a temp dir."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    assert main(["quickstart", "--quick", "--quiet"]) == 0
    out = tmp_path / "runs" / "quickstart-quick"
    for name in (
        "results.json",
        "results.csv",
        "report.md",
        "plots/loss_curves.png",
        "plots/perplexity_vs_context.png",
        "plots/spectra.png",
        "plots/effective_rank.png",
    ):
        assert (out / name).is_file(), name
    data = json.loads((out / "results.json").read_text())
    assert data["schema_version"] == 1
    rows = {r["row"]: r for r in data["runs"]}
    assert set(rows) == {
        "base-noPI",
        "base-PI",
        "native",
        "lora",
        "lora+embed",
        "lora+norm",
        "longlora",
        "longlora-noshift",
        "longlora-fullattn",
        "full-ft",
        "cola",
        "multilora",
        "mixlora",
    }
    assert all(r["status"] == "ok" for r in rows.values()), [
        (k, r.get("reason")) for k, r in rows.items() if r["status"] != "ok"
    ]
    for name in ("lora", "cola", "multilora", "mixlora"):
        run = rows[name]
        assert run["trainable_params"] > 0 and run["tokens_per_s"] > 0
        assert len(run["loss_curve"]) == 3 and run["ppl"] and "effective_rank" in run["svd"]
    assert rows["mixlora"]["router_tokens_per_expert"]
    # matched rows: every adapter within 10% of match_params; full fine-tuning trains it all
    assert all(abs(rows[n]["match_params"]["deviation"]) <= 0.10 for n in ("lora", "mixlora"))
    assert rows["full-ft"]["trainable_params"] == rows["full-ft"]["total_params"]
    assert rows["native"]["train_tokens_seen"] == rows["longlora"]["train_tokens_seen"]
    assert rows["longlora-noshift"]["attention"] == "s2_attn_noshift"
    assert rows["longlora-fullattn"]["attention"] == "sdpa"
    assert rows["base-noPI"]["context"] < rows["base-PI"]["context"]
    table = capsys.readouterr().out
    assert "| mixlora |" in table and "report.md" in table
    # the same experiment through `eval --config` (context extended before the adapter loads)
    # and `pretrain-base --config` (reuses the cached tiny base)
    from loravariants.cli import QUICK_OVERRIDES
    from loravariants.config import CONFIG_DIR

    adapter = out / "runs" / "longlora" / "seed0" / "adapter"
    config = str(CONFIG_DIR / "quickstart.yaml")
    assert main(["eval", "--config", config, "--adapter", str(adapter), *QUICK_OVERRIDES]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["perplexity"]["512"] == pytest.approx(rows["longlora"]["ppl"]["512"], rel=1e-4)
    # without --config the adapter brings its context extension (saved with it)
    with pytest.warns(UserWarning, match="applied the adapter's context extended to 512"):
        assert main(["eval", "--model", data["base_model"], "--adapter", str(adapter)]) == 0
    assert set(json.loads(capsys.readouterr().out)["perplexity"]) == {"256", "512"}
    assert main(["pretrain-base", "--config", config, "--quiet", *QUICK_OVERRIDES]) == 0
    assert "cache" in capsys.readouterr().out


def _tiny_env():
    """A synthetic environment: tiny random model and data, no base-model build."""
    tokens = torch.randint(0, 128, (600,), generator=torch.Generator().manual_seed(0))
    return Environment(
        base_path="tiny",
        tokenizer=None,
        device=torch.device("cpu"),
        load_model=lambda: make_tiny_llama(max_position_embeddings=32),
        train_blocks=lambda n: random_blocks(n=16, length=n),
        val_tokens=tokens,
    )


def _experiment(tmp_path, runs, **extra):
    data = {
        "output_dir": str(tmp_path / "out"),
        "context": {"target_length": 64},
        "train": {"max_steps": 2, "batch_size": 2, "warmup_steps": 0, "lr": 0.01},
        "eval": {"max_tokens": 256, "lengths": [32, 64]},
        "seeds": [0, 1],
        "runs": runs,
    }
    data.update(extra)
    return experiment_from_dict(data)


def test_resume_skips_finished_runs_and_failures_are_reported(tmp_path):
    config = _experiment(
        tmp_path,
        [
            {"name": "lora", "adapter": "lora", "overrides": {"r": 2}},
            {"name": "broken", "adapter": "lora", "overrides": {"target_modules": ["nothing"]}},
            {"name": "base", "adapter": "none"},
        ],
    )
    logs: list[str] = []
    compare(config, progress=False, log=logs.append, env=_tiny_env())
    data = json.loads((tmp_path / "out" / "results.json").read_text())
    status = {r["key"]: r["status"] for r in data["runs"]}
    assert status == {
        "lora/seed0": "ok",
        "lora/seed1": "ok",
        "broken/seed0": "failed",
        "broken/seed1": "failed",
        "base/seed0": "ok",
        "base/seed1": "ok",  # untrained rows run every seed too (their passkey prompts differ)
    }
    broken = next(r for r in data["runs"] if r["key"] == "broken/seed0")
    assert "matches no module" in broken["reason"]
    assert "failed" in (tmp_path / "out" / "report.md").read_text()
    with open(tmp_path / "out" / "results.csv") as f:
        assert len(list(csv.DictReader(f))) == 6
    # a rerun keeps what finished and retries only the failed runs
    logs.clear()
    compare(config, progress=False, log=logs.append, env=_tiny_env())
    kept = [line for line in logs if "done earlier, kept" in line]
    assert len(kept) == 4 and sum("running" in line for line in logs) == 2


def test_forced_nan_run_is_reported_and_the_others_finish(tmp_path):
    config = _experiment(
        tmp_path,
        [
            {"name": "nan", "adapter": "lora", "overrides": {"r": 2}},
            {"name": "fine", "adapter": "lora", "overrides": {"r": 2}},
        ],
        seeds=[0],
    )
    env = _tiny_env()
    good_loader = env.load_model
    calls = {"n": 0}

    def loader():
        calls["n"] += 1
        model = good_loader()
        if calls["n"] == 1:  # the first run's model produces NaN logits
            with torch.no_grad():
                model.lm_head.weight.fill_(float("nan"))
        return model

    env.load_model = loader
    compare(config, progress=False, log=lambda s: None, env=env)
    runs = {
        r["row"]: r for r in json.loads((tmp_path / "out" / "results.json").read_text())["runs"]
    }
    assert runs["nan"]["status"] == "failed" and "TrainingDiverged" in runs["nan"]["reason"]
    assert runs["fine"]["status"] == "ok"


@pytest.mark.parametrize(
    "spec, extra",
    [
        ("lora", {}),
        ("multilora", {"num_branches": 2}),
        ("cola", {}),
        ("mixlora", {"num_experts": 4}),
    ],
)
def test_match_params_within_five_percent(spec, extra):
    target = 6000
    overrides, achieved = match_rank(lambda: make_tiny_llama(), spec, extra, target, None)
    assert abs(achieved - target) / target < 0.05, (overrides, achieved)


def test_mean_ci_student_t():
    mean, half = mean_ci([1.0, 2.0, 3.0])
    assert mean == 2.0 and half == pytest.approx(4.303 * 1.0 / 3**0.5, rel=1e-3)
    assert mean_ci([5.0]) == (5.0, 0.0)


def test_peak_memory_sees_an_allocation():
    import time

    with PeakMemory(interval=0.005) as mem:
        block = torch.ones(64 * 2**20 // 4)  # 64 MiB
        torch.mm(torch.ones(64, 64), torch.ones(64, 64))
        # keep the block alive until the sampling thread has had its turn: on a loaded machine
        # a fixed 50 ms could pass without one sample, and the peak would be missed
        deadline = time.monotonic() + 5.0
        while mem._peak - mem._start < 40 * 2**20 and time.monotonic() < deadline:
            time.sleep(0.01)
        del block
    assert mem.delta_mib > 40


def test_concurrent_comparison_trains_rows_together(tmp_path):
    runs = [
        {"name": "cola", "adapter": "cola", "overrides": {"r": 2, "chain_length": 2}},
        {"name": "multilora", "adapter": "multilora", "overrides": {"r": 2}},
        {"name": "lora", "adapter": "lora", "overrides": {"r": 2}},  # not first: still the ref
        {"name": "mixlora", "adapter": "mixlora", "overrides": {"num_experts": 4, "r": 2}},
        {"name": "base", "adapter": "none"},
    ]
    config = _experiment(tmp_path, runs, seeds=[0], concurrent=True)
    logs: list[str] = []
    compare(config, progress=False, log=logs.append, env=_tiny_env())
    assert any("concurrently" in line for line in logs)
    data = json.loads((tmp_path / "out" / "results.json").read_text())
    runs_by_row = {r["row"]: r for r in data["runs"]}
    assert all(r["status"] == "ok" for r in runs_by_row.values()), runs_by_row
    for name in ("lora", "cola", "multilora", "mixlora"):
        record = runs_by_row[name]
        assert record["concurrent"] and len(record["loss_curve"]) == 2 and record["ppl"]
        assert record["svd"]["effective_rank_by_layer"], name
        assert (tmp_path / "out" / "runs" / name / "seed0" / "adapter").is_dir()
    # LoRA trained in the same group is the reference subspace for the others
    assert "similarity_to_lora" not in runs_by_row["lora"]["svd"]  # it is the reference
    for name in ("cola", "multilora", "mixlora"):
        assert 0.0 <= runs_by_row[name]["svd"]["similarity_to_lora"] < 1.0, name
    # each row evaluated with only its own adapter: different perplexities
    assert len({runs_by_row[n]["ppl"]["64"] for n in ("lora", "cola", "multilora")}) == 3


def test_concurrent_rejects_rows_that_train_base_modules(tmp_path):
    """A config error before any work, not a table of failed runs."""
    runs = [
        {"name": "a", "adapter": "lora"},
        {"name": "b", "adapter": "lora", "trainable": ["norm"]},
    ]
    with pytest.raises(ValueError, match=r"rows \['b'\] train base weights"):
        _experiment(tmp_path, runs, seeds=[0], concurrent=True)
    assert not (tmp_path / "out").exists()


def test_cola_chain_is_spread_over_the_runs_budget(tmp_path):
    config = _experiment(tmp_path, [{"name": "cola", "adapter": "cola"}], seeds=[0])
    row = config.runs[0]
    assert config.adapter_overrides(row)["total_steps"] == 2  # train.max_steps, not the spec's
    pinned = {"name": "c", "adapter": "cola", "overrides": {"total_steps": 9}}
    config = _experiment(tmp_path, [pinned], seeds=[0])
    assert config.adapter_overrides(config.runs[0])["total_steps"] == 9


def test_a_changed_experiment_does_not_reuse_finished_runs(tmp_path):
    runs = [{"name": "a", "adapter": "lora", "overrides": {"r": 2}}]
    compare(
        _experiment(tmp_path, runs, seeds=[0]), progress=False, log=lambda s: None, env=_tiny_env()
    )
    more_seeds = _experiment(tmp_path, runs, seeds=[0, 1])  # adding seeds resumes
    compare(more_seeds, progress=False, log=lambda s: None, env=_tiny_env())
    longer = _experiment(tmp_path, runs, seeds=[0, 1])
    longer.train.max_steps = 3
    with pytest.raises(ValueError, match=r"different experiment.*train"):
        compare(longer, progress=False, log=lambda s: None, env=_tiny_env())
    changed_row = [{"name": "a", "adapter": "lora", "overrides": {"r": 4}}]
    with pytest.raises(ValueError, match=r"runs\[a\] changed"):
        compare(
            _experiment(tmp_path, changed_row), progress=False, log=lambda s: None, env=_tiny_env()
        )


def test_only_runs_the_named_pair_and_the_report_keeps_every_row(tmp_path):
    runs = [
        {"name": "a", "adapter": "lora", "overrides": {"r": 2}},
        {"name": "b", "adapter": "lora", "overrides": {"r": 2}},
    ]
    config = _experiment(tmp_path, runs, seeds=[0])
    compare(config, progress=False, log=lambda s: None, env=_tiny_env(), only=[("b", 0)])
    data = json.loads((tmp_path / "out" / "results.json").read_text())
    assert [r["key"] for r in data["runs"]] == ["b/seed0"]
    assert [r["name"] for r in data["config"]["runs"]] == ["a", "b"]


@pytest.mark.parametrize(
    "change, message",
    [
        ({"runs": [{"name": "a", "adapter": "lroa"}]}, r"runs\[a\].*adapter spec 'lroa' not found"),
        ({"runs": [{"name": "a", "adapter": "lora", "overrides": {"rr": 4}}]}, r"runs\[a\].*rr"),
        ({"runs": [{"name": "a", "adapter": "lora", "overrides": {"r": 0}}]}, r"runs\[a\].*r must"),
        (
            {"runs": [{"name": "a", "adapter": "lora", "overrides": 5}]},
            "overrides must be a mapping",
        ),
        ({"runs": [{"name": "a", "adapter": "lora", "extend_context": "maybe"}]}, "extend_context"),
        ({"concurrent": "maybe"}, "concurrent must be true or false"),
        ({"output_dir": 5}, "output_dir must be a non-empty string"),
        ({"seeds": "x"}, "seeds must be a non-empty list"),
        ({"seeds": 0}, r"seeds must be a non-empty list.*got 0 \(one seed: \[0\]"),
        ({"match_params_tolerance": -1}, "match_params_tolerance"),
    ],
)
def test_config_mistakes_are_caught_before_any_work(tmp_path, change, message):
    import yaml

    from loravariants.config import load_experiment

    base = {"runs": [{"name": "a", "adapter": "lora"}], "output_dir": str(tmp_path / "out")}
    file = tmp_path / "x.yaml"
    file.write_text(yaml.safe_dump({**base, **change}))
    with pytest.raises(ValueError, match=message):
        load_experiment(file)


def test_config_conveniences(tmp_path):
    config = _experiment(
        tmp_path, [{"name": "a", "adapter": "lora", "trainable": "embed"}], seeds=[3]
    )
    assert config.runs[0].trainable == ["embed"] and config.seeds == [3]


def test_output_dir_under_a_file_is_one_clear_error(tmp_path):
    (tmp_path / "afile").write_text("x")
    config = _experiment(tmp_path, [{"name": "a", "adapter": "lora"}])
    config.output_dir = str(tmp_path / "afile" / "sub")
    with pytest.raises(ValueError, match="a parent of it is a file"):
        compare(config, progress=False, log=lambda s: None, env=_tiny_env())
    config.output_dir = str(tmp_path / "afile")
    with pytest.raises(ValueError, match="is a file"):
        compare(config, progress=False, log=lambda s: None, env=_tiny_env())


def test_quiet_compare_silences_transformers_bars_only_while_it_runs(tmp_path, monkeypatch):
    from transformers.utils import logging as hf_logging

    import loravariants.compare.run as compare_run

    seen = []
    monkeypatch.setattr(
        compare_run, "_compare", lambda *a: seen.append(hf_logging.is_progress_bar_enabled())
    )
    config = _experiment(tmp_path, [{"name": "base", "adapter": "none"}])
    hf_logging.enable_progress_bar()
    compare(config, progress=False, env=_tiny_env())
    assert seen == [False] and hf_logging.is_progress_bar_enabled()
    compare(config, progress=True, env=_tiny_env())
    assert seen == [False, True]
