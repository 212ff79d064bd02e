"""compare's cross-run measures: one reference rule for every way a run is made, computed from
the saved adapters, each adapter read and each pair measured once per output folder."""

import json

import pytest
import torch
from conftest import make_tiny_llama
from test_compare import _experiment, _tiny_env

import loravariants as lv
import loravariants.compare.crossrun as crossrun
from loravariants.adapters import LoRAConfig, MultiLoRAConfig
from loravariants.adapters.base import reference_variant
from loravariants.compare import CrossRunMeasures, compare, reference_runs, run_folder
from loravariants.compare.measure import similarity_fields
from loravariants.io import read_factors

ROWS = [
    {"name": "multi", "adapter": "multilora", "overrides": {"r": 2}},
    {"name": "lora", "adapter": "lora", "overrides": {"r": 2}},
    {"name": "lora4", "adapter": "lora", "overrides": {"r": 4}},
    {"name": "base", "adapter": "none"},
]


def _saved(out, row, seed, config):
    """A random (non-zero) adapter saved where the run ``row/seed`` keeps its own."""
    torch.manual_seed(100 * seed + len(row))
    model = lv.attach(make_tiny_llama(), config)
    for p in model.parameters():
        if p.requires_grad:
            torch.nn.init.normal_(p)
    lv.save_adapter(model, run_folder(out, row, seed) / "adapter")


def _record(row, seed, variant, status="ok"):
    record = {"key": f"{row}/seed{seed}", "row": row, "seed": seed, "status": status}
    if variant != "none":
        record.update(variant=variant, adapter_params=1, svd={"effective_rank": 1.0})
    return record


@pytest.fixture
def grid(tmp_path):
    """Two seeds of ROWS with saved adapters; lora/seed1 failed (lora4 is seed 1's reference)."""
    config = _experiment(tmp_path, ROWS)
    out = tmp_path / "out"
    results = {}
    for seed in (0, 1):
        for row, adapter, variant in (
            ("multi", MultiLoRAConfig(r=2, target_modules=["q_proj", "v_proj"]), "multilora"),
            ("lora", LoRAConfig(r=2, target_modules=["q_proj", "v_proj"]), "lora"),
            ("lora4", LoRAConfig(r=4, target_modules=["q_proj", "v_proj"]), "lora"),
        ):
            _saved(out, row, seed, adapter)
            failed = (row, seed) == ("lora", 1)
            results[f"{row}/seed{seed}"] = _record(row, seed, variant, "failed" if failed else "ok")
        results[f"base/seed{seed}"] = _record("base", seed, "none")
    return config, out, results


def test_the_reference_is_the_first_finished_run_of_the_reference_variant_per_seed(grid):
    config, _, results = grid
    assert reference_variant() == "lora"  # the variant contract's mark, set in lora.py only
    assert reference_runs(config, results) == {0: "lora", 1: "lora4"}


def test_every_other_trained_run_of_a_seed_is_measured_against_its_reference(grid):
    config, out, results = grid
    cross = CrossRunMeasures(out).measure(config, results)
    assert cross.reference == "lora"
    for seed, reference in ((0, "lora"), (1, "lora4")):
        theirs = read_factors(run_folder(out, reference, seed) / "adapter")
        # multi is planned before the reference row: measured all the same
        for row in ("multi", "lora4") if seed == 0 else ("multi",):
            ours = read_factors(run_folder(out, row, seed) / "adapter")
            svd = results[f"{row}/seed{seed}"]["svd"]
            assert {k: svd[k] for k in similarity_fields(ours, theirs)} == pytest.approx(
                similarity_fields(ours, theirs)
            )
        assert "similarity_to_lora" not in results[f"{reference}/seed{seed}"]["svd"]
    assert "svd" not in results["base/seed0"]  # untrained: nothing to compare
    assert "similarity_to_lora" not in results["lora/seed1"]["svd"]  # failed: not measured
    # seed to seed: each row against itself, and against the reference row at the other seed
    # (lora has one finished seed: no pair of its own)
    assert set(cross.seed_to_seed["multi"]) == {"left", "right", "vs_lora_left", "vs_lora_right"}
    assert len(cross.seed_to_seed["multi"]["vs_lora_left"]) == 1  # multi/seed1 vs lora/seed0
    assert "left" not in cross.seed_to_seed.get("lora", {})


def test_each_adapter_is_read_and_each_pair_measured_once_across_writes(grid, monkeypatch):
    config, out, results = grid
    reads, phis = [], []
    real_read, real_phi = crossrun.read_factors, crossrun.factor_similarity
    monkeypatch.setattr(crossrun, "read_factors", lambda d: reads.append(d) or real_read(d))
    monkeypatch.setattr(crossrun, "factor_similarity", lambda *a: phis.append(a) or real_phi(*a))
    measures = CrossRunMeasures(out)
    first = measures.measure(config, results)
    assert len(reads) == len(set(reads)) == 5  # every finished trained run's adapter, once
    counted = len(phis)
    again = measures.measure(config, json.loads(json.dumps(results)))
    assert len(reads) == 5 and len(phis) == counted
    assert again == first


def test_a_sequential_run_measures_rows_planned_before_the_reference_as_concurrent_does(
    tmp_path,
):
    config = _experiment(tmp_path, ROWS[:2], seeds=[0])
    compare(config, progress=False, log=lambda s: None, env=_tiny_env())
    runs = {
        r["row"]: r for r in json.loads((tmp_path / "out" / "results.json").read_text())["runs"]
    }
    assert 0.0 <= runs["multi"]["svd"]["similarity_to_lora"] <= 1.0
    assert "similarity_to_lora" not in runs["lora"]["svd"]
