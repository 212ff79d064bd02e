"""``compare --workers N`` / ``quickstart`` (auto): the grid in N local shard processes."""

from __future__ import annotations

import io
import json
import subprocess

import pytest
import yaml

from loravariants.cli import QUICK_OVERRIDES, main
from loravariants.compare import workers as workers_mod
from loravariants.compare.workers import default_workers, parse_workers, run_workers
from loravariants.config import CONFIG_DIR, experiment_from_dict, load_experiment
from loravariants.utils import output_lock


def _config(tmp_path, **extra):
    data = {
        "output_dir": str(tmp_path / "out"),
        "seeds": [0, 1],
        "runs": [{"name": "base", "adapter": "none"}, {"name": "lora", "adapter": "lora"}],
        **extra,
    }
    return experiment_from_dict(data)


@pytest.mark.parametrize("text, value", [("auto", "auto"), ("1", 1), ("3", 3)])
def test_parse_workers_accepts_auto_and_whole_numbers(text, value):
    assert parse_workers(text) == value


@pytest.mark.parametrize("text", ["0", "-2", "two", "1.5", ""])
def test_parse_workers_refuses_anything_else(text):
    with pytest.raises(ValueError, match="--workers must be a whole number >= 1 or auto"):
        parse_workers(text)


def test_default_workers_one_per_core_capped_by_runs_and_limit(tmp_path):
    config = _config(tmp_path)  # 2 rows x 2 seeds = 4 runs
    assert default_workers(config, cores=2, cuda=False) == 2
    assert default_workers(config, cores=1, cuda=False) == 1
    assert default_workers(config, cores=64, cuda=False) == 4  # the runs (and the cap)
    assert default_workers(_config(tmp_path, seeds=[0]), cores=64, cuda=False) == 2
    big = _config(tmp_path, seeds=list(range(10)))
    assert default_workers(big, cores=64, cuda=False) == workers_mod.MAX_AUTO_WORKERS
    assert default_workers(config, cores=8, cuda=True) == 1  # one device
    assert default_workers(_config(tmp_path, concurrent=True), cores=8, cuda=False) == 1


class _FakeProc:
    """A worker that prints ``lines`` and exits with ``code`` (records nothing)."""

    def __init__(self, lines: list[str], code: int):
        self.stdout = io.StringIO("".join(f"{line}\n" for line in lines))
        self.returncode = None
        self._code = code

    def wait(self):
        self.returncode = self._code
        return self._code

    def terminate(self):
        pass


def _fake_popen(monkeypatch, outcomes):
    """Replace subprocess.Popen: worker i prints outcomes[i][0] and exits outcomes[i][1]."""
    calls: list[dict] = []

    def popen(cmd, **kwargs):
        calls.append({"cmd": cmd, "env": kwargs["env"]})
        lines, code = outcomes[len(calls) - 1]
        return _FakeProc(lines, code)

    monkeypatch.setattr(subprocess, "Popen", popen)
    return calls


def test_run_workers_splits_threads_names_shards_and_merges(tmp_path, monkeypatch):
    config = _config(tmp_path)
    calls = _fake_popen(monkeypatch, [(["[1/2] base/seed0: ok"], 0), (["[1/2] x: failed"], 1)])
    merged = []
    monkeypatch.setattr("loravariants.compare.shard.merge_shards", lambda c: merged.append(c))
    logs: list[str] = []
    run_workers(config, "exp.yaml", ["seeds=[0,1]"], 2, progress=False, log=logs.append, cores=6)
    assert [c["cmd"][-4:] for c in calls] == [
        ["--shard", "0/2", "--quiet", "seeds=[0,1]"],
        ["--shard", "1/2", "--quiet", "seeds=[0,1]"],
    ]
    assert all(c["cmd"][1:4] == ["-m", "loravariants", "compare"] for c in calls)
    assert {c["env"]["OMP_NUM_THREADS"] for c in calls} == {"3"}  # 6 cores / 2 workers
    # every worker's lines, each named; a worker whose run failed (exit 1) still merges
    assert sorted(logs) == ["[worker 0] [1/2] base/seed0: ok", "[worker 1] [1/2] x: failed"]
    assert merged == [config]


def test_run_workers_reports_a_stopped_worker_in_one_line_and_merges_nothing(tmp_path, monkeypatch):
    config = _config(tmp_path)
    error = "loravariants compare: error: the folder is in use by another compare"
    _fake_popen(monkeypatch, [(["loading"], 0), (["loading", error], 2)])
    monkeypatch.setattr(
        "loravariants.compare.shard.merge_shards", lambda c: pytest.fail("merged after an error")
    )
    with pytest.raises(ValueError, match=r"^worker 1 of 2 stopped: the folder is in use by"):
        run_workers(config, "exp.yaml", [], 2, progress=False, log=lambda line: None, cores=2)


def test_run_workers_refuses_a_concurrent_comparison(tmp_path, monkeypatch):
    _fake_popen(monkeypatch, [])
    with pytest.raises(ValueError, match="concurrent"):
        run_workers(_config(tmp_path, concurrent=True), "x.yaml", [], 2, progress=False)


def test_workers_with_shard_or_merge_is_one_line_exit_2(tmp_path, capsys):
    config = tmp_path / "exp.yaml"
    config.write_text(yaml.safe_dump({"runs": [{"name": "base", "adapter": "none"}]}))
    for extra in (["--shard", "0/2"], ["--merge"]):
        assert main(["compare", "--config", str(config), "--workers", "2", *extra]) == 2
        err = capsys.readouterr().err
        assert "drop --shard/--merge" in err and len(err.strip().splitlines()) == 1
    assert main(["compare", "--config", str(config), "--workers", "many"]) == 2
    assert "--workers must be a whole number" in capsys.readouterr().err


@pytest.fixture(scope="module")
def tiny_cache(tmp_path_factory):
    """One cache (one tiny base build) for this module's real-worker tests."""
    return tmp_path_factory.mktemp("cache")


def _tiny_grid(tmp_path, name: str) -> list[str]:
    """quickstart's tiny preset on two rows x two seeds, into ``tmp_path/name``."""
    return [
        *QUICK_OVERRIDES,
        "seeds=[0,1]",
        "runs=[{name: base-PI, adapter: none}, {name: lora, adapter: lora, "
        "overrides: {alpha: 30}, trainable: [embed, norm]}]",
        f"output_dir={tmp_path / name}",
    ]


def test_two_workers_give_the_records_of_one_process(tmp_path, monkeypatch, capsys, tiny_cache):
    """The real thing: two shard processes, merged, against one process on the same grid."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tiny_cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    config = str(CONFIG_DIR / "quickstart.yaml")
    one, two = _tiny_grid(tmp_path, "one"), _tiny_grid(tmp_path, "two")
    assert main(["compare", "--config", config, "--quiet", *one]) == 0
    assert main(["compare", "--config", config, "--quiet", "--workers", "2", *two]) == 0
    printed = capsys.readouterr().out
    assert "[worker 0]" in printed and "[worker 1]" in printed and "report:" in printed
    runs = {}
    for name in ("one", "two"):
        data = json.loads((tmp_path / name / "results.json").read_text())
        runs[name] = {r["key"]: r for r in data["runs"]}
    assert (
        set(runs["one"])
        == set(runs["two"])
        == {
            "base-PI/seed0",
            "base-PI/seed1",
            "lora/seed0",
            "lora/seed1",
        }
    )
    assert (tmp_path / "two" / "shards" / "shard-1-of-2.json").is_file()
    for key, record in runs["one"].items():
        other = runs["two"][key]
        assert other["status"] == record["status"] == "ok"
        # the same training and data; only the number of torch threads differs (1 against
        # this machine's), so sums may round differently
        for length, ppl in record["ppl"].items():
            assert other["ppl"][length] == pytest.approx(ppl, rel=1e-3), (key, length)
    # a rerun resumes: nothing is trained again
    assert main(["compare", "--config", config, "--quiet", "--workers", "2", *two]) == 0
    assert capsys.readouterr().out.count("done earlier, kept") == 4


def test_a_locked_output_folder_stops_the_workers_in_one_line(
    tmp_path, monkeypatch, capsys, tiny_cache
):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tiny_cache))
    overrides = _tiny_grid(tmp_path, "busy")
    load_experiment(CONFIG_DIR / "quickstart.yaml", overrides)  # valid
    (tmp_path / "busy").mkdir()
    with output_lock(tmp_path / "busy"):  # another compare holds the folder
        status = main(
            ["compare", "--config", str(CONFIG_DIR / "quickstart.yaml"), "--quiet"]
            + ["--workers", "2", *overrides]
        )
    assert status == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "stopped:" in err[0] and "in use" in err[0]
