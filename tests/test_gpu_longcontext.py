"""benchmarks/gpu_longcontext.py --tiny: the GPU passkey experiment end to end on a CPU."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pytest
from scipy import stats

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "gpu_longcontext.py"


def _script():
    spec = importlib.util.spec_from_file_location("gpu_longcontext", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    import loravariants.compare.report as report

    out = tmp_path_factory.mktemp("glc") / "out"
    with pytest.MonkeyPatch.context() as mp:
        # compare redraws its plots after every row: two thirds of this test's time, and
        # tests/test_compare.py covers them; the script's own outputs do not depend on them
        mp.setattr(report, "make_report_plots", lambda *a, **k: {})
        assert _script().main(["--out", str(out), "--tiny", "--train", "always"]) == 0
    return out, json.loads((out / "gpu_longcontext.json").read_text())


def test_tiny_run_writes_every_row_and_the_decision(tiny_run):
    out, result = tiny_run
    rows = result["rows"]
    expected = ["base-noPI", "base-PI", "lora", "longlora", "longlora-fullattn", "cola"]
    assert list(rows) == expected + ["multilora", "mixlora"]
    native = result["native"]
    lengths = [str(k * native) for k in (1, 2, 4)]
    for name, row in rows.items():
        assert list(row["passkey"]) == lengths and list(row["ppl"]) == lengths, name
        for length in lengths:
            trials = row["passkey"][length]
            assert len(trials) == result["prompts"]
            # strata: the key inside the native length, and (past it) beyond
            strata = {t["stratum"] for t in trials}
            assert strata == ({"inside"} if length == lengths[0] else {"inside", "beyond"})
            for t in trials:
                if t["stratum"] == "beyond":
                    assert t["key_distance"] > native
                elif length != lengths[0]:
                    assert t["key_distance"] < native
            assert len(row["ppl"][length]) == result["documents"] >= 2
    # the pilot says where base-PI sits (a tiny base cannot retrieve: the floor)
    decision = result["decision"]
    assert decision["where"] == "floor" and decision["train"] is True
    assert "--train always" in decision["reason"]
    assert "Seed variance is not measured" in result["seed_note"]
    match = result["training"]["records"]["cola"]["match_params"]
    assert match["target"] == result["training"]["match_params"]  # matched to longlora's LoRA
    assert result["base"]["weights_sha256"] and len(result["base"]["weights_sha256"]) == 64
    assert not result["training"]["bf16"]  # CPU: no bf16 here; the GPU run uses it


def test_paired_statistics_match_scipy(tiny_run):
    _, result = tiny_run
    rows = result["rows"]
    by_key = {(c["row"], c["comparator"], c["length"]): c for c in result["contrasts"]}
    assert len(by_key) == 7 * 3  # 7 contrasts x 3 lengths
    c = by_key[("longlora", "base-PI", 4 * result["native"])]
    a = rows["longlora"]["passkey"][str(c["length"])]
    b = rows["base-PI"]["passkey"][str(c["length"])]
    assert [t["seed"] for t in a] == [t["seed"] for t in b]  # the same prompts
    only_a = sum(x["hit"] and not y["hit"] for x, y in zip(a, b, strict=True))
    only_b = sum(y["hit"] and not x["hit"] for x, y in zip(a, b, strict=True))
    assert (c["passkey"]["only_row"], c["passkey"]["only_comparator"]) == (only_a, only_b)
    nll_a, nll_b = (
        rows["longlora"]["ppl"][str(c["length"])],
        rows["base-PI"]["ppl"][str(c["length"])],
    )
    assert c["ppl"]["p"] == pytest.approx(stats.ttest_rel(nll_a, nll_b).pvalue)
    mean = sum(x - y for x, y in zip(nll_a, nll_b, strict=True)) / len(nll_a)
    assert c["ppl"]["ratio"] == pytest.approx(math.exp(mean))
    assert c["ppl"]["low"] < c["ppl"]["ratio"] < c["ppl"]["high"]


def test_mcnemar_is_the_exact_binomial_test():
    glc = _script()
    a = [{"seed": i, "hit": h} for i, h in enumerate([1, 1, 1, 1, 1, 1, 0, 0, 1, 0])]
    b = [{"seed": i, "hit": h} for i, h in enumerate([0, 0, 0, 0, 0, 1, 0, 1, 1, 0])]
    out = glc.mcnemar(a, b)
    assert (out["only_row"], out["only_comparator"]) == (5, 1)
    assert out["p"] == pytest.approx(stats.binomtest(5, 6, 0.5).pvalue) == pytest.approx(0.21875)
    assert out["difference"] == pytest.approx(0.4)
    assert glc.mcnemar(a, a)["p"] == 1.0


def test_markdown_has_the_tables(tiny_run):
    out, result = tiny_run
    text = (out / "gpu_longcontext.md").read_text()
    assert "| row | passkey@" in text and "| longlora − base-PI |" in text
    assert "Pilot decision:" in text and "Seed variance is not measured" in text
    assert all(f"| {name} |" in text for name in result["rows"])
    assert (out / "train" / "results.json").is_file()  # compare's own records


def test_bad_out_is_refused(tmp_path, capsys):
    (tmp_path / "mine.txt").write_text("keep")
    with pytest.raises(SystemExit) as e:
        _script().main(["--out", str(tmp_path), "--tiny"])
    assert e.value.code == 2 and "not an empty folder" in capsys.readouterr().err
    assert (tmp_path / "mine.txt").read_text() == "keep"


def test_the_pilot_trains_only_off_floor_and_ceiling():
    glc = _script()
    assert glc.pilot_decision(0.0, "auto")["where"] == "floor"
    assert not glc.pilot_decision(0.05, "auto")["train"]
    assert not glc.pilot_decision(1.0, "auto")["train"]
    assert glc.pilot_decision(1.0, "auto")["where"] == "ceiling"
    between = glc.pilot_decision(0.4, "auto")
    assert between["train"] and "off both floor and ceiling" in between["reason"]
    assert glc.pilot_decision(0.0, "always")["train"]
    assert not glc.pilot_decision(0.4, "never")["train"]
