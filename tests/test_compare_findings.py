"""The Findings' statistics on synthetic records (no training): each figure against scipy or a
hand computation; Holm per family; passkey by exact McNemar with its floor and prompt rules;
the comparator warnings; the report's perplexity curve, learning rates and record links."""

import json
import math

import numpy as np
import pytest
from scipy import stats as scipy_stats

import loravariants.compare.report as report
from loravariants.compare.findings import (
    comparator_warnings,
    contrasts_by_length,
    findings,
    findings_section,
)
from loravariants.compare.records import records_problem
from loravariants.compare.summary import perplexity_by_length, summarize
from loravariants.config import experiment_from_dict
from loravariants.stats import holm

T975_2 = scipy_stats.t.ppf(0.975, 2)


def _config(runs, comparators=None, families=None):
    runs = [{**r, "comparator": (comparators or {}).get(r["name"])} for r in runs]
    return experiment_from_dict({"runs": runs, "seeds": [0, 1, 2], "families": families})


def _record(row, seed, nll=None, tokens=None, ppl=None, **extra):
    """A finished run; ``nll``/``tokens``: per-document sums at length 64 (doc_nll)."""
    record = {"key": f"{row}/seed{seed}", "row": row, "seed": seed, "status": "ok"}
    if nll is not None:
        record["doc_nll"] = {"64": [[float(n), float(t)] for n, t in zip(nll, tokens, strict=True)]}
        ppl = math.exp(sum(nll) / sum(tokens))
    if ppl is not None:
        record["ppl"] = {"64": ppl}
    record.update(extra)
    return record


def _results(*records):
    return {r["key"]: r for r in records}


LORA_COLA = [{"name": "lora", "adapter": "lora"}, {"name": "cola", "adapter": "cola"}]


def test_one_document_per_seed_is_the_paired_t_over_seeds():
    nll = {"lora": [400.0, 410.0, 395.0], "cola": [405.0, 420.0, 396.0]}
    results = _results(*[_record(row, s, [nll[row][s]], [100.0]) for row in nll for s in range(3)])
    (f,) = findings(_config(LORA_COLA), results)
    ppl = {row: [math.exp(v / 100) for v in nll[row]] for row in nll}
    d = np.subtract(ppl["cola"], ppl["lora"])
    assert f.metric == "ppl@64" and f.method == "seeds × documents"
    pooled = math.exp(sum(nll["cola"]) / 300) - math.exp(sum(nll["lora"]) / 300)
    assert f.estimate == pytest.approx(pooled)
    se = d.std(ddof=1) / math.sqrt(3)
    assert (f.low, f.high) == pytest.approx((pooled - T975_2 * se, pooled + T975_2 * se))
    # the seed part alone (one document: nothing to resample), centred on the pooled estimate
    assert f.p == pytest.approx(2 * scipy_stats.t.sf(abs(pooled) / se, 2))
    assert f.p_holm == pytest.approx(f.p)  # a family of one
    # not resolved, with the MDE at 80% power: (t_{0.975,2} + t_{0.8,2}) * se
    mde = (T975_2 + scipy_stats.t.ppf(0.8, 2)) * se
    assert f.mde == pytest.approx(mde) and f.verdict == f"not resolved (MDE {mde:.3g})"


def test_untrained_rows_get_an_interval_from_the_documents():
    runs = [
        {"name": "noPI", "adapter": "none", "extend_context": False},
        {"name": "PI", "adapter": "none"},
    ]
    rng = np.random.default_rng(0)
    tokens = rng.integers(50, 150, size=200).astype(float)
    a = tokens * rng.normal(5.0, 0.3, size=200)
    b = a - tokens * rng.normal(0.05, 0.05, size=200)  # PI a little better on most documents
    # untrained: every seed scores the same values (the seeds carry no spread)
    results = _results(
        *[_record("noPI", s, a, tokens) for s in range(3)],
        *[_record("PI", s, b, tokens) for s in range(3)],
    )
    (f,) = findings(_config(runs), results)
    assert (f.contrast.a, f.contrast.b) == ("PI", "noPI")
    assert f.difference.half_width == 0  # over seeds alone: a zero-width interval
    assert f.low < f.estimate < f.high < 0 and f.p < 1e-6 and f.verdict == "resolved"


def test_holm_adjusts_within_each_declared_family():
    runs = [{"name": n, "adapter": "lora"} for n in ("ref", "b", "c", "d")]
    deltas = {"b": [1.0, 1.4, 0.9], "c": [0.5, -0.2, 0.7], "d": [2.0, 2.1, 1.7]}
    records = [_record("ref", s, ppl=100.0) for s in range(3)]
    records += [_record(n, s, ppl=100.0 + v[s]) for n, v in deltas.items() for s in range(3)]
    config = _config(
        runs,
        comparators={"b": "ref", "c": "ref", "d": "ref"},
        families={"main": ["b", "c"], "other": ["d"]},
    )
    found = {f.contrast.a: f for f in findings(config, _results(*records))}
    raw = {n: scipy_stats.ttest_1samp(v, 0.0).pvalue for n, v in deltas.items()}
    assert {n: f.p for n, f in found.items()} == pytest.approx(raw)
    main = holm([raw["b"], raw["c"]])
    assert (found["b"].p_holm, found["c"].p_holm) == pytest.approx(main)
    assert found["d"].p_holm == pytest.approx(raw["d"])  # its own family of one
    assert found["b"].family == "main" and found["d"].family == "other"
    assert all(f.method == "seeds only" for f in found.values())
    text = "\n".join(findings_section(config, _results(*records)))
    assert "Seed-only statistics where records without per-document NLL" in text
    assert "| main | b − ref |" in text and "| other | d − ref |" in text


def _passkey(row, seed, outcomes):
    return _record(
        row,
        seed,
        passkey={"512": sum(outcomes) / len(outcomes)},
        passkey_outcomes={"512": outcomes},
    )


def test_passkey_is_exact_mcnemar_over_the_paired_prompts():
    rng = np.random.default_rng(1)
    a = [rng.integers(0, 2, size=60).tolist() for _ in range(2)]
    b = [[v if rng.random() < 0.7 else 1 - v for v in seed] for seed in a]
    results = _results(*[_passkey("cola", s, a[s]) for s in range(2)])
    results.update(_results(*[_passkey("lora", s, b[s]) for s in range(2)]))
    (f,) = findings(_config(LORA_COLA), results)
    xa, xb = np.concatenate(a).astype(bool), np.concatenate(b).astype(bool)
    n10, n01 = int((xa & ~xb).sum()), int((~xa & xb).sum())
    assert f.method == "exact McNemar" and f.metric == "passkey@512"
    assert f.p == pytest.approx(scipy_stats.binomtest(n10, n10 + n01, 0.5).pvalue)
    assert f.estimate == pytest.approx((n10 - n01) / 120)
    # one seed: 60 paired prompts are too few for a verdict, and the report says why
    one = {k: v for k, v in results.items() if k.endswith("seed0")}
    (f,) = findings(_config(LORA_COLA), one)
    assert f.verdict == "no verdict (60 paired prompts, fewer than 100)" and not f.tested


def test_both_rows_at_the_floor_are_uninformative_and_leave_the_family():
    records = [_passkey(row, s, [0] * 100) for row in ("lora", "cola") for s in range(2)]
    for r, v in zip(records, [100.0, 101.0, 103.0, 104.5], strict=True):
        r["ppl"] = {"1024": v}  # a seed-only perplexity contrast in the same family
    found = {f.metric: f for f in findings(_config(LORA_COLA), _results(*records))}
    assert found["passkey@512"].verdict == "uninformative (floor)"
    assert not found["passkey@512"].tested
    ppl = found["ppl@1024"]
    assert ppl.p == pytest.approx(scipy_stats.ttest_1samp([3.0, 3.5], 0.0).pvalue)
    assert ppl.p_holm == pytest.approx(ppl.p)  # the floor cell is no member of the family


def _trained(row, seed, targets, dropout=0.0, params=1000, lr=1e-3):
    config = {"variant": "lora", "target_modules": targets, "dropout": dropout}
    return _record(row, seed, ppl=100.0, adapter_config=config, adapter_params=params, lr=lr)


def test_comparator_warnings_name_every_other_difference():
    runs = [
        {"name": "lora", "adapter": "lora"},
        {"name": "lora-emb", "adapter": "lora", "trainable": ["embed"]},
        {"name": "wide", "adapter": "lora", "trainable": ["embed"]},
    ]
    config = _config(runs, comparators={"lora-emb": "lora", "wide": "lora"})
    results = _results(
        _trained("lora", 0, ["q_proj", "v_proj"]),
        _trained("lora-emb", 0, ["q_proj", "v_proj"], params=1050),  # within 10%
        _trained("wide", 0, ["q_proj", "k_proj"], dropout=0.1, params=2000, lr=2e-3),
    )
    warnings = comparator_warnings(config, results)
    assert warnings == [
        "wide − lora differ in 5 things: target modules, dropout, adapter params, trainable, lr"
    ]
    text = "\n".join(findings_section(config, results))
    assert "contrasted rows differ in more than the factor under test" in text
    config.lr_grid = [1e-3, 2e-3]  # rates chosen per row on the grid: tuning, not a confound
    assert comparator_warnings(config, results) == [
        "wide − lora differ in 4 things: target modules, dropout, adapter params, trainable"
    ]
    # without records yet, the question is derived from the definitions alone
    assert "| lora-emb − lora | differs in trainable |" in text


def test_perplexity_curve_of_one_row_is_the_t_interval_over_its_seeds():
    config = _config(LORA_COLA[:1])
    nll = [400.0, 410.0, 395.0]
    results = _results(*[_record("lora", s, [nll[s]], [100.0]) for s in range(3)])
    p = perplexity_by_length(config, results)["lora"]["64"]
    ppl = [math.exp(v / 100) for v in nll]
    half = T975_2 * np.std(ppl, ddof=1) / math.sqrt(3)
    pooled = math.exp(sum(nll) / 300)
    assert (p.value, p.low, p.high) == pytest.approx((pooled, pooled - half, pooled + half))
    assert p.method == "seeds × documents"
    # no per-document NLL: Student t over the seeds' perplexities
    for r in results.values():
        del r["doc_nll"]
    p = perplexity_by_length(config, results)["lora"]["64"]
    assert p.method == "seeds only" and p.value == pytest.approx(np.mean(ppl))


def test_train_loss_is_the_mean_of_the_last_tenth_of_steps():
    config = _config(LORA_COLA[:1])
    curve = [float(20 - i) for i in range(20)]  # last 10%: steps 19 and 20 -> 2, 1
    results = _results(
        _record("lora", 0, ppl=1.0, loss_curve=curve, final_loss=1.0),
        _record("lora", 1, ppl=1.0, loss_curve=curve, train_loss_final=4.0),
    )
    (row,) = summarize(config, results)
    assert row["train_loss_final"][0] == pytest.approx((1.5 + 4.0) / 2)


def test_the_report_links_the_records_and_states_each_rows_rate(tmp_path, monkeypatch):
    monkeypatch.setattr(report, "make_report_plots", lambda *a, **k: {})
    config = _config(LORA_COLA)
    results = _results(
        *[
            _record(
                row,
                s,
                [400.0 + s + (row == "cola")],
                [100.0],
                lr=lr,
                match_params={"target": 100, "achieved": achieved, "deviation": achieved / 100 - 1},
                adapter_params=achieved,
            )
            for row, lr, achieved in (("lora", 1e-3, 100), ("cola", 3e-3, 115))
            for s in range(3)
        ]
    )
    selection = {"cola": {"grid": [1e-3, 3e-3], "selection_ppl": {"0.001": 60.5, "0.003": 58.25}}}
    selection["cola"].update(chosen=3e-3, seeds=[0], steps=50)
    report.write_outputs(tmp_path, config, results, None, lr_selection=selection)
    text = (tmp_path / "report.md").read_text()
    assert "[results.json](results.json)" in text and "[results.csv](results.csv)" in text
    assert "Learning rate per row: lora 0.001; cola 0.003." in text
    assert "- cola: 0.003 chosen from the grid [0.001, 0.003]" in text and "58.25" in text
    assert "match_params missed by more than 10%**: cola (+15.0%)" in text
    assert "## Perplexity against length" in text and "| lora | " in text
    data = json.loads((tmp_path / "results.json").read_text())
    assert data["lr_selection"] == selection
    assert [f["metric"] for f in data["findings"]] == ["ppl@64"]
    assert set(data["perplexity_by_length"]["cola"]["64"]) >= {"value", "low", "high"}
    csv = (tmp_path / "results.csv").read_text().splitlines()
    assert len(csv) == 7 and "lr" in csv[0].split(",")  # one line per seed and row


BAD_RECORDS = {
    "doc_nll not a mapping": ({"doc_nll": [1, 2]}, "runs[0].doc_nll must be a mapping"),
    "doc_nll not a list": ({"doc_nll": {"64": 3}}, "runs[0].doc_nll['64'] must be a list"),
    "doc_nll pair": (
        {"doc_nll": {"64": [[1.0, 2.0], [1.0, 0]]}},
        "runs[0].doc_nll['64'][1] must be [nll_sum >= 0, tokens > 0], got [1.0, 0]",
    ),
    "passkey outcome": (
        {"passkey_outcomes": {"512": [0, 1, 2]}},
        "runs[0].passkey_outcomes['512'] must be a list of 0/1 outcomes",
    ),
    "train_loss_final": ({"train_loss_final": "low"}, "runs[0].train_loss_final must be a number"),
    "lr": ({"lr": [0.1]}, "runs[0].lr must be a number"),
}


@pytest.mark.parametrize("case", sorted(BAD_RECORDS))
def test_a_bad_statistics_field_is_named_in_one_line(case):
    fields, message = BAD_RECORDS[case]
    record = {"key": "lora/seed0", "row": "lora", "seed": 0, "status": "ok", **fields}
    problem = records_problem({"runs": [record]})
    assert problem is not None and problem.startswith(message) and "\n" not in problem


def test_the_perplexity_plot_draws_the_curves_intervals(tmp_path):
    from loravariants.compare.plots import make_report_plots

    config = _config(LORA_COLA)
    results = _results(
        *[
            _record(row, s, [400.0 + s + 3 * (row == "cola")], [100.0])
            for row in ("lora", "cola")
            for s in range(3)
        ]
    )
    curves = perplexity_by_length(config, results)
    made = make_report_plots(tmp_path, config, results, None, curves)
    assert made["Perplexity vs context length"] == "plots/perplexity_vs_context.png"
    assert (tmp_path / "plots" / "perplexity_vs_context.png").stat().st_size > 1000


def test_every_length_gets_the_contrasts_interval_and_the_headline_its_verdict():
    rows = {"lora": [400.0, 410.0, 395.0], "cola": [405.0, 420.0, 396.0]}
    records = []
    for row, nll in rows.items():
        for s in range(3):
            r = _record(row, s, [nll[s]], [100.0])
            r["doc_nll"]["32"] = [[nll[s] / 2 + 3 * (row == "cola"), 50.0]]
            r["ppl"]["32"] = math.exp(r["doc_nll"]["32"][0][0] / 50)
            records.append(r)
    results = _results(*records)
    config = _config(LORA_COLA)
    curve = {f.metric: f for f in contrasts_by_length(config, results)}
    (headline,) = findings(config, results)
    assert headline.metric == "ppl@64"
    assert (curve["ppl@64"].estimate, curve["ppl@64"].low) == (headline.estimate, headline.low)
    assert curve["ppl@32"].estimate == pytest.approx(
        math.exp((sum(rows["cola"]) / 2 + 9) / 150) - math.exp(sum(rows["lora"]) / 2 / 150)
    )
    assert math.isnan(curve["ppl@32"].p_holm)  # no member of a Holm family
    text = "\n".join(findings_section(config, results))
    assert "| contrast (a − b) | ppl@32 | ppl@64 |" in text


def test_full_fine_tuning_against_an_adapter_is_one_difference():
    runs = [
        {"name": "lora", "adapter": "lora"},
        {"name": "full", "adapter": "none", "trainable": ["all"]},
        {"name": "full-dense", "adapter": "none", "trainable": ["all"], "attention": "sdpa"},
    ]
    config = _config(runs, comparators={"full": "lora", "full-dense": "lora"})
    results = _results(
        _trained("lora", 0, ["q_proj", "v_proj"]),
        _record("full", 0, ppl=90.0, lr=1e-3),
        _record("full-dense", 0, ppl=90.0, lr=1e-3),
    )
    assert comparator_warnings(config, results) == [
        "full-dense − lora differ in 2 things: full fine-tuning, attention"
    ]
