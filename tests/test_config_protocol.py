"""Issue 25's protocol fields: comparators, families, lr_grid, controls -- each bad value is one
line naming its key; report-only fields stay out of the same-experiment check."""

from __future__ import annotations

import pytest

from loravariants.cli import main
from loravariants.compare.records import check_same_experiment, config_dict
from loravariants.config import DEFAULT_SELECTION_FRACTION, experiment_from_dict

ROWS = [
    {"name": "base"},
    {"name": "lora", "adapter": "lora", "comparator": "base"},
    {"name": "cola", "adapter": "cola", "comparator": "lora", "question": "COLA vs LoRA"},
]


def experiment(**top):
    return {"runs": [dict(r) for r in ROWS], **top}


def with_row(row, **top):
    return {"runs": [{"name": "base"}, row], **top}


@pytest.mark.parametrize(
    "data, message",
    [
        (
            with_row({"name": "a", "adapter": "lora", "comparator": "nope"}),
            r"runs\[a\]\.comparator 'nope' is not a row",
        ),
        (
            with_row({"name": "a", "adapter": "lora", "comparator": "a"}),
            r"runs\[a\]\.comparator names the row itself",
        ),
        (
            with_row({"name": "a", "adapter": "lora", "comparator": ""}),
            r"runs\[a\]\.comparator must be a non-empty string",
        ),
        (
            with_row({"name": "a", "adapter": "lora", "question": "why?"}),
            r"runs\[a\]\.question needs a comparator",
        ),
        (
            experiment(families={"f": ["lora", "ghost"]}),
            r"families\[f\] names unknown rows \['ghost'\]",
        ),
        (
            experiment(families={"f": ["base"]}),
            r"families\[f\] lists rows without a comparator \['base'\]",
        ),
        (experiment(families={"f": []}), r"families\[f\] must be a non-empty list"),
        (experiment(families={"f": ["lora", "lora"]}), r"families\[f\] lists a row twice"),
        (experiment(families={}), "families must be a non-empty mapping"),
        (experiment(families=["lora"]), "families must be a non-empty mapping"),
        (experiment(lr_grid=[]), "lr_grid must be a non-empty list of positive"),
        (experiment(lr_grid=[1e-3, 0]), r"lr_grid\[\] must be in \(0"),
        (experiment(lr_grid=[1e-3, -1e-3]), r"lr_grid\[\] must be in \(0"),
        (experiment(lr_grid=["fast"]), r"lr_grid\[\] must be a number"),
        (experiment(lr_grid=[1e-3, 1e-3]), "lr_grid lists a rate twice"),
        (experiment(lr_grid=[1e-3], lr_grid_seeds=[]), "lr_grid_seeds must be a non-empty list"),
        (experiment(lr_grid=[1e-3], lr_grid_seeds=[-1]), r"lr_grid_seeds\[\] must be in"),
        (experiment(lr_grid=[1e-3], lr_grid_steps=0), "lr_grid_steps must be in"),
        (
            experiment(data={"selection_fraction": 0.1}),
            "data.selection_fraction holds documents out for lr_grid",
        ),
        (
            experiment(lr_grid=[1e-3], data={"selection_fraction": 0}),
            r"data.selection_fraction must be in \(0",
        ),
        (
            experiment(
                lr_grid=[1e-3], data={"validation_fraction": 0.5, "selection_fraction": 0.5}
            ),
            "validation_fraction \\+ data.selection_fraction must be below 1",
        ),
        (
            experiment(lr_grid=[1e-3], data={"validation_fraction": 0.96}),
            "leaves no documents for lr_grid's selection",
        ),
        (with_row({"name": "a", "adapter": "lora", "lr": 0}), r"runs\[a\]\.lr must be in \(0"),
        (with_row({"name": "a", "lr": 1e-3}), r"runs\[a\]\.lr is set, but the row trains nothing"),
        (
            with_row({"name": "a", "adapter": "lora", "train_length": "short"}),
            r"runs\[a\]\.train_length must be one of \['target', 'native'\]",
        ),
        (
            with_row(
                {"name": "a", "adapter": "lora", "train_length": "native"},
                context={"target_length": 512},
            ),
            r"native trains without position interpolation: set extend_context: false",
        ),
        (
            with_row(
                {"name": "a", "train_length": "native", "extend_context": False},
                context={"target_length": 512},
            ),
            r"runs\[a\]\.train_length: native is set, but the row trains nothing",
        ),
        (
            with_row(
                {"name": "a", "adapter": "lora", "train_length": "native", "extend_context": False}
            ),
            r"runs\[a\]\.train_length: native needs context.target_length",
        ),
        (
            with_row({"name": "a", "adapter": "lora", "trainable": ["all"]}),
            r"runs\[a\]\.trainable: \[all\] is full fine-tuning.*set adapter: none",
        ),
        (
            with_row({"name": "a", "trainable": ["all", "embed"]}),
            r"runs\[a\]\.trainable: \[all\] trains every parameter and takes no other entry",
        ),
        (
            with_row({"name": "a", "attention": "s2_attn_shifty"}),
            r"runs\[a\]\.attention must be one of \['s2_attn', 's2_attn_noshift'",
        ),
        (
            with_row({"name": "a", "trainable": ["all"]}, concurrent=True),
            "concurrent: true, but rows \\['a'\\] train base weights",
        ),
        (
            experiment(lr_grid=[1e-3], concurrent=True),
            "concurrent: true trains every row in one step at train.lr",
        ),
        (
            with_row({"name": "a", "adapter": "lora", "lr": 1e-3}, concurrent=True),
            "concurrent: true trains every row in one step",
        ),
    ],
)
def test_protocol_errors_are_one_line_naming_the_key(data, message):
    with pytest.raises(ValueError, match=message) as error:
        experiment_from_dict(data)
    assert "\n" not in str(error.value)


def test_protocol_fields_parse():
    config = experiment_from_dict(
        {
            "runs": [
                {"name": "base"},
                {"name": "full-ft", "trainable": "all", "comparator": "base", "lr": 1e-4},
                {"name": "noshift", "adapter": "lora", "attention": "s2_attn_noshift"},
                {
                    "name": "native",
                    "adapter": "lora",
                    "extend_context": False,
                    "train_length": "native",
                    "comparator": "base",
                },
            ],
            "context": {"target_length": 512, "attention": "s2_attn_noshift"},
            "families": {"controls": "full-ft"},
            "lr_grid": 2e-4,
            "lr_grid_steps": 5,
            "eval": {"max_tokens": None},
        }
    )
    full, noshift, native = config.runs[1:]
    assert full.trains and full.full_finetune and not full.has_adapter and full.trainable == ["all"]
    assert noshift.trains and noshift.has_adapter and not noshift.full_finetune
    assert not config.runs[0].trains
    assert config.families == {"controls": ["full-ft"]}
    assert config.lr_grid == [2e-4] and config.lr_grid_seeds == [0] and config.lr_grid_steps == 5
    assert config.data.selection_fraction == DEFAULT_SELECTION_FRACTION
    assert config.eval.max_tokens is None
    # full-ft fixes its own rate; the adapter rows get the grid's; the untrained row none
    assert [config.needs_lr_selection(r) for r in config.runs] == [False, False, True, True]
    assert config.row_lr(full) == 1e-4 and config.row_lr(noshift) == config.train.lr
    assert native.train_length == "native"


def test_yaml_1_1_exponents_are_numbers(tmp_path):
    from loravariants.config import load_experiment

    cfg = tmp_path / "x.yaml"
    cfg.write_text(
        "runs: [{name: a, adapter: lora, lr: 1e-3}, {name: b, adapter: lora}]\n"
        "lr_grid: [5e-4, 2e-3]\n"
    )
    config = load_experiment(cfg)
    assert config.runs[0].lr == 1e-3 and config.lr_grid == [5e-4, 2e-3]


def test_no_lr_grid_no_selection_split():
    config = experiment_from_dict(experiment())
    assert config.lr_grid is None and config.data.selection_fraction is None
    assert not any(config.needs_lr_selection(r) for r in config.runs)
    assert config.families is None


def saved(data):
    return config_dict(experiment_from_dict(data))


def test_report_only_fields_are_outside_the_same_experiment_check(tmp_path):
    before = saved(experiment())
    # new comparators, questions and families: the same experiment, re-reported
    after = experiment(families={"variants": ["cola"]})
    after["runs"][1]["comparator"] = None
    after["runs"][2]["question"] = "does COLA beat LoRA?"
    after["runs"][0]["comparator"] = "cola"
    check_same_experiment(tmp_path, before, experiment_from_dict(after))


@pytest.mark.parametrize(
    "change, differs",
    [
        ({"lr_grid": [1e-3, 2e-3]}, "lr_grid"),
        ({"lr_grid_steps": 3, "lr_grid": [1e-3]}, "lr_grid"),
        ({"lr_grid_seeds": [1]}, "lr_grid_seeds"),
    ],
)
def test_run_changing_protocol_fields_stay_in_the_check(tmp_path, change, differs):
    before = saved(experiment())
    with pytest.raises(ValueError, match=f"different experiment.*{differs}"):
        check_same_experiment(tmp_path, before, experiment_from_dict(experiment(**change)))


@pytest.mark.parametrize("row_change", [{"lr": 1e-3}, {"trainable": ["embed"]}])
def test_a_row_lr_is_a_different_experiment(tmp_path, row_change):
    before = saved(experiment())
    after = experiment()
    after["runs"][1].update(row_change)
    with pytest.raises(ValueError, match=r"runs\[lora\] changed"):
        check_same_experiment(tmp_path, before, experiment_from_dict(after))


def test_a_config_saved_before_the_protocol_fields_still_matches(tmp_path):
    old = saved(experiment())
    for key in ("families", "lr_grid", "lr_grid_seeds", "lr_grid_steps"):
        old.pop(key)
    old["data"].pop("selection_fraction")
    for row in old["runs"]:
        for key in ("comparator", "question", "lr", "train_length"):
            row.pop(key)
    check_same_experiment(tmp_path, old, experiment_from_dict(experiment()))


def test_cli_refuses_a_bad_lr_grid_in_one_line(tmp_path, capsys):
    cfg = tmp_path / "x.yaml"
    cfg.write_text("runs: [{name: a, adapter: lora}]\nlr_grid: []\n")
    assert main(["compare", "--config", str(cfg)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "lr_grid must be a non-empty list" in err[0]
    cfg.write_text("runs: [{name: a, adapter: lora, comparator: b}]\n")
    assert main(["compare", "--config", str(cfg)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "comparator 'b' is not a row" in err[0]


@pytest.mark.parametrize("name", ["quickstart.yaml", "study.yaml"])
def test_shipped_configs_are_matched_and_declare_their_contrasts(name):
    from loravariants.config import CONFIG_DIR, load_adapter_spec, load_experiment

    config = load_experiment(CONFIG_DIR / name)
    rows = {r.name: r for r in config.runs}
    # every row but the reference is contrasted, against a row that exists
    assert [r.name for r in config.runs if r.comparator is None] == ["base-noPI"]
    # the variants and the controls against longlora (LoRA + embed + norm)
    for row in ("cola", "multilora", "mixlora", "lora", "lora+embed", "lora+norm", "full-ft"):
        assert rows[row].comparator == "longlora"
    assert rows["longlora"].comparator == "base-PI" and rows["base-PI"].comparator == "base-noPI"
    assert rows["longlora-noshift"].attention == "s2_attn_noshift"
    assert rows["native"].train_length == "native" and not rows["native"].extend_context
    assert rows["full-ft"].full_finetune
    # the same trainables and the same target modules (q, k, v, o) and dropout (0) everywhere
    targets = {"q_proj", "k_proj", "v_proj", "o_proj"}
    for row in config.runs:
        if not row.has_adapter:
            continue
        spec = load_adapter_spec(row.adapter, config.adapter_overrides(row), config.spec_dir)
        assert set(spec.target_modules) >= targets, row.name
        assert spec.dropout == 0.0, row.name
        if row.adapter != "lora":
            assert row.trainable == ["embed", "norm"], row.name
    assert config.match_params and config.match_params_tolerance in (None, 0.1)
    if config.families is not None:  # (the quickstart: one family of every contrast)
        families = {r for members in config.families.values() for r in members}
        assert families == {r.name for r in config.runs if r.comparator}


def test_the_pilot_studys_config_is_the_one_its_records_were_made_with():
    """docs/results/study-pilot/study.yaml reruns the published records' experiment: the
    same config as results.json records, but for where it writes and where specs are read."""
    import json
    from pathlib import Path

    from loravariants.compare.records import config_dict
    from loravariants.config import load_experiment

    folder = Path(__file__).resolve().parents[1] / "docs" / "results" / "study-pilot"
    ours = config_dict(load_experiment(folder / "study.yaml"))
    recorded = json.loads((folder / "results.json").read_text())["config"]
    assert set(ours) == set(recorded)
    differs = {key for key in ours if ours[key] != recorded[key]}
    assert differs == {"output_dir", "spec_dir"}
