"""Hostile experiment configs, output folders and records (issue 27): a foreign folder is never
written, temporary files are never followed, a malformed records store is one clear error, and
every value a machine cannot hold is refused before the base, the data or any folder exists.

Each case goes through the CLI where a user would meet it: one line on stderr, exit 2, nothing
created, and the environment (base model and data) never loaded.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

import loravariants.compare.run as compare_run
from loravariants import utils
from loravariants.checkpoint import truncate_metrics
from loravariants.cli import main
from loravariants.config import load_experiment

# the marker compare writes into a folder it creates (utils.OUTPUT_MARKER), spelled out so
# these tests also run against code that predates it
MARKER = ".loravariants-output"


def _never_load(config, progress):
    raise AssertionError("the base model and data were loaded before the config was refused")


@pytest.fixture
def experiment(tmp_path, monkeypatch):
    """An experiment file writing to tmp_path/out; loading its environment fails the test."""
    monkeypatch.setattr(compare_run, "load_environment", _never_load)
    file = tmp_path / "exp.yaml"
    file.write_text(
        f"output_dir: {tmp_path / 'out'}\n"
        "context: {target_length: 64}\n"
        "train: {max_steps: 1, batch_size: 2, warmup_steps: 0, lr: 0.01}\n"
        "eval: {max_tokens: 128, lengths: [32]}\n"
        "runs: [{name: lora, adapter: lora, overrides: {r: 2}}]\n"
    )
    return file


def _refused(argv, capsys, *names) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    for name in names:
        assert name in err, err
    return err


def _tiny_compare(tmp_path, monkeypatch, capsys):
    from test_compare import _tiny_env

    monkeypatch.setattr(compare_run, "load_environment", lambda config, progress: _tiny_env())
    status = main(["compare", "--config", str(tmp_path / "exp.yaml"), "--quiet"])
    capsys.readouterr()
    return status


# ---------------------------------------------------------------------------------------------
# 1: a foreign folder is never written
# ---------------------------------------------------------------------------------------------


def test_compare_refuses_a_folder_of_someone_elses(experiment, tmp_path, capsys):
    out = tmp_path / "out"
    (out / "plots").mkdir(parents=True)
    (out / "report.md").write_text("my notes")
    (out / "plots" / "loss_curves.png").write_bytes(b"my plot")
    _refused(["compare", "--config", str(experiment), "--quiet"], capsys, str(out), "marker")
    assert (out / "report.md").read_text() == "my notes"
    assert (out / "plots" / "loss_curves.png").read_bytes() == b"my plot"
    assert sorted(p.name for p in out.iterdir()) == ["plots", "report.md"]


@pytest.mark.parametrize("where", ["/", ".", "..", "'~'", "~/.."])
def test_output_dir_root_cwd_home_and_their_parents_are_refused(experiment, capsys, where):
    before = sorted(os.listdir("."))
    _refused(
        ["compare", "--config", str(experiment), "--quiet", f"output_dir={where}"],
        capsys,
        "output_dir",
        "name a new folder",
    )
    assert sorted(os.listdir(".")) == before


def test_a_foreign_results_json_without_runs_is_refused_not_overwritten(
    experiment, tmp_path, capsys
):
    out = tmp_path / "out"
    out.mkdir()
    (out / MARKER).write_text("")
    (out / "results.json").write_text('{"mine": 1}')
    _refused(["compare", "--config", str(experiment), "--quiet"], capsys, "results.json", "runs")
    assert (out / "results.json").read_text() == '{"mine": 1}'


def test_compare_marks_the_folder_it_creates_and_adopts_an_empty_one(
    experiment, tmp_path, monkeypatch, capsys
):
    out = tmp_path / "out"
    out.mkdir()  # empty: adopted
    assert _tiny_compare(tmp_path, monkeypatch, capsys) == 0
    assert (out / utils.OUTPUT_MARKER).is_file() and utils.OUTPUT_MARKER == MARKER
    assert _tiny_compare(tmp_path, monkeypatch, capsys) == 0  # ours now: resumed
    assert not any(".tmp" in p.name for p in out.rglob("*"))


def test_train_refuses_a_folder_of_someone_elses_and_keeps_its_checkpoints(tmp_path):
    """The same class in the training loop: a fresh run deletes ``checkpoints/``."""
    from _train_script import random_blocks
    from test_faults import _model

    from loravariants.train import TrainConfig, train

    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "my_model.pt").write_bytes(b"weeks of work")
    (tmp_path / "notes.txt").write_text("mine")
    config = TrainConfig(max_steps=1, batch_size=2, warmup_steps=0)
    with pytest.raises(ValueError, match="did not write"):
        train(_model(), random_blocks(n=4), config, output_dir=tmp_path, resume=False)
    assert (tmp_path / "checkpoints" / "my_model.pt").read_bytes() == b"weeks of work"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoints", "notes.txt"]


# ---------------------------------------------------------------------------------------------
# 2: temporary files are never followed
# ---------------------------------------------------------------------------------------------


def test_links_planted_at_the_old_temporary_names_are_not_followed(
    experiment, tmp_path, monkeypatch, capsys
):
    out = tmp_path / "out"
    out.mkdir()
    (out / MARKER).write_text("")
    victims = {}
    for name in ("results.json.tmp", "report.md.tmp", "results.csv.tmp"):
        victim = tmp_path / f"victim-{name}"
        victim.write_text("precious")
        (out / name).symlink_to(victim)
        victims[name] = victim
    assert _tiny_compare(tmp_path, monkeypatch, capsys) == 0
    for victim in victims.values():
        assert victim.read_text() == "precious"
    assert json.loads((out / "results.json").read_text())["runs"][0]["status"] == "ok"


def test_truncating_metrics_does_not_follow_a_planted_link(tmp_path):
    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text('{"step": 1}\n{"step": 2}\n')
    victim = tmp_path / "victim"
    victim.write_text("precious")
    (tmp_path / "metrics.jsonl.tmp").symlink_to(victim)
    truncate_metrics(metrics, 1)
    assert victim.read_text() == "precious"
    assert metrics.read_text() == '{"step": 1}\n'


def test_atomic_write_replaces_a_link_at_the_target_instead_of_its_file(tmp_path):
    victim = tmp_path / "victim"
    victim.write_text("precious")
    (tmp_path / "report.md").symlink_to(victim)
    utils.atomic_write(tmp_path / "report.md", "new")
    assert victim.read_text() == "precious"
    assert not (tmp_path / "report.md").is_symlink()
    assert (tmp_path / "report.md").read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report.md", "victim"]
    mode = (tmp_path / "report.md").stat().st_mode & 0o777
    assert mode == 0o666 & ~utils._umask()  # not mkstemp's 0600


# ---------------------------------------------------------------------------------------------
# 10, 14: YAML nested too deeply, keys given twice
# ---------------------------------------------------------------------------------------------


def test_deeply_nested_yaml_is_one_line_naming_the_file(experiment, tmp_path, capsys):
    deep = tmp_path / "deep.yaml"
    deep.write_text(f"output_dir: {tmp_path / 'out'}\nruns: " + "[" * 5000 + "]" * 5000 + "\n")
    _refused(["compare", "--config", str(deep), "--quiet"], capsys, str(deep), "nested")
    assert not (tmp_path / "out").exists()


def test_deeply_nested_override_is_one_line_naming_it(experiment, tmp_path, capsys):
    deep = "data.text_field=" + "[" * 5000 + "]" * 5000
    _refused(["compare", "--config", str(experiment), "--quiet", deep], capsys, "override")
    assert not (tmp_path / "out").exists()


def test_a_key_given_twice_is_refused(experiment, tmp_path, capsys):
    twice = tmp_path / "twice.yaml"
    twice.write_text(experiment.read_text() + "train: {max_steps: 1000}\n")
    _refused(["compare", "--config", str(twice), "--quiet"], capsys, str(twice), "'train'", "twice")
    _refused(
        ["compare", "--config", str(experiment), "--quiet", "train={lr: 0.1, lr: 0.2}"],
        capsys,
        "'lr'",
        "twice",
    )
    # a merge key may still be overridden, as YAML intends
    merged = tmp_path / "merged.yaml"
    merged.write_text(
        f"output_dir: {tmp_path / 'out'}\n"
        "base: &base {max_steps: 1, batch_size: 2}\n"
        "train: {<<: *base, max_steps: 2}\n"
        "runs: [{name: lora, adapter: lora}]\n"
    )
    data = utils_yaml(merged)
    assert data["train"] == {"max_steps": 2, "batch_size": 2}


def utils_yaml(path: Path):
    from loravariants.config import read_yaml

    return read_yaml(path)


def test_a_config_file_of_random_bytes_names_the_file(experiment, tmp_path, capsys):
    noise = tmp_path / "noise.yaml"
    noise.write_bytes(bytes(range(128, 256)) * 8)
    _refused(["compare", "--config", str(noise), "--quiet"], capsys, str(noise))


# ---------------------------------------------------------------------------------------------
# 12: a records store of the wrong shape
# ---------------------------------------------------------------------------------------------

_RECORD = {"key": "lora/seed0", "row": "lora", "seed": 0, "status": "ok"}
BAD_RESULTS = {
    "a list": b"[]",
    "runs a number": b'{"runs": 5}',
    "an empty record": b'{"runs": [{}]}',
    "final_loss a string": json.dumps({"runs": [{**_RECORD, "final_loss": "oops"}]}).encode(),
    "ppl a string": json.dumps({"runs": [{**_RECORD, "ppl": {"32": "x"}}]}).encode(),
    "a wrong key": json.dumps({"runs": [{**_RECORD, "key": "other/seed3"}]}).encode(),
    "random bytes": bytes(range(256)) * 4,
    "nested deeply": b'{"runs": ' + b"[" * 100_000 + b"]" * 100_000 + b"}",
}


@pytest.mark.parametrize("content", BAD_RESULTS.values(), ids=BAD_RESULTS.keys())
def test_a_malformed_results_json_is_one_line_naming_the_file(
    experiment, tmp_path, capsys, content
):
    out = tmp_path / "out"
    out.mkdir()
    (out / MARKER).write_text("")
    (out / "results.json").write_bytes(content)
    _refused(["compare", "--config", str(experiment), "--quiet"], capsys, str(out / "results.json"))
    assert (out / "results.json").read_bytes() == content


def test_a_malformed_shard_file_is_one_line_naming_it(experiment, tmp_path, capsys):
    out = tmp_path / "out"
    (out / "shards").mkdir(parents=True)
    (out / MARKER).write_text("")
    bad = out / "shards" / "shard-0-of-2.json"
    bad.write_text(json.dumps({"runs": [{**_RECORD, "final_loss": "oops"}]}))
    _refused(["compare", "--config", str(experiment), "--merge"], capsys, str(bad), "final_loss")


# ---------------------------------------------------------------------------------------------
# 15, 16: values refused at config time, nothing created
# ---------------------------------------------------------------------------------------------

TOO_MUCH = [
    # (override, what the message names)
    ("eval.lengths=[256]", "eval.max_tokens"),
    ("seeds=[200000000000000]", "seeds"),
    ("train.seed=18446744073709551616", "seed"),
    ("context.target_length=1000000000", "context.target_length"),
    ("train.batch_size=10000000", "train.batch_size"),
    ("base_model_config={hidden_size: 1000000}", "base_model_config"),
    ("runs=[{name: x, adapter: lora, overrides: {target_modules: [nothing]}}]", "target_modules"),
    ("match_params=10", "match_params"),
]


@pytest.mark.parametrize("override, names", TOO_MUCH, ids=[c[0][:40] for c in TOO_MUCH])
def test_what_cannot_run_is_refused_before_any_work(experiment, tmp_path, capsys, override, names):
    _refused(["compare", "--config", str(experiment), "--quiet", override], capsys, names)
    assert not (tmp_path / "out").exists()


def test_a_seed_beyond_any_generator_is_refused_by_train(experiment, tmp_path, capsys):
    argv = ["train", "--config", str(experiment), "--seed", str(2**64), "--quiet"]
    _refused(argv, capsys, "seeds")
    assert not (tmp_path / "out").exists()


def test_output_dir_tilde_is_the_home_folder(experiment, tmp_path, monkeypatch):
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    config = load_experiment(experiment, ["output_dir=~/exp"])
    assert config.output_dir == str(home / "exp")
    assert not Path("~").exists()


# ---------------------------------------------------------------------------------------------
# 18: every error the CLI prints is bounded and escaped
# ---------------------------------------------------------------------------------------------


def test_cli_errors_are_bounded_and_escaped(tmp_path, capsys):
    ansi = tmp_path / "\x1b[2J\x1b[Hall good\x00"
    for argv in (["compare", "--config", str(ansi)], ["analyze", str(ansi)]):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert "\x1b" not in err and "\x00" not in err and "\\x1b" in err, err
        assert len(err.splitlines()) == 1
    huge = tmp_path / ("x" * 12_000_000)
    assert main(["analyze", str(huge)]) == 2
    err = capsys.readouterr().err
    assert len(err) < 700 and len(err.splitlines()) == 1
