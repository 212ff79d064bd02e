"""Findings: planned contrasts, their paired differences and the report section, on synthetic
results dicts (no training)."""

import math

import pytest

from loravariants.compare.findings import (
    findings,
    findings_section,
    headline_metrics,
    planned_contrasts,
)
from loravariants.config import experiment_from_dict

# the rows findings.py recognises by what they train (the quickstart's rows before issue 25
# declared comparators)
STRUCTURAL_ROWS = [
    {"name": "base-noPI", "adapter": "none", "extend_context": False},
    {"name": "base-PI", "adapter": "none"},
    {"name": "lora", "adapter": "lora"},
    {"name": "lora+norm", "adapter": "lora", "trainable": ["norm"]},
    {"name": "longlora", "adapter": "lora", "trainable": ["embed", "norm"]},
    {
        "name": "longlora-fullattn",
        "adapter": "lora",
        "trainable": ["embed", "norm"],
        "attention": "sdpa",
    },
    {"name": "cola", "adapter": "cola", "trainable": ["embed", "norm"]},
    {"name": "multilora", "adapter": "multilora", "trainable": ["embed", "norm"]},
    {"name": "mixlora", "adapter": "mixlora", "trainable": ["embed", "norm"]},
]


def structural_config():
    return experiment_from_dict(
        {
            "runs": STRUCTURAL_ROWS,
            "context": {"target_length": 1024},
            "eval": {"max_tokens": 6144, "passkey_lengths": [240, 1000]},
        }
    )


def _record(row, seed, ppl, passkey, status="ok"):
    return {
        "row": row,
        "seed": seed,
        "status": status,
        "ppl": {"256": ppl / 2, "1024": ppl},
        "passkey": {"240": 1.0, "1000": passkey},
    }


def _results(values):
    """``values``: ``{row: [(ppl@1024, passkey@1000) per seed]}``."""
    out = {}
    for row, per_seed in values.items():
        for seed, (ppl, pk) in enumerate(per_seed):
            out[f"{row}/seed{seed}"] = _record(row, seed, ppl, pk)
    return out


def test_quickstart_plans_the_issue_contrasts():
    config = structural_config()
    pairs = [(c.a, c.b) for c in planned_contrasts(config)]
    assert pairs[:4] == [
        ("base-PI", "base-noPI"),
        ("longlora", "base-PI"),
        ("longlora", "lora"),
        ("longlora", "longlora-fullattn"),
    ]
    # every other trained row against lora, once (longlora - lora is not repeated)
    assert pairs[4:] == [
        ("lora+norm", "lora"),
        ("longlora-fullattn", "lora"),
        ("cola", "lora"),
        ("multilora", "lora"),
        ("mixlora", "lora"),
    ]


def test_rows_are_recognised_by_role_not_name():
    config = experiment_from_dict(
        {
            "context": {"target_length": 1024, "attention": "s2_attn"},
            "runs": [
                {"name": "plain", "adapter": "none", "extend_context": False},
                {"name": "interp", "adapter": "none"},
                {
                    "name": "ll-dense",
                    "adapter": "lora",
                    "trainable": ["norm", "embed"],
                    "attention": "sdpa",
                },
                {"name": "ll", "adapter": "lora", "trainable": ["embed", "norm"]},
                {"name": "l", "adapter": "lora"},
            ],
        }
    )
    pairs = [(c.a, c.b) for c in planned_contrasts(config)]
    assert pairs == [
        ("interp", "plain"),
        ("ll", "interp"),
        ("ll", "l"),
        ("ll", "ll-dense"),
        ("ll-dense", "l"),
    ]


def test_missing_rows_drop_their_contrasts():
    config = experiment_from_dict({"runs": [{"name": "lora", "adapter": "lora"}]})
    assert planned_contrasts(config) == []
    assert findings_section(config, _results({"lora": [(10.0, 0.5)] * 2})) == []


def test_headline_metrics_are_the_longest_lengths():
    config = structural_config()
    results = _results({"lora": [(10.0, 0.5)]})
    assert headline_metrics(config, results) == ["passkey@1000", "ppl@1024"]
    results["lora/seed0"]["status"] = "failed"
    assert headline_metrics(config, results) == []


def test_paired_difference_golden_and_verdicts():
    config = structural_config()
    results = _results(
        {
            "base-noPI": [(400.0, 0.0), (400.0, 0.0), (400.0, 0.1)],
            "base-PI": [(300.0, 0.2), (300.0, 0.3), (300.0, 0.4)],
            "longlora": [(200.0, 0.9), (210.0, 0.8), (190.0, 1.0)],
            "lora": [(205.0, 0.9), (200.0, 0.7), (200.0, 1.0)],
        }
    )
    by_key = {
        (f.contrast.a, f.contrast.b, f.metric): f.difference for f in findings(config, results)
    }
    # base-PI - base-noPI on ppl: -100 on every seed, no spread: resolved with a zero-width CI
    d = by_key[("base-PI", "base-noPI", "ppl@1024")]
    assert d.differences == (-100.0, -100.0, -100.0) and d.half_width == 0 and d.resolved
    # longlora - base-PI on passkey: 0.7, 0.5, 0.6 -> mean 0.6, sd 0.1, t(2) = 4.302653
    d = by_key[("longlora", "base-PI", "passkey@1000")]
    assert d.mean == pytest.approx(0.6)
    assert d.half_width == pytest.approx(4.302653 * 0.1 / math.sqrt(3), rel=1e-5)
    assert d.resolved
    # longlora - lora on ppl: -5, +10, -10 -> CI contains 0
    d = by_key[("longlora", "lora", "ppl@1024")]
    assert d.low < 0 < d.high and not d.resolved
    # rows the results lack give no common seed
    d = by_key[("cola", "lora", "ppl@1024")]
    assert d.seeds == () and not d.resolved


def test_failed_runs_are_left_out_of_the_pairs():
    config = structural_config()
    results = _results({"longlora": [(200.0, 0.9)] * 3, "lora": [(210.0, 0.5)] * 3})
    results["lora/seed1"]["status"] = "failed"
    d = {(f.contrast.a, f.contrast.b, f.metric): f.difference for f in findings(config, results)}
    assert d[("longlora", "lora", "ppl@1024")].seeds == (0, 2)


def test_section_markdown():
    config = structural_config()
    results = _results(
        {
            "base-noPI": [(400.0, 0.0), (400.0, 0.0)],
            "base-PI": [(300.0, 0.0), (300.0, 0.5)],
            "longlora": [(200.0, 0.9), (220.0, 1.0)],
            "lora": [(230.0, 0.8)],
        }
    )
    text = "\n".join(findings_section(config, results))
    assert text.startswith("## Findings")
    # records without per-document NLL: seeds only, and no spread is no test (it was read as
    # "resolved" with a zero-width interval once)
    row = "| planned | base-PI − base-noPI | interpolation alone, no training |"
    assert (
        f"{row} ppl@1024 | -100.00 [-100.00, -100.00] | — | — | not resolved (no spread over "
        "seeds: untestable without per-document NLL) | — |" in text
    )
    # passkey without per-prompt outcomes: a value, never a verdict
    assert (
        f"{row} passkey@1000 | +0.250 | — | — | no verdict (per-prompt outcomes not recorded)"
        in text
    )
    # one common seed: a value but never a verdict
    assert "| ppl@1024 | -30.00 | — | — | not resolved (needs 2+ seeds) | — |" in text
    # a row without results: a dash
    assert "| cola − lora | against plain LoRA | ppl@1024 | — | — | — | no common seed |" in text
    assert "Resolved after Holm: 0 of 1 tested (contrast, metric) cells." in text
    assert "Seed-only statistics where records without per-document NLL (doc_nll)" in text
