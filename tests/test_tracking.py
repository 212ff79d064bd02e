"""Trackers in the training loop (train.report_to), read back from what they wrote: TensorBoard's
event files and a local MLflow store; validation during training (train.eval_every); the
gradient norm; refusals before any training."""

from __future__ import annotations

import copy
import importlib.util
import json

import pytest
import torch
from _train_script import random_blocks
from conftest import make_tiny_llama

import loravariants as lv
from loravariants.adapters import COLAConfig, LoRAConfig, MixLoRAConfig
from loravariants.evaluate import perplexity
from loravariants.train import TrainConfig, collate, global_rows, train

VAL = torch.randint(0, 128, (96,), generator=torch.Generator().manual_seed(7))


def _config(**fields) -> TrainConfig:
    return TrainConfig(**{"max_steps": 4, "batch_size": 2, "warmup_steps": 0, "lr": 1e-2, **fields})


def _lines(out) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def _scalars(folder) -> dict[str, list[tuple[int, float]]]:
    """Every scalar series of a TensorBoard run folder, read with TensorBoard's own reader."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(folder))
    events.Reload()
    return {
        tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]
    }


def test_tensorboard_and_mlflow_get_every_metric_line(tmp_path, monkeypatch):
    """COLA (its chain advances at step 2) into TensorBoard and a local MLflow store at once,
    with a validation perplexity every 2 steps."""
    pytest.importorskip("mlflow")  # .[dev] installs mlflow-skinny
    monkeypatch.setenv("MLFLOW_TRACKING_URI", (tmp_path / "mlruns").as_uri())
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # the plain local store, no database
    model = lv.attach(make_tiny_llama(), COLAConfig(r=2, knots=[2]))
    config = _config(report_to=["tensorboard", "mlflow"], eval_every=2)
    out = tmp_path / "run"
    result = train(model, random_blocks(16, 16), config, out, progress=False, eval_data=VAL)
    lines = _lines(out)
    assert [x["loss"] for x in lines] == result.losses
    assert [x["step"] for x in lines if "val_ppl" in x] == [2, 4]
    # the last validation is the model as training left it (eval mode: full attention)
    assert lines[-1]["val_ppl"] == pytest.approx(perplexity(model, VAL, 16, 8, batch_size=2))

    tb = _scalars(out / "tensorboard" / "loravariants")
    assert [v for _, v in tb["train/loss"]] == pytest.approx(result.losses)
    for key, tag in [("grad_norm", "train/grad_norm"), ("lr", "train/lr")]:
        assert [v for _, v in tb[tag]] == pytest.approx([x[key] for x in lines])
    assert [v for _, v in tb["train/tokens_per_s"]] == pytest.approx(
        [x["tokens_per_s"] for x in lines], rel=1e-6
    )
    assert [s for s, _ in tb["eval/perplexity"]] == [2, 4]
    assert [v for _, v in tb["eval/perplexity"]] == pytest.approx(
        [lines[1]["val_ppl"], lines[3]["val_ppl"]]
    )
    assert tb["adapter/link_index"] == [(1, 0.0), (2, 1.0), (3, 1.0), (4, 1.0)]  # knot at 2

    from mlflow.tracking import MlflowClient

    client = MlflowClient()
    (run,) = client.search_runs([client.get_experiment_by_name("loravariants").experiment_id])
    history = client.get_metric_history(run.info.run_id, "train/loss")
    assert [m.step for m in history] == [1, 2, 3, 4]
    assert [m.value for m in history] == pytest.approx(result.losses)
    assert run.data.params["lr"] == "0.01" and run.info.status == "FINISHED"


def test_mixlora_logs_its_balance_loss_and_router_load(tmp_path):
    model = lv.attach(make_tiny_llama(), MixLoRAConfig(num_experts=4, top_k=2, r=2))
    out = tmp_path / "run"
    result = train(
        model, random_blocks(16, 16), _config(report_to=["tensorboard"]), out, progress=False
    )
    tb = _scalars(out / "tensorboard" / "loravariants")
    assert [v for _, v in tb["train/aux_loss"]] == pytest.approx(result.aux_losses)
    assert min(result.aux_losses) > 0
    loads = [tb[f"adapter/router_load/expert_{e}"] for e in range(4)]
    for step in range(4):  # each step's shares (mean over layers) sum to 1
        assert sum(load[step][1] for load in loads) == pytest.approx(1.0, abs=1e-5)


def test_grad_norm_is_the_norm_before_clipping(tmp_path):
    """Step 1's logged norm is the norm of the gradient computed by hand on its batch."""
    blocks = random_blocks(16, 16)
    model = lv.attach(make_tiny_llama(), LoRAConfig(r=2, dropout=0.0))
    by_hand = copy.deepcopy(model).train()
    batch = collate(blocks, global_rows(len(blocks), 0, 0, 2))
    by_hand(**batch).loss.backward()
    grads = [p.grad for p in by_hand.parameters() if p.grad is not None]
    expected = float(torch.linalg.vector_norm(torch.stack([g.norm() for g in grads])))
    train(model, blocks, _config(max_steps=1, max_grad_norm=1e-3), tmp_path / "run", progress=False)
    (line,) = _lines(tmp_path / "run")
    assert expected > 1e-2  # clipping to 1e-3 was active, and the norm logged is the one before
    assert line["grad_norm"] == pytest.approx(expected, rel=1e-4)


def test_eval_every_leaves_training_unchanged(tmp_path):
    blocks = random_blocks(16, 16)
    config = _config(max_steps=3)
    plain = train(lv.attach(make_tiny_llama(), LoRAConfig(r=2)), blocks, config, progress=False)
    model = lv.attach(make_tiny_llama(), LoRAConfig(r=2))
    checked = train(
        model,
        blocks,
        _config(max_steps=3, eval_every=1),
        tmp_path / "run",
        progress=False,
        eval_data=VAL,
    )
    assert checked.losses == plain.losses  # no randomness consumed, no state changed
    assert [x["step"] for x in _lines(tmp_path / "run") if "val_ppl" in x] == [1, 2, 3]


def _missing_tracker() -> str:
    return next(n for n in ("wandb", "trackio") if importlib.util.find_spec(n) is None)


@pytest.mark.skipif(
    all(importlib.util.find_spec(n) for n in ("wandb", "trackio")),
    reason="every tracker is installed here: none to find missing",
)
def test_a_tracker_not_installed_is_one_line_before_any_training(tmp_path, capsys):
    from loravariants.cli import main
    from loravariants.config import CONFIG_DIR

    name = _missing_tracker()
    with pytest.raises(
        ValueError, match=f"report_to names {name}, which is not installed: pip install {name}"
    ):
        TrainConfig(report_to=[name])
    out = tmp_path / "out"
    args = ["compare", "--config", str(CONFIG_DIR / "quickstart.yaml"), f"output_dir={out}"]
    assert main([*args, f"train.report_to=[{name}]"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"pip install {name}" in err
    assert not out.exists()  # nothing written, nothing trained


def test_tracking_mistakes_are_caught_before_training(tmp_path):
    with pytest.raises(ValueError, match="report_to must name trackers among"):
        TrainConfig(report_to=["tensorbord"])
    with pytest.raises(ValueError, match="report_to must be a list"):
        TrainConfig(report_to=3)
    assert TrainConfig(report_to="tensorboard").report_to == ["tensorboard"]
    with pytest.raises(ValueError, match="eval_every"):
        TrainConfig(eval_every=-1)
    model = lv.attach(make_tiny_llama(), LoRAConfig(r=2))
    blocks = random_blocks(4, 16)
    with pytest.raises(ValueError, match="eval_every > 0 needs validation tokens"):
        train(model, blocks, _config(eval_every=1), progress=False)
    with pytest.raises(ValueError, match="fewer than one training block"):
        train(model, blocks, _config(eval_every=1), progress=False, eval_data=VAL[:8])
    with pytest.raises(ValueError, match="tensorboard needs an output directory"):
        train(model, blocks, _config(report_to=["tensorboard"]), progress=False)
    from loravariants.multi import Job, train_concurrent

    job = Job("default", blocks, _config(report_to=["tensorboard"]))
    with pytest.raises(ValueError, match="does not support report_to"):
        train_concurrent(model, [job], progress=False)
    from loravariants.config import experiment_from_dict

    with pytest.raises(ValueError, match="concurrent: true does not support train.report_to"):
        experiment_from_dict(
            {
                "concurrent": True,
                "train": {"report_to": ["tensorboard"]},
                "runs": [{"name": "a", "adapter": "lora"}, {"name": "b", "adapter": "lora"}],
            }
        )
    assert not any(p.requires_grad and p.grad is not None for p in model.parameters())


def test_compare_sends_each_run_to_the_trackers(tmp_path, monkeypatch):
    from loravariants.compare import Environment, compare
    from loravariants.config import experiment_from_dict

    monkeypatch.setattr("loravariants.compare.report.make_report_plots", lambda *a: {})
    env = Environment(
        base_path="tiny",
        tokenizer=None,
        device=torch.device("cpu"),
        load_model=lambda: make_tiny_llama(max_position_embeddings=32),
        train_blocks=lambda n: random_blocks(n=8, length=n),
        val_tokens=VAL,
    )
    config = experiment_from_dict(
        {
            "output_dir": str(tmp_path / "out"),
            "train": {
                "max_steps": 2,
                "batch_size": 2,
                "warmup_steps": 0,
                "lr": 0.01,
                "report_to": ["tensorboard"],
                "eval_every": 1,
            },
            "eval": {"max_tokens": 64, "lengths": [32]},
            "seeds": [0],
            "runs": [{"name": "lora", "adapter": "lora"}],
        }
    )
    logs: list[str] = []
    compare(config, progress=False, log=logs.append, env=env)
    run = tmp_path / "out" / "runs" / "lora" / "seed0" / "train"
    tb = _scalars(run / "tensorboard" / "loravariants")
    assert [s for s, _ in tb["eval/perplexity"]] == [1, 2] and len(tb["train/loss"]) == 2
    (line,) = [x for x in logs if "ok in" in x]
    assert line.startswith("[1/1] lora/seed0: ok in ") and "final loss" in line and "ppl@32" in line


def test_a_comparison_resumes_with_other_trackers_and_from_older_records(tmp_path, monkeypatch):
    """report_to and eval_every change no result: a rerun with them keeps the finished runs,
    and so does a results.json written before these fields (and eval.lm_eval) existed."""
    from loravariants.compare import Environment, compare
    from loravariants.config import experiment_from_dict

    monkeypatch.setattr("loravariants.compare.report.make_report_plots", lambda *a: {})
    env = Environment(
        base_path="tiny",
        tokenizer=None,
        device=torch.device("cpu"),
        load_model=lambda: make_tiny_llama(max_position_embeddings=32),
        train_blocks=lambda n: random_blocks(n=8, length=n),
        val_tokens=VAL,
    )
    base = {
        "output_dir": str(tmp_path / "out"),
        "train": {"max_steps": 1, "batch_size": 2, "warmup_steps": 0},
        "eval": {"max_tokens": 64, "lengths": [32]},
        "runs": [{"name": "lora", "adapter": "lora"}],
    }
    compare(experiment_from_dict(base), progress=False, log=lambda _: None, env=env)
    results = tmp_path / "out" / "results.json"
    data = json.loads(results.read_text())
    for section, keys in {"train": ("report_to", "eval_every"), "eval": ("lm_eval",)}.items():
        for key in keys:
            del data["config"][section][key]  # as an older version wrote it
    results.write_text(json.dumps(data))
    logs: list[str] = []
    again = {**base, "train": {**base["train"], "report_to": ["tensorboard"], "eval_every": 1}}
    compare(experiment_from_dict(again), progress=False, log=logs.append, env=env)
    assert logs == ["[1/1] lora/seed0: done earlier, kept"]
    changed = {**base, "eval": {**base["eval"], "lm_eval_limit": 5}}
    with pytest.raises(ValueError, match="holds results of a different experiment"):
        compare(experiment_from_dict(changed), progress=False, log=logs.append, env=env)
