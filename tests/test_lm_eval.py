"""Downstream tasks through lm-eval: a local multiple-choice task on the tiny base, checked
against log-likelihoods computed with the model directly; the CLI, compare's records and
Findings; unknown task names."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_base_config, write_tiny_corpus

import loravariants as lv
from loravariants.adapters import LoRAConfig
from loravariants.cli import main
from loravariants.integrations.lm_eval import evaluate_tasks, task_manager

pytest.importorskip("lm_eval")  # the [eval] extra; .[dev] installs it, so CI runs this file

ROOT = Path(__file__).resolve().parent.parent
TASKS = ROOT / "tests" / "lm_eval_tasks"
TASK = "loravariants_tiny_choice"


@pytest.fixture(scope="module")
def tiny_base(tmp_path_factory):
    """``(folder, model, tokenizer)`` of the tiny built-in base (built in a few seconds)."""
    from transformers import AutoModelForCausalLM

    from loravariants.base_model import build_base_model, resolve_base_model

    root = tmp_path_factory.mktemp("base")
    (root / "corpus").mkdir()
    write_tiny_corpus(root / "corpus")
    path = build_base_model(tiny_base_config(root / "corpus"), cache_dir=root, progress=False)
    path, tokenizer = resolve_base_model(str(path))
    return path, AutoModelForCausalLM.from_pretrained(path).eval(), tokenizer


@pytest.fixture
def at_root(monkeypatch, tmp_path):
    """Run from the repository root (the task's data path is relative to it), with the
    datasets cache in a temporary folder."""
    import datasets

    monkeypatch.chdir(ROOT)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "datasets"))


def _attached(model):
    """The base with a LoRA adapter whose B is random (so the adapter changes every score)."""
    import copy

    targets = ["q_proj", "v_proj", "up_proj", "down_proj"]
    model = lv.attach(copy.deepcopy(model), LoRAConfig(r=4, target_modules=targets))
    torch.manual_seed(5)
    for layer in lv.adapter_layers(model).values():
        torch.nn.init.normal_(layer.lora_B, std=1.0)
    return model.eval()


@torch.no_grad()
def _hand_loglikelihood(model, tokenizer, context: str, continuation: str) -> float:
    """``sum_j log p(cont_j | context, cont_<j)``, the continuation's tokens being those the
    whole text has beyond the context's (lm-eval's split of a request)."""
    whole = tokenizer(context + continuation).input_ids
    n_ctx = len(tokenizer(context).input_ids)
    logp = F.log_softmax(model(torch.tensor([whole])).logits[0].double(), dim=-1)
    return sum(float(logp[t - 1, whole[t]]) for t in range(n_ctx, len(whole)))


def test_lm_eval_scores_the_attached_model_as_a_hand_computation(tiny_base, at_root):
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM

    _, base, tokenizer = tiny_base
    model = _attached(base)
    docs = [json.loads(line) for line in (TASKS / "tiny_choice.jsonl").read_text().splitlines()]
    # lm-eval scores " " + choice after the question (target_delimiter " ")
    hand = [
        [_hand_loglikelihood(model, tokenizer, d["question"], " " + c) for c in d["choices"]]
        for d in docs
    ]
    without_adapter = _hand_loglikelihood(base, tokenizer, docs[0]["question"], " x + 0")
    assert abs(without_adapter - hand[0][0]) > 0.1  # the adapter is part of what is scored

    # lm-eval's own per-choice log-likelihoods, through the manager our code builds
    out = simple_evaluate(
        model=HFLM(pretrained=model, tokenizer=tokenizer, batch_size=4),
        tasks=[TASK],
        task_manager=task_manager([TASK], TASKS),
        log_samples=True,
        bootstrap_iters=0,
    )
    samples = sorted(out["samples"][TASK], key=lambda s: s["doc_id"])
    theirs = [[ll for ll, _ in s["filtered_resps"]] for s in samples]
    assert torch.allclose(torch.tensor(theirs), torch.tensor(hand), atol=1e-4)

    # our bridge: accuracy (argmax) and length-normalised accuracy, as computed by hand
    headline, metrics = evaluate_tasks(model, tokenizer, [TASK], include=TASKS, batch_size=4)

    def accuracy(scores) -> float:
        picks = [max(range(3), key=row.__getitem__) for row in scores]
        return sum(p == d["answer"] for p, d in zip(picks, docs, strict=True)) / len(docs)

    acc = accuracy(hand)
    acc_norm = accuracy(
        [[h[i] / len(d["choices"][i]) for i in range(3)] for h, d in zip(hand, docs, strict=True)]
    )
    assert headline == {TASK: pytest.approx(acc)}
    assert metrics[TASK]["acc,none"] == pytest.approx(acc)
    assert metrics[TASK]["acc_norm,none"] == pytest.approx(acc_norm)
    assert 0 < acc < 1  # a task the check can fail on either way
    assert not model.training


def _unknown_task_refused(path, capsys) -> None:
    code = main(["eval", "--model", str(path), "--lm-eval", "no_such_task_xyz"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1, err
    assert "no_such_task_xyz" in err and "lm-eval ls tasks" in err and "--lm-eval-include" in err


@pytest.mark.slow  # lm-eval indexes its ~15,000 task files for this: 10-30 s on 2 cores
def test_unknown_task_is_one_line_before_any_work(tiny_base, at_root, capsys):
    _unknown_task_refused(tiny_base[0], capsys)


def test_unknown_task_is_one_line_before_any_work_fast(tiny_base, at_root, capsys, monkeypatch):
    """The same, with lm-eval's own index left out (it takes seconds to build): the message,
    the exit status, and that nothing loads before; a missing include folder, too."""
    import loravariants.integrations.lm_eval as bridge

    real = bridge._manager.__wrapped__
    monkeypatch.setattr(bridge, "_manager", lambda include, defaults: real(str(TASKS), False))
    monkeypatch.setattr(
        "loravariants.base_model.resolve_base_model", lambda *a, **k: pytest.fail("loaded")
    )
    _unknown_task_refused(tiny_base[0], capsys)
    code = main(["eval", "--lm-eval", TASK, "--lm-eval-include", "no/such/dir"])
    assert code == 2 and "not a folder" in capsys.readouterr().err


def test_eval_command_reports_the_task(tiny_base, at_root, capsys, tmp_path):
    path, base, tokenizer = tiny_base
    model = _attached(base)
    lv.save_adapter(model, tmp_path / "adapter")
    args = ["eval", "--model", str(path), "--adapter", str(tmp_path / "adapter")]
    args += ["--lm-eval", TASK, "--lm-eval-include", str(TASKS)]
    assert main(args) == 0
    result = json.loads(capsys.readouterr().out)
    expected, _ = evaluate_tasks(model, tokenizer, [TASK], include=TASKS)
    assert result["lm_eval"] == pytest.approx(expected)
    assert "perplexity" not in result  # --lm-eval alone: the tasks only


def test_compare_records_tasks_and_findings_pair_them_across_seeds(
    tiny_base, at_root, tmp_path, monkeypatch
):
    from _train_script import random_blocks
    from transformers import AutoModelForCausalLM

    from loravariants.compare import Environment, compare
    from loravariants.compare.findings import findings
    from loravariants.config import experiment_from_dict

    path, _, tokenizer = tiny_base
    env = Environment(
        base_path=str(path),
        tokenizer=tokenizer,
        device=torch.device("cpu"),
        load_model=lambda: AutoModelForCausalLM.from_pretrained(path),
        train_blocks=lambda n: random_blocks(n=8, length=n),
        val_tokens=torch.randint(0, 128, (200,), generator=torch.Generator().manual_seed(0)),
    )
    config = experiment_from_dict(
        {
            "output_dir": str(tmp_path / "out"),
            "train": {"max_steps": 2, "batch_size": 2, "warmup_steps": 0, "lr": 0.05},
            "eval": {
                "max_tokens": 128,
                "lengths": [32],
                "lm_eval": [TASK],
                "lm_eval_include": str(TASKS),
            },
            "seeds": [0, 1],
            "runs": [
                {"name": "lora", "adapter": "lora"},
                {"name": "lora-r8", "adapter": "lora", "overrides": {"r": 8}},
            ],
        }
    )
    # the plots (redrawn after every run) are not what this checks, and take most of its time
    monkeypatch.setattr("loravariants.compare.report.make_report_plots", lambda *a: {})
    logs: list[str] = []
    compare(config, progress=False, log=logs.append, env=env)
    data = json.loads((tmp_path / "out" / "results.json").read_text())
    runs = {r["key"]: r for r in data["runs"]}
    assert all(r["status"] == "ok" for r in runs.values())
    for r in runs.values():  # the task's accuracy, and every metric lm-eval reported
        assert 0 <= r["lm_eval"][TASK] <= 1
        assert r["lm_eval_metrics"][TASK]["acc,none"] == r["lm_eval"][TASK]
    # Findings: the contrast lora-r8 - lora on the task, paired seed by seed
    metric = f"lm_eval@{TASK}"
    (found,) = [f for f in findings(config, runs) if f.metric == metric]
    assert found.contrast.a == "lora-r8" and found.difference.seeds == (0, 1)
    assert list(found.difference.differences) == pytest.approx(
        [
            runs[f"lora-r8/seed{s}"]["lm_eval"][TASK] - runs[f"lora/seed{s}"]["lm_eval"][TASK]
            for s in (0, 1)
        ]
    )
    report = (tmp_path / "out" / "report.md").read_text()
    assert metric in report and "## Findings" in report
    assert metric in (tmp_path / "out" / "results.csv").read_text().splitlines()[0]
    # one line per finished run (row, seed, time, final loss, main metric) and the ETA
    done = [line for line in logs if " ok in " in line]
    assert len(done) == 4 and all("final loss" in line and "ppl@32" in line for line in done)
    assert "ETA" in done[0] and "(3 runs)" in done[0] and "ETA" not in done[-1]
