"""Experiment YAML: validation with named fields, overrides, spec lookup."""

from __future__ import annotations

import pytest

from loravariants.adapters import LoRAConfig
from loravariants.cli import main
from loravariants.config import (
    CONFIG_DIR,
    apply_overrides,
    experiment_from_dict,
    load_adapter_spec,
    load_experiment,
)


def test_builtin_quickstart_config_is_valid():
    config = load_experiment(CONFIG_DIR / "quickstart.yaml")
    assert config.context.target_length == 1024
    assert {r.name for r in config.runs} >= {"lora", "cola", "multilora", "mixlora", "longlora"}
    for row in config.runs:
        if row.has_adapter:
            load_adapter_spec(row.adapter, row.overrides, config.spec_dir)


def test_overrides_parse_yaml_values():
    data = apply_overrides({"train": {"lr": 1.0}}, ["train.lr=0.5", "seeds=[1, 2]", "a.b.c=x"])
    assert data == {"train": {"lr": 0.5}, "seeds": [1, 2], "a": {"b": {"c": "x"}}}
    with pytest.raises(ValueError, match="key.sub=value"):
        apply_overrides({}, ["train.lr"])


@pytest.mark.parametrize(
    "data, message",
    [
        ({"runs": []}, "runs must list"),
        ({"runs": [{"name": "a"}], "train": {"lr": -1}}, "train.lr"),
        ({"runs": [{"name": "a"}], "trian": {}}, r"unknown key\(s\) \['trian'\]"),
        ({"runs": [{"name": "a"}, {"name": "a"}]}, "unique"),
        ({"runs": [{"name": "a", "trainable": ["lm_head"]}]}, "trainable"),
        ({"runs": [{"name": "a"}], "context": {"attention": "flash"}}, "context.attention"),
        ({"runs": [{"name": "a"}], "eval": {"stride_ratio": 1}}, "eval.stride_ratio"),
    ],
)
def test_invalid_experiments_name_the_key(data, message):
    with pytest.raises(ValueError, match=message):
        experiment_from_dict(data)


def test_adapter_spec_with_overrides(tmp_path):
    spec = load_adapter_spec("lora", {"r": 4})
    assert isinstance(spec, LoRAConfig) and spec.r == 4 and spec.alpha == 16
    with pytest.raises(FileNotFoundError, match="built-in specs"):
        load_adapter_spec("nonesuch")
    bad = tmp_path / "bad.yaml"
    bad.write_text("variant: lora\nr: 0\n")
    with pytest.raises(ValueError, match="bad.yaml.*r must be"):
        load_adapter_spec(str(bad))


def test_cli_reports_config_errors_in_one_line(tmp_path, capsys):
    cfg = tmp_path / "x.yaml"
    cfg.write_text("runs: [{name: a}]\ntrain: {max_steps: 0}\n")
    assert main(["compare", "--config", str(cfg)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "train.max_steps" in err[0]
    assert main(["compare", "--config", str(tmp_path / "missing.yaml")]) == 2
    assert "no such config file" in capsys.readouterr().err
