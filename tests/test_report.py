"""The comparison report: similarity on the trained side with its baselines, paired
differences, parameter-matching warnings, timing ranges, and match_params that never misses
silently."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import make_tiny_llama
from test_compare import _experiment, _tiny_env

from loravariants.compare import (
    factor_similarity,
    match_rank,
    param_match_warning,
    summarize,
    summary_table,
)


def _pair(out, inn, k, gen):
    return torch.randn(out, k, generator=gen), torch.randn(k, inn, generator=gen)


def test_left_similarity_ignores_a_shared_init_that_the_right_side_reports():
    """Same A (shared seed), independently trained B: the right side says 'same', the left
    side is at the random baseline - the artefact of issue 18, item 1."""
    gen = torch.Generator().manual_seed(0)
    out, inn, k = 256, 64, 4
    A = torch.randn(k, inn, generator=gen)
    a = {"m": (torch.randn(out, k, generator=gen), A)}
    b = {"m": (torch.randn(out, k, generator=gen), A.clone())}
    right, random_right = factor_similarity(a, b, "right")
    left, random_left = factor_similarity(a, b, "left")
    assert right == pytest.approx(1.0, abs=1e-9)
    assert random_left == pytest.approx(k / out) and random_right == pytest.approx(k / inn)
    assert left < 3 * random_left  # independent B: near k / out = 0.016
    # the same learned output directions with a different A: left 1, right near random
    b2 = {"m": (a["m"][0].clone(), torch.randn(k, inn, generator=gen))}
    assert factor_similarity(a, b2, "left")[0] == pytest.approx(1.0, abs=1e-9)
    assert factor_similarity(a, b2, "right")[0] < 0.3


def test_factor_similarity_skips_experts_and_unshared_modules():
    gen = torch.Generator().manual_seed(1)
    a = {"x": _pair(8, 8, 2, gen), "ffn.up.experts.0": _pair(8, 8, 2, gen)}
    b = {"y": _pair(8, 8, 2, gen), "ffn.up.experts.0": _pair(8, 8, 2, gen)}
    value, baseline = factor_similarity(a, b)
    assert value != value and baseline != baseline  # nan: nothing comparable


def test_report_has_baselines_paired_differences_and_warnings(tmp_path):
    config = _experiment(
        tmp_path,
        [
            {"name": "lora", "adapter": "lora", "overrides": {"r": 2}},
            {"name": "lora4", "adapter": "lora", "overrides": {"r": 4}},
            {"name": "cola", "adapter": "cola", "overrides": {"r": 2, "chain_length": 2}},
            {"name": "base", "adapter": "none"},
        ],
    )
    from loravariants.compare import compare

    compare(config, progress=False, log=lambda s: None, env=_tiny_env())
    out = tmp_path / "out"
    report = (out / "report.md").read_text()
    data = json.loads((out / "results.json").read_text())
    runs = {r["key"]: r for r in data["runs"]}
    svd = runs["cola/seed1"]["svd"]
    assert {"similarity_to_lora", "similarity_to_lora_right", "similarity_random"} <= set(svd)
    summary = {r["row"]: r for r in data["summary"]}
    # seed-to-seed baseline of LoRA itself, next to every cross-method similarity
    lo, _ = summary["lora"]["sim.seed_to_seed_left"]
    assert 0.0 < lo < 1.0
    assert "Baseline, LoRA vs LoRA across seeds (left): " + f"{lo:.3f}" in report
    # the like-for-like value: cola at one seed against LoRA at the other
    assert summary["lora"]["sim.vs_lora_left_other_seed"][0] == pytest.approx(lo)
    assert 0.0 < summary["cola"]["sim.vs_lora_left_other_seed"][0] < 1.0
    assert "| cola |" in report.split("## Subspace similarity to LoRA")[1]
    # rank, targets and parameter count per row; the warning for 2x different sizes
    assert summary["lora4"]["rank"] == "r=4" and summary["cola"]["rank"] == "r=2 x2 links"
    assert summary["lora"]["targets"] == "q_proj,k_proj,v_proj,o_proj"
    assert summary["cola"]["targets"] == "q_proj,v_proj"
    assert "they adapt different modules" in report
    assert summary["lora4"]["adapter_params"][0] == 2 * summary["lora"]["adapter_params"][0]
    hi, lo_p = summary["lora4"]["adapter_params"][0], summary["cola"]["adapter_params"][0]
    assert "not parameter-matched" in report and f"{hi / lo_p:.1f}x" in report
    # paired differences with a verdict in words; timings as min-max with two seeds
    assert "## Paired differences (row − lora, per seed)" in report
    assert ("Indistinguishable from lora" in report) or ("differs from lora" in report)
    table = report.split("| row | seeds |")[1]
    assert "(min–max)" in table and "±" in table  # loss keeps its CI, timings their range


def test_summary_marks_concurrent_timings_as_shared_and_matched_rows_have_no_warning():
    results = {
        f"{row}/seed{s}": {
            "row": row,
            "seed": s,
            "status": "ok",
            "variant": "lora",
            "adapter_config": {"variant": "lora", "r": 2, "target_modules": ["q_proj"]},
            "adapter_params": 100 + s,
            "trainable_params": 100 + s,
            "tokens_per_s": 10.0 * (s + 1),
            "wall_s": 1.0,
            "final_loss": 1.0 + s,
            "concurrent": True,
        }
        for row in ("a", "b")
        for s in (0, 1, 2)
    }

    class Spec:
        def __init__(self, name):
            self.name, self.adapter, self.trains, self.trainable = name, "lora", True, []

    class Config:
        runs = [Spec("a"), Spec("b")]

    summary = summarize(Config(), results)
    assert param_match_warning(summary) is None
    table = summary_table(summary)
    assert "20 ± " in table and "†" in table  # 3 seeds: mean ± CI; shared group figure
    summary[1]["adapter_params"] = (1000.0, 0.0)
    assert "9.9x" in param_match_warning(summary)  # 1,000 / 101


@pytest.mark.parametrize("spec, extra", [("mixlora", {"num_experts": 4}), ("cola", {})])
def test_match_params_searches_every_rank_field(spec, extra):
    target = 20000
    overrides, achieved = match_rank(lambda: make_tiny_llama(), spec, extra, target, None)
    assert abs(achieved - target) / target <= 0.10, (overrides, achieved)
    if spec == "mixlora":
        assert overrides["r"] == overrides["expert_r"]


def test_match_params_refuses_an_unreachable_target_unless_allowed():
    with pytest.raises(ValueError, match=r"match_params: 10 .*out of reach.*rank 1 already"):
        match_rank(lambda: make_tiny_llama(), "lora", {}, 10, None)
    overrides, achieved = match_rank(
        lambda: make_tiny_llama(), "lora", {}, 10, None, tolerance=None
    )
    assert overrides["r"] == 1 and achieved > 10


def test_match_params_outcome_is_reported(tmp_path):
    config = _experiment(
        tmp_path,
        [{"name": "lora", "adapter": "lora"}, {"name": "multi", "adapter": "multilora"}],
        seeds=[0],
        match_params=3000,
        match_params_tolerance=0.5,
    )
    from loravariants.compare import compare

    logs: list[str] = []
    compare(config, progress=False, log=logs.append, env=_tiny_env())
    assert any("from 3,000" in line for line in logs)
    run = json.loads((tmp_path / "out" / "results.json").read_text())["runs"][0]
    assert run["match_params"]["target"] == 3000
    assert run["match_params"]["deviation"] == pytest.approx(run["matched_params"] / 3000 - 1)
    assert "match_params: lora" in (tmp_path / "out" / "report.md").read_text()


def test_smooth_and_layer_of():
    from loravariants.compare.plots import layer_of, smooth

    assert smooth([1.0, 3.0, 5.0, 7.0], 2) == [1.0, 2.0, 4.0, 6.0]
    assert smooth([1.0, 3.0], 1) == [1.0, 3.0]
    assert layer_of("model.layers.12.mlp.gate_proj.experts.3") == 12
    assert layer_of("gpt_neox.layers.0.attention.query_key_value") == 0
    assert layer_of("transformer.h.5.attn.c_attn") == 5
    assert layer_of("lm_head") is None


def test_report_plots_facets_error_bars_and_layers(tmp_path):
    """Six rows -> two loss panels; effective rank is plotted per decoder layer, so a row with
    many modules per layer and one with few line up."""
    from loravariants.compare.plots import make_report_plots

    class Spec:
        def __init__(self, name):
            self.name = name

    class Config:
        runs = [Spec(f"row{i}") for i in range(6)]

    results = {}
    for i in range(6):
        for s in (0, 1):
            modules = {
                f"model.layers.{k}.mlp.gate_proj.experts.{e}": 2.0 + k + 0.1 * e
                for k in range(3)
                for e in range(1 + 3 * (i % 2))  # 1 or 4 modules per layer
            }
            results[f"row{i}/seed{s}"] = {
                "row": f"row{i}",
                "seed": s,
                "status": "ok",
                "loss_curve": [5.0 - 0.01 * t + 0.05 * ((t * 7 + i) % 3) for t in range(40)],
                "ppl": {"256": 300.0 + i + s, "512": 310.0 + i - s},
                "svd": {"effective_rank_by_layer": modules},
            }
    made = make_report_plots(tmp_path, Config(), results)
    assert set(made) == {"Training loss", "Perplexity vs context length", "Effective rank by layer"}
    from matplotlib.image import imread

    wide = imread(tmp_path / "plots" / "loss_curves.png")
    assert wide.shape[1] > 1.5 * wide.shape[0]  # two panels side by side
    for name in ("perplexity_vs_context.png", "effective_rank.png"):
        assert (tmp_path / "plots" / name).stat().st_size > 10_000


def test_an_unreachable_match_params_stops_the_comparison_before_any_run(tmp_path):
    from loravariants.compare import compare

    config = _experiment(tmp_path, [{"name": "lora", "adapter": "lora"}], match_params=10)
    with pytest.raises(ValueError, match="match_params: 10 adapter parameters is out of reach"):
        compare(config, progress=False, log=lambda s: None, env=_tiny_env())
    assert not (tmp_path / "out" / "runs").exists()
