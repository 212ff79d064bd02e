"""Downstream tasks through lm-eval (EleutherAI's evaluation harness; extra ``.[eval]``).

    task names -> task_manager(): every name known (lm-eval's own tasks, plus a folder of
                  task YAMLs), else one line saying how to find names -- before any work
    model      -> lm_eval.models.huggingface.HFLM(pretrained=<the attached model>, tokenizer)
               -> lm_eval.simple_evaluate -> per task: its first metric (``acc`` of a
                  multiple-choice task, ``exact_match`` of gsm8k) and every metric it reports

The attached model goes to lm-eval as it is: the adapters stay unmerged, so every variant is
evaluated, MixLoRA's input-dependent experts included. lm-eval's own seeds are not set: the
caller's random state is left as it was (few-shot sampling keeps lm-eval's fixed seed).
"""

from __future__ import annotations

import functools
import importlib.util
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from torch import nn

__all__ = ["INSTALL", "require_lm_eval", "task_manager", "evaluate_tasks", "main_metric"]

INSTALL = "pip install 'loravariants[eval]'"
# the hint every unknown-task error gives
FIND_TASKS = (
    "list lm-eval's task names with `lm-eval ls tasks`; a task of your own (a YAML file) needs "
    "its folder given with --lm-eval-include DIR (eval.lm_eval_include in a config)"
)


def require_lm_eval() -> None:
    """Raises ValueError (naming the ``pip install``) when lm-eval is not installed."""
    if importlib.util.find_spec("lm_eval") is None:
        raise ValueError(f"lm-eval tasks need the lm-eval package: {INSTALL}")


@functools.lru_cache(maxsize=4)
def _manager(include: str | None, defaults: bool):
    # indexing lm-eval's ~15,000 task files takes seconds: once per process and folder
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=include, include_defaults=defaults)


def task_manager(tasks: Sequence[str], include: str | Path | None = None):
    """An lm-eval ``TaskManager`` that knows every name in ``tasks`` (tasks, groups, tags).

    With ``include``, its folder is looked at first, and lm-eval's own index (slow to build)
    only when a name is not there.

    Raises:
        ValueError: lm-eval missing, ``include`` not a folder, or a name no index holds (one
            line saying how to find task names).
    """
    require_lm_eval()
    names = list(tasks)
    if not names or not all(isinstance(t, str) and t for t in names):
        raise ValueError(f"lm-eval tasks must be a list of task names, got {tasks!r}")
    folder = None
    if include is not None:
        if not Path(include).is_dir():
            raise ValueError(f"lm-eval include folder {str(include)!r} is not a folder")
        folder = str(Path(include).resolve())
        manager = _manager(folder, False)
        if set(names) <= set(manager.all_tasks):
            return manager
    manager = _manager(folder, True)
    missing = [t for t in names if t not in set(manager.all_tasks)]
    if missing:
        raise ValueError(f"lm-eval task(s) {missing} not found; {FIND_TASKS}")
    return manager


def main_metric(entry: dict[str, Any]) -> tuple[str, float] | None:
    """A task's headline: its first numeric metric that is not a standard error
    (``acc,none`` for multiple choice, ``exact_match,strict-match`` for gsm8k)."""
    for key, value in entry.items():
        if "," not in key or "_stderr," in key:
            continue  # alias, name, sample_len; the standard errors
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return key, float(value)
    return None


def evaluate_tasks(
    model: nn.Module,
    tokenizer: Any,
    tasks: Sequence[str],
    include: str | Path | None = None,
    limit: int | None = None,
    batch_size: int = 8,
    num_fewshot: int | None = None,
) -> tuple[dict[str, float], dict[str, dict[str, float]]]:
    """Evaluate ``model`` (adapters attached, on its device) on lm-eval ``tasks``.

    Args:
        model: a causal LM (``transformers`` model), evaluated as it is.
        tokenizer: its tokenizer.
        tasks: lm-eval task, group or tag names.
        include: a folder of task YAMLs of your own.
        limit: documents per task (None: all).
        batch_size: requests per forward.
        num_fewshot: few-shot examples (None: each task's default).

    Returns:
        ``(headline, metrics)``: ``{task: main metric}`` for each name asked for (a tag or
        group without an entry of its own: each of its tasks), and ``{task: {metric: value}}``
        of every task lm-eval reported.

    Raises:
        ValueError: see :func:`task_manager` (checked before any work).
    """
    manager = task_manager(tasks, include)
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM

    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
    was_training = model.training
    model.eval()
    try:
        out = simple_evaluate(
            model=lm,
            tasks=list(tasks),
            task_manager=manager,
            limit=limit,
            num_fewshot=num_fewshot,
            log_samples=False,
            bootstrap_iters=1000,
            random_seed=None,
            numpy_random_seed=None,
            torch_random_seed=None,
        )
    finally:
        model.train(was_training)
    metrics = {
        task: {
            k: float(v)
            for k, v in entry.items()
            if "," in k and isinstance(v, (int, float)) and not isinstance(v, bool)
        }
        for task, entry in out["results"].items()
    }
    wanted = [t for t in tasks if t in out["results"]]
    if len(wanted) < len(tasks):  # a tag expands to its tasks, without an entry of its own
        wanted += [t for t in out["results"] if t not in wanted]
    headline = {}
    for task in wanted:
        found = main_metric(out["results"][task])
        if found is not None:
            headline[task] = found[1]
    return headline, metrics
