"""Issue 17: ``compare --shard i/N`` and ``--merge``: a grid over a job array gives the
results.json of one process; concurrent writers never lose a record; bad specs exit 2."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from test_compare import _tiny_env

from loravariants.cli import main
from loravariants.compare import compare
from loravariants.compare.shard import Shard, merge_shards, parse_shard, shard_file, shard_lock
from loravariants.config import experiment_from_dict
from loravariants.utils import OutputLocked

HERE = Path(__file__).parent

# measured, not computed: differ between any two runs of the same grid
TIMING = ("elapsed_s", "cpu_s", "wall_s", "tokens_per_s", "peak_mem")


def grid(out: Path, **extra) -> dict:
    """Four runs: LoRA and MixLoRA x 2 seeds (each run costs ~2 s of a shared CPU core)."""
    return {
        "output_dir": str(out),
        "context": {"target_length": 64},
        "train": {"max_steps": 2, "batch_size": 2, "warmup_steps": 0, "lr": 0.01},
        "eval": {"max_tokens": 128, "lengths": [32]},
        "seeds": [0, 1],
        "runs": [
            {"name": "lora", "adapter": "lora", "overrides": {"r": 2, "dropout": 0.0}},
            {
                "name": "mix",
                "adapter": "mixlora",
                "overrides": {"num_experts": 2, "top_k": 1, "r": 2, "dropout": 0.0},
            },
        ],
        **extra,
    }


def run_shard(out: Path, spec: str | None, merge: bool = False, **extra) -> Path:
    """One shard (``spec``), the whole grid in one process (None), or the merge."""
    config = experiment_from_dict(grid(out, **extra))
    if merge:
        return merge_shards(config)
    shard = parse_shard(spec) if spec else None
    return compare(config, progress=False, log=lambda s: None, env=_tiny_env(), shard=shard)


def _figures(value, path=""):
    """Every number of a results.json, flattened ``{path: value}``, timings left out."""
    if isinstance(value, dict):
        items = value.items()
    elif isinstance(value, list):
        items = enumerate(value)
    else:
        return {path: value}
    flat = {}
    for k, v in items:
        if isinstance(k, str) and k.startswith(TIMING):
            continue
        flat.update(_figures(v, f"{path}.{k}"))
    return flat


def _same(a, b) -> bool:
    if isinstance(a, float) and isinstance(b, float):
        return (math.isnan(a) and math.isnan(b)) or math.isclose(a, b, rel_tol=1e-6, abs_tol=1e-9)
    return a == b


@pytest.mark.parametrize("spec, index, count", [("0/1", 0, 1), ("2/3", 2, 3), (" 1 / 4 ", 1, 4)])
def test_parse_shard(spec, index, count):
    assert parse_shard(spec) == Shard(index, count)


@pytest.mark.parametrize("spec", ["3/2", "2/2", "0/0", "a/b", "1", "-1/2", "1/2/3", ""])
def test_bad_shard_spec_is_one_line_exit_2_before_any_work(spec, tmp_path, capsys):
    config = tmp_path / "grid.yaml"
    config.write_text(yaml.safe_dump(grid(tmp_path / "out")))
    assert main(["compare", "--config", str(config), f"--shard={spec}", "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert (
        err.startswith("loravariants compare: error: --shard")
        and repr(spec) in err
        or (f"--shard {spec}:" in err)
    )
    assert not (tmp_path / "out").exists()


def test_three_shards_give_the_results_of_one_process(tmp_path):
    one = json.loads((run_shard(tmp_path / "one", None) / "results.json").read_text())
    out = tmp_path / "sharded"
    # shard 2 runs mix/seed0 before shard 0 has trained its LoRA reference (lora/seed0): its
    # similarity to LoRA is filled in at the merge
    for spec in ("2/3", "1/3", "0/3"):
        run_shard(out, spec)
        assert not (out / "results.json").exists()  # shards write their own files only
    for i in range(3):
        assert shard_file(out, Shard(i, 3)).is_file()
    merged = json.loads((run_shard(out, None, merge=True) / "results.json").read_text())
    assert (out / "report.md").is_file()
    ours = {r["key"]: r for r in merged["runs"]}
    theirs = {r["key"]: r for r in one["runs"]}
    assert ours.keys() == theirs.keys() and len(ours) == 4
    assert merged["base_model"] == one["base_model"] == "tiny"
    assert "similarity_to_lora" in ours["mix/seed0"]["svd"]
    a, b = _figures(ours), _figures(theirs)
    assert a.keys() == b.keys()
    assert [k for k in a if not _same(a[k], b[k])] == []
    a, b = _figures(merged["summary"]), _figures(one["summary"])
    assert a.keys() == b.keys()
    assert [k for k in a if not _same(a[k], b[k])] == []


def test_a_rerun_shard_runs_only_what_it_has_not_finished(tmp_path, capsys):
    out = tmp_path / "out"
    run_shard(out, "0/3")  # lora/seed0 and mix/seed1
    file = shard_file(out, Shard(0, 3))
    data = json.loads(file.read_text())
    # a shard killed after its first run: its file holds that run only
    data["runs"] = [r for r in data["runs"] if r["key"] == "lora/seed0"]
    file.write_text(json.dumps(data))
    logs: list[str] = []
    config = experiment_from_dict(grid(out))
    compare(config, progress=False, log=logs.append, env=_tiny_env(), shard=Shard(0, 3))
    assert any("lora/seed0: done earlier, kept" in line for line in logs)
    assert sum("running" in line for line in logs) == 1
    assert {r["key"] for r in json.loads(file.read_text())["runs"]} == {"lora/seed0", "mix/seed1"}
    from loravariants.compare.shard import shard_summary

    assert shard_summary(out, config, Shard(0, 3)) == 0
    assert "shard 0/3: 2 of 2 runs ok" in capsys.readouterr().out


def test_merge_refuses_a_shard_of_a_different_experiment(tmp_path):
    out = tmp_path / "out"
    run_shard(out, "1/3")
    other = json.loads(shard_file(out, Shard(1, 3)).read_text())
    other["config"]["train"]["lr"] = 0.5
    shard_file(out, Shard(0, 3)).write_text(json.dumps(other))
    with pytest.raises(ValueError, match=r"shard-0-of-3.json: .* different experiment.*lr"):
        run_shard(out, None, merge=True)
    with pytest.raises(ValueError, match="different experiment"):
        run_shard(out, "2/3")  # a shard reads the others too: refused before its runs


def test_shards_run_together_but_not_beside_a_whole_compare(tmp_path):
    from loravariants.utils import claim_output_dir

    out = claim_output_dir(tmp_path / "out")  # as the shard holding it made it
    with shard_lock(out, Shard(0, 2)):
        run_shard(out, "1/2")  # another shard: runs
        with pytest.raises(OutputLocked, match="shard 0/2 .* already running"):
            run_shard(out, "0/2")
        with pytest.raises(OutputLocked, match="in use by another loravariants process"):
            run_shard(out, None)  # a whole compare
        with pytest.raises(OutputLocked, match="in use by another loravariants process"):
            run_shard(out, None, merge=True)
    config = experiment_from_dict(grid(out))
    from loravariants.utils import output_lock

    with output_lock(out):  # a whole compare (or a merge) holds the folder
        with pytest.raises(OutputLocked, match="without --shard"):
            compare(config, progress=False, log=lambda s: None, env=_tiny_env(), shard=Shard(0, 2))


def test_shard_refuses_a_concurrent_grid(tmp_path):
    with pytest.raises(ValueError, match="--shard cannot split a concurrent"):
        run_shard(tmp_path / "out", "0/2", concurrent=True)
    assert not (tmp_path / "out").exists()


def test_merge_with_a_shard_missing_names_the_runs_and_exits_1(tmp_path, capsys):
    out = tmp_path / "out"
    run_shard(out, "1/3")  # lora/seed1
    from loravariants.compare.shard import merge_summary

    run_shard(out, None, merge=True)
    config = experiment_from_dict(grid(out))
    assert merge_summary(out, config, 0) == 1
    assert "3 run(s) have no record yet (lora/seed0, mix/seed0, mix/seed1)" in (
        capsys.readouterr().out
    )


@pytest.mark.slow
def test_three_concurrent_shard_processes_lose_no_record(tmp_path):
    """Three real processes on one folder at once (a job array on one file system)."""
    out = tmp_path / "out"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(HERE.parent)}
    procs = [
        subprocess.Popen(
            [sys.executable, str(HERE / "_train_script.py"), "shard", str(out), f"{i}/3"],
            env=env,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(3)
    ]
    for p in procs:
        assert p.wait(timeout=600) == 0, p.stderr.read()[-3000:]
    merged = json.loads((run_shard(out, None, merge=True) / "results.json").read_text())
    assert sorted(r["key"] for r in merged["runs"]) == sorted(
        ["lora/seed0", "lora/seed1", "mix/seed0", "mix/seed1"]
    )
    assert all(r["status"] == "ok" for r in merged["runs"])


def test_compare_under_a_multi_process_launch_is_refused(tmp_path, monkeypatch):
    """Every process would run the whole grid; the shards are the way to spread it."""
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ValueError, match="runs in one process.*--shard i/N"):
        run_shard(tmp_path / "out", None)
    assert not (tmp_path / "out").exists()


def test_merge_with_nothing_to_merge_is_one_line_exit_2(tmp_path, capsys):
    config = tmp_path / "grid.yaml"
    config.write_text(yaml.safe_dump(grid(tmp_path / "out")))
    assert main(["compare", "--config", str(config), "--merge"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "nothing to merge" in err
    assert not (tmp_path / "out").exists()
    with pytest.raises(SystemExit) as info:  # argparse's own exit
        main(["compare", "--config", str(config), "--merge", "--shard", "0/2"])
    assert info.value.code == 2
    assert "not allowed with argument" in capsys.readouterr().err


@pytest.mark.slow
def test_similarity_to_lora_uses_the_plans_first_lora_row_not_the_shards(tmp_path):
    """Shard 1/2 holds the second LoRA row and MixLoRA, not the first LoRA row: MixLoRA's
    similarity must still be to the first LoRA row of its seed, as in one process."""
    runs = [
        {"name": "lora_a", "adapter": "lora", "overrides": {"r": 2, "dropout": 0.0}},
        {"name": "lora_b", "adapter": "lora", "overrides": {"r": 2, "dropout": 0.0, "alpha": 4}},
        {"name": "none", "adapter": "none"},
        {"name": "mix", "adapter": "mixlora", "overrides": {"num_experts": 2, "r": 2}},
    ]
    config = experiment_from_dict({**grid(tmp_path / "one"), "seeds": [0], "runs": runs})
    compare(config, progress=False, log=lambda s: None, env=_tiny_env())
    one = json.loads((tmp_path / "one" / "results.json").read_text())
    sharded = experiment_from_dict({**grid(tmp_path / "two"), "seeds": [0], "runs": runs})
    for i in (1, 0):
        compare(sharded, progress=False, log=lambda s: None, env=_tiny_env(), shard=Shard(i, 2))
    merged = json.loads((merge_shards(sharded) / "results.json").read_text())
    mix = [next(r for r in d["runs"] if r["key"] == "mix/seed0") for d in (one, merged)]
    assert math.isclose(
        mix[0]["svd"]["similarity_to_lora"], mix[1]["svd"]["similarity_to_lora"], rel_tol=1e-6
    )
