"""An untrained row with no seeded metric is evaluated once; its other seeds carry that record."""

from __future__ import annotations

import json

from test_compare import _experiment, _tiny_env

from loravariants.compare import compare, measure
from loravariants.compare.run import seed_independent_twin
from loravariants.config import experiment_from_dict

ROWS = [
    {"name": "base", "adapter": "none"},
    {"name": "lora", "adapter": "lora", "overrides": {"r": 2}},
]


def test_untrained_row_is_evaluated_once_and_its_seeds_repeat_the_record(tmp_path, monkeypatch):
    calls: list[tuple[int, str | None]] = []
    real = measure.evaluate_run

    def counting(model, config, env, seed, lengths, name, progress):
        calls.append((seed, name))
        return real(model, config, env, seed, lengths, name, progress)

    monkeypatch.setattr(measure, "evaluate_run", counting)
    config = _experiment(tmp_path, ROWS, seeds=[0, 1, 2])
    logs: list[str] = []
    compare(config, progress=False, log=logs.append, env=_tiny_env())
    # the base is evaluated for seed 0 only; every LoRA seed is trained and evaluated
    assert [c for c in calls if c[1] is None] == [(0, None)]
    assert sorted(s for s, name in calls if name is not None) == [0, 1, 2]
    runs = {
        r["key"]: r for r in json.loads((tmp_path / "out" / "results.json").read_text())["runs"]
    }
    first = runs["base/seed0"]
    assert "same_as" not in first
    for seed in (1, 2):
        twin = runs[f"base/seed{seed}"]
        assert twin["same_as"] == "base/seed0" and twin["seed"] == seed and twin["status"] == "ok"
        assert twin["ppl"] == first["ppl"] and twin["doc_nll"] == first["doc_nll"]
        assert twin["cpu_s"] == 0.0
    assert all("same_as" not in runs[f"lora/seed{s}"] for s in range(3))
    assert sum("the metrics of base/seed0" in line for line in logs) == 2
    # a rerun keeps the repeated records as finished runs
    logs.clear()
    compare(config, progress=False, log=logs.append, env=_tiny_env())
    assert sum("done earlier, kept" in line for line in logs) == 6


def test_a_seeded_metric_or_a_trained_row_gets_no_twin(tmp_path):
    done = {"base/seed0": {"key": "base/seed0", "row": "base", "seed": 0, "status": "ok"}}
    plain = _experiment(tmp_path, ROWS)
    base, lora = plain.runs
    assert seed_independent_twin(plain, base, done)["key"] == "base/seed0"
    assert (
        seed_independent_twin(plain, lora, {"lora/seed0": {**done["base/seed0"], "row": "lora"}})
        is None
    )
    with_passkey = experiment_from_dict(
        {"runs": ROWS, "eval": {"passkey_lengths": [64]}, "output_dir": str(tmp_path / "p")}
    )
    assert seed_independent_twin(with_passkey, with_passkey.runs[0], done) is None
    # a failed record, or one with failed metrics, is not repeated
    failed = {"base/seed0": {**done["base/seed0"], "status": "failed"}}
    assert seed_independent_twin(plain, base, failed) is None
    broken = {"base/seed0": {**done["base/seed0"], "metric_errors": {"ppl": "x"}}}
    assert seed_independent_twin(plain, base, broken) is None
