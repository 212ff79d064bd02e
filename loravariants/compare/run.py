"""Run a comparison: every planned (row, seed) through the one training loop, on fresh copies
of one base, then measured; results and the report rewritten after every run.

    compare(config)
      plan      rows x seeds, adapter overrides (match_params)                     (plan.py)
      records   finished runs of this experiment (results.json, shards)            (records.py)
      env       base model, tokenizer and data, loaded once                        (env.py)
      for each run not done yet, one record:
        fresh base -> extend context -> attach -> train (PeakMemory) -> save adapter
        -> measure: perplexity, passkey, SVD, layer statistics                   (measure.py)
      after each record (the write set: every record so far):
        -> cross-run measures: similarity to the seed's reference, seed to seed  (crossrun.py)
        -> write results.json / results.csv / report.md / plots                  (report.py)

A run that fails is recorded with its reason and the others go on; finished runs are never
redone: a rerun of the same command resumes the missing ones.
"""

from __future__ import annotations

import contextlib
import math
import time
import traceback
from collections.abc import Callable, Mapping
from dataclasses import asdict
from pathlib import Path
from typing import Any

from torch import nn
from transformers.utils import logging as hf_logging

from ..config import ExperimentConfig, RunSpec, load_adapter_spec
from ..distributed import is_sharded, refuse_launched
from ..evaluate import perplexity
from ..inject import (
    attach,
    iter_adapters,
    mark_trainable,
    set_active_adapters,
    trainable_parameters,
)
from ..io import load_adapter, save_adapter
from ..longlora.context import extend_context, trainable_module_names
from ..multi import Job, train_concurrent
from ..train import TrainConfig, seed_everything, train
from ..utils import (
    atomic_write,
    check_output_dir,
    claim_output_dir,
    output_lock,
    printable,
    recover_folder,
)
from . import lr_select, measure
from .crossrun import CrossRunMeasures
from .env import Environment, load_environment
from .feasible import check_feasible
from .measure import PeakMemory, training_record
from .plan import Shard, eval_lengths, matched_overrides, plan_runs, shard_plan
from .progress import GridClock, run_line
from .protocol import (
    load_full_model,
    mark_full_finetune,
    row_train_config,
    save_full_model,
)
from .records import (
    load_results,
    merge_records,
    read_shard_records,
    run_folder,
    run_key,
    write_shard_records,
)
from .report import write_outputs
from .shard import shard_lock


def compare(
    config: ExperimentConfig,
    progress: bool = True,
    log: Callable[[str], None] = print,
    env: Environment | Mapping[str, Any] | None = None,
    only: list[tuple[str, int]] | None = None,
    shard: Shard | None = None,
    launched: bool = False,
) -> Path:
    """Run (or resume) the comparison; write results and the report after every run.

    Args:
        config: the experiment.
        progress: tqdm bars (also transformers' own).
        log: where one-line progress messages go.
        env: a prepared :class:`Environment` (tests; a mapping of its fields also works);
            default: load the base model and data.
        only: run just these ``(row name, seed)`` pairs (``loravariants train``); the report
            still covers the whole experiment.
        shard: run only this shard's share of the plan, beside the other shards, and write
            its records to ``output_dir/shards/`` only (see :mod:`loravariants.compare.shard`).
        launched: ``loravariants train`` under ``accelerate launch`` / ``torchrun``, on the
            main process: the one run of ``only`` trains over every process (the others run
            :func:`follow_launched_run`); this process saves, evaluates and records it.

    Raises:
        ValueError: ``output_dir`` holds results of a different experiment, or is a file, or
            another process is writing to it (one writer per folder).

    Returns:
        The output directory.
    """
    if not launched:
        refuse_launched("loravariants compare")  # one process; a grid over many uses --shard
    elif only is None or len(only) != 1 or shard is not None:
        raise ValueError("a launched compare trains exactly one run (loravariants train)")
    else:  # every process must train at the same rate: the selection ran before
        rows = {r.name: r for r in config.runs}
        if only[0][0] in rows:
            launched_lr(config, rows[only[0][0]])
    with _transformers_progress_bars(progress), contextlib.ExitStack() as locks:
        return _compare(config, progress, log, env, only, locks, shard)


def _lock(out: Path, locks: contextlib.ExitStack) -> None:
    """Hold ``out`` for this process (once): a second compare or train there stops at once
    with a clear message instead of redoing the runs and losing records."""
    if not getattr(locks, "held", False):
        locks.enter_context(output_lock(out))
        locks.held = True


@contextlib.contextmanager
def _transformers_progress_bars(enabled: bool):
    """``progress=False`` also silences transformers' own bars (weight loading), then restores."""
    was_enabled = hf_logging.is_progress_bar_enabled()
    if not enabled:
        hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled and not enabled:
            hf_logging.enable_progress_bar()


def _compare(
    config: ExperimentConfig,
    progress: bool,
    log: Callable[[str], None],
    env: Environment | Mapping[str, Any] | None,
    only: list[tuple[str, int]] | None,
    locks: contextlib.ExitStack,
    shard: Shard | None = None,
) -> Path:
    out = Path(config.output_dir)
    if out.exists() and not out.is_dir():
        raise ValueError(f"output_dir {out} is a file, not a folder")
    if any(p.exists() and not p.is_dir() for p in out.parents):
        raise ValueError(f"output_dir {out}: a parent of it is a file")
    if shard is not None:
        check_shardable(config)
    config.check_lm_eval_tasks()  # an unknown lm-eval task name: before any work
    check_output_dir(out)  # a folder of someone else's (or `.`, `/`, ~) is never written
    if env is None:  # (a prepared environment brings its own base model)
        check_feasible(config)  # sizes, target modules, match_params: before any work
    if out.is_dir() and shard is None:
        _lock(out, locks)
    results = load_results(out, config)
    env = Environment.of(env) if env is not None else load_environment(config, progress)
    overrides, matched = matched_overrides(config, env.load_model, log)
    # created (and marked ours) only after the base model, the data and the overrides are fine
    claim_output_dir(out)
    if shard is None:
        _lock(out, locks)
    else:  # shared lock on out (other shards run beside us), exclusive on this shard
        locks.enter_context(shard_lock(out, shard))
    recover_folder(out)  # temporary files of killed writers
    # merge: what another process finished here before we held the folder is kept, and what
    # shards finished (a shard reads them too, to skip finished runs)
    results = {**load_results(out, config), **results}
    results = merge_records(results, read_shard_records(out, config))
    plan = plan_runs(config)
    if only is not None:
        plan = [(row, seed) for row, seed in plan if (row.name, seed) in set(only)]
    if shard is not None:
        plan = shard_plan(plan, shard)
    write = _writer(out, config, env, shard, {k: results[k] for k in _keys(plan) if k in results})
    start = shard.index / shard.count if shard is not None else 0.0
    lrs = _learning_rates(config, env, out, plan, overrides, progress, log, start)
    _drop_stale_rates(plan, results, lrs, log)
    if config.concurrent:
        _concurrent_groups(
            config, plan, results, env, out, overrides, matched, progress, write, log
        )
    clock = GridClock()  # the per-run line and the grid's ETA (compare/progress.py)
    for i, (row, seed) in enumerate(plan, 1):
        key = run_key(row, seed)
        run_dir = run_folder(out, row.name, seed)
        where = f"[{i}/{len(plan)}] {key}"
        if results.get(key, {}).get("status") == "ok" and results[key].get("metric_errors"):
            log(f"{where}: trained earlier; computing its failed metrics again")
            _retry_metrics(config, row, seed, env, run_dir, results[key], progress)
            _log_metric_errors(results[key], log)
            write(results, key)
        elif config.concurrent and row.trains:
            pass  # trained (or failed) with its seed's concurrent group above
        elif results.get(key, {}).get("status") == "ok":
            log(f"{where}: done earlier, kept")
        elif (twin := seed_independent_twin(config, row, results)) is not None:
            # an untrained row without a seeded metric scores the same for every seed
            results[key] = _twin_record(twin, row, seed)
            write(results, key)
            log(f"{where}: untrained, nothing seeded: the metrics of {twin['key']}")
        else:
            log(f"{where}: running")
            lr = lrs.get(row.name, config.row_lr(row))
            record = _run_recorded(config, row, seed, env, run_dir, overrides, progress, log, lr)
            results[key] = _with_match(record, matched.get(row.name))
            _log_metric_errors(record, log)
            write(results, key)
            clock.add(row.name, record["elapsed_s"])
            log(f"{where}: {run_line(record)}{clock.eta(_left(config, plan[i:], results))}")
    if shard is None:  # the plots, once (each run above rewrote the numbers and the report)
        write(results, plots=True)
    return out


def _learning_rates(
    config, env, out, plan, overrides, progress, log, start=0.0
) -> dict[str, float | None]:
    """``lr_grid``: the chosen rate of every row of ``plan`` it selects for (selection runs
    first, resumed from their records: compare/lr_select.py). Other rows: not listed."""
    names = {row.name for row, _ in plan}
    rows = [row for row in lr_select.selection_rows(config) if row.name in names]
    if not rows:
        return {}
    if env.selection_tokens is None:  # (a hand-made Environment without them)
        raise ValueError(
            "lr_grid needs the selection split's tokens (Environment.selection_tokens)"
        )
    # a selection run is shorter than the row's runs: what the run decides from its length
    # (a chain's knots) is decided again for the selection's steps
    steps = lr_select.selection_steps(config)
    overrides = {
        row.name: {**overrides.get(row.name, {}), **config.run_overrides(row, steps)}
        for row in rows
        if row.has_adapter
    }

    def train_row(row: RunSpec, seed: int, lr: float, steps: int) -> nn.Module:
        model, record = _prepare_model(config, row, seed, env)
        if row.has_adapter:
            _attach_row(model, config, row, overrides.get(row.name, {}), "default")
        cfg = row_train_config(config, row, seed, record["native_context"], lr, steps)
        cfg.save_every = 0  # a selection run is one record; it keeps no checkpoints
        train(model.to(env.device), env.train_blocks(record["context"]), cfg, progress=progress)
        return model

    def score(model: nn.Module) -> float:
        native = int(model.config.max_position_embeddings)
        length = eval_lengths(config, native)[-1]
        return perplexity(
            model.to(env.device),
            env.selection_tokens,
            length,
            max(1, int(length * config.eval.stride_ratio)),
        )

    return lr_select.select_learning_rates(
        config, out, rows, overrides, train_row, score, log, start
    )


def _drop_stale_rates(
    plan: list[tuple[RunSpec, int]],
    results: dict[str, dict[str, Any]],
    lrs: dict[str, float | None],
    log: Callable[[str], None],
) -> None:
    """Forget the finished runs of ``plan`` trained at a rate the selection no longer chooses
    (its records changed: a selection rerun, or one resumed from other settings), so they run
    again at the chosen one; keeping them would report a rate no row was selected at."""
    for row, seed in plan:
        key = run_key(row, seed)
        record, chosen = results.get(key, {}), lrs.get(row.name)
        used = record.get("lr")
        if record.get("status") != "ok" or chosen is None or not isinstance(used, (int, float)):
            continue
        if not math.isclose(used, chosen):
            log(f"{key}: trained at lr={used:g}; the selection now chooses {chosen:g}: again")
            del results[key]


def _left(config: ExperimentConfig, plan, results: dict[str, dict[str, Any]]) -> list[str]:
    """The rows of the runs of ``plan`` this loop still has to run."""
    return [
        row.name
        for row, seed in plan
        if results.get(run_key(row, seed), {}).get("status") != "ok"
        and not (config.concurrent and row.trains)
    ]


def _keys(plan: list[tuple[RunSpec, int]]) -> list[str]:
    return [run_key(row, seed) for row, seed in plan]


def check_shardable(config: ExperimentConfig) -> None:
    """Refuse to split a ``concurrent: true`` comparison into shards (or workers).

    Raises:
        ValueError: ``config.concurrent`` is set.
    """
    if config.concurrent:
        raise ValueError(
            "--shard cannot split a concurrent: true comparison (its rows of a seed train "
            "together on one base); set concurrent: false, or run it without --shard"
        )


def _writer(
    out: Path,
    config: ExperimentConfig,
    env: Environment,
    shard: Shard | None,
    own: dict[str, dict[str, Any]],
) -> Callable[[dict[str, dict[str, Any]], str], None]:
    """After each run: rewrite the whole output (one process), or only the shard's own file
    (``own``: its records, those of an earlier attempt of this shard included). A shard sees
    part of the plan, so it leaves the cross-run measures to the merge."""
    cross_run = CrossRunMeasures(out)  # reads each adapter, and measures each pair, once

    def write(
        results: dict[str, dict[str, Any]], key: str | None = None, plots: bool = False
    ) -> None:
        if shard is None:
            cross = cross_run.measure(config, results)
            write_outputs(
                out,
                config,
                results,
                env.base_path,
                cross.seed_to_seed,
                cross.reference,
                lr_select.selection_summary(out, config),
                plots=plots,
            )
        else:
            own[key] = results[key]
            write_shard_records(out, shard, config, own, env.base_path)

    return write


def seed_independent_twin(
    config: ExperimentConfig, row: RunSpec, results: dict[str, dict[str, Any]]
) -> dict[str, Any] | None:
    """A finished record of ``row`` at another seed whose metrics this seed would repeat
    exactly, or None.

    An untrained row's perplexity does not depend on the seed (the same base, the same
    validation windows: bitwise equal across seeds and processes in the study's records); its
    only seeded metric is the passkey (each seed draws its own prompts), and lm-eval tasks are
    left out to be safe. So with neither configured, the row is evaluated once and its other
    seeds carry that record (``same_as``), which a study of S seeds saves S - 1 evaluations of
    the whole validation split per untrained row.
    """
    if row.trains or config.eval.passkey_lengths or config.eval.lm_eval:
        return None
    for record in results.values():
        if (
            record.get("row") == row.name
            and record.get("status") == "ok"
            and not record.get("metric_errors")
            and "same_as" not in record
        ):
            return record
    return None


def _twin_record(twin: dict[str, Any], row: RunSpec, seed: int) -> dict[str, Any]:
    """``twin``'s record at ``seed``: its metrics, this run's key and seed, ``same_as`` the
    record it repeats, and no time of its own."""
    return {
        **twin,
        **_new_record(row, seed),
        "same_as": twin["key"],
        "elapsed_s": 0.0,
        "cpu_s": 0.0,
    }


def _new_record(row: RunSpec, seed: int) -> dict[str, Any]:
    """The fields every run's record starts with."""
    return {
        "key": run_key(row, seed),
        "row": row.name,
        "seed": seed,
        "adapter": row.adapter,
        "trainable": row.trainable,
    }


def _with_match(record: dict[str, Any], match: dict[str, Any] | None) -> dict[str, Any]:
    if match:
        record.update(matched_params=match["achieved"], match_params=match)
    return record


def _run_recorded(
    config, row, seed, env, run_dir, overrides, progress, log, lr=None
) -> dict[str, Any]:
    """One run as a record: its measurements, or the reason it failed (the traceback goes to
    ``run_dir/error.txt``); never raises, so one failed run does not stop the others.
    ``lr``: the rate a trained row runs at (None with ``lr_grid``: every rate failed)."""
    start, cpu = time.perf_counter(), time.process_time()
    record = _new_record(row, seed)
    try:
        if row.trains and lr is None:
            raise ValueError("lr selection: every rate of lr_grid failed (lr_selection/)")
        record.update(
            _run_one(config, row, seed, env, run_dir, overrides.get(row.name, {}), progress, lr)
        )
        record["status"] = "ok"
    except Exception as e:  # one failed run must not stop the others
        record.update(status="failed", reason=f"{type(e).__name__}: {e}")
        run_dir.mkdir(parents=True, exist_ok=True)
        atomic_write(run_dir / "error.txt", traceback.format_exc())
        log(f"    failed: {printable(record['reason'], limit=300)}")
    record["elapsed_s"] = time.perf_counter() - start
    # this process's CPU seconds: what the run costs whatever else shares the machine (a study
    # is sized from it)
    record["cpu_s"] = time.process_time() - cpu
    return record


def _concurrent_groups(
    config, plan, results, env, out, overrides, matched, progress, write, log
) -> None:
    """``concurrent: true``: per seed, the trained rows not yet done run together."""
    for seed in config.seeds:
        rows = [
            row
            for row, s in plan
            if s == seed
            and row.trains
            and results.get(run_key(row, seed), {}).get("status") != "ok"
        ]
        if not rows:
            continue
        log(f"seed {seed}: training {[r.name for r in rows]} concurrently on one base")
        start = time.perf_counter()
        try:
            records = _run_concurrent(config, rows, seed, env, out, overrides, progress)
            failure = None
        except Exception as e:  # the group failed: record it for each of its rows
            records, failure = {}, f"{type(e).__name__}: {e}"
            log(f"    failed: {failure}")
        for row in rows:
            record = {**_new_record(row, seed), "elapsed_s": time.perf_counter() - start}
            if failure is None:
                record.update(records[row.name], status="ok")
            else:
                record.update(status="failed", reason=failure)
            results[run_key(row, seed)] = _with_match(record, matched.get(row.name))
            _log_metric_errors(record, log)
        write(results)


def _log_metric_errors(record: dict[str, Any], log: Callable[[str], None]) -> None:
    for metric, error in record.get("metric_errors", {}).items():
        log(f"    {record['key']}: metric {metric} failed (run kept): {printable(error, 300)}")


def _retry_metrics(
    config: ExperimentConfig,
    row: RunSpec,
    seed: int,
    env: Environment,
    run_dir: Path,
    record: dict[str, Any],
    progress: bool,
) -> None:
    """Compute again the metrics a finished run failed; its training is kept as it is.

    The model is rebuilt as the run built it and its saved adapter loaded. Metrics that
    succeed replace their error; the others keep theirs.
    """
    failed = record["metric_errors"]
    try:
        model, _ = _prepare_model(config, row, seed, env)
        name = None
        if row.full_finetune:  # its weights, saved whole
            model = load_full_model(run_dir)
        elif row.trains:  # the saved adapter carries its exact config (COLA: its whole chain)
            name = "default"
            load_adapter(model, run_dir / "adapter", name=name)
        lengths = eval_lengths(config, record["native_context"])
        fresh = measure.evaluate_run(model, config, env, seed, lengths, name, progress)
    except Exception as e:  # the run stays kept; the old errors stay
        failed.update({m: f"{type(e).__name__}: {e} (retry)" for m in failed})
        return
    new_errors = fresh.pop("metric_errors", {})
    for metric in list(failed):
        if metric in fresh:
            record[metric] = fresh[metric]
            del failed[metric]
        elif metric in new_errors:
            failed[metric] = new_errors[metric]
    if not failed:
        del record["metric_errors"]


def _prepare_model(config: ExperimentConfig, row: RunSpec, seed: int, env: Environment):
    """Fresh base -> context extension (+ trainable embed/norm) -> training attention."""
    seed_everything(seed)
    model = env.load_model()
    native = int(model.config.max_position_embeddings)
    target = config.context.target_length
    record: dict[str, Any] = {"native_context": native}
    modules = () if row.full_finetune else tuple(row.trainable)
    if row.extend_context and target and target > native:
        extend_context(
            model,
            target,
            method=config.context.method,
            trainable=modules,
            factor_rounding=config.context.factor_rounding,
        )
        record["context"] = target
    else:
        if modules:
            mark_trainable(model, trainable_module_names(model, modules))
        # a target below the native context (a real base with 8k positions on a CPU budget)
        # is the training length, with positions left as they are
        record["context"] = min(target or native, native)
    if row.full_finetune:  # every base parameter trains (memory and params recorded)
        record["trainable_params"] = mark_full_finetune(model)
    attention = row.attention or config.context.attention
    model.config.s2_group_size_ratio = config.context.group_size_ratio
    model.set_attn_implementation(attention)
    record["attention"] = attention if row.trains else "sdpa (eval)"
    return model, record


def _attach_row(
    model: nn.Module, config: ExperimentConfig, row: RunSpec, overrides: dict[str, Any], name: str
) -> dict[str, Any]:
    """Attach the row's adapter under ``name``; its parameter counts for the record."""
    adapter = load_adapter_spec(row.adapter, overrides, config.spec_dir)
    attach(model, adapter, name=name)
    adapter_params = sum(
        p.numel() for _, _, layer in iter_adapters(model, name) for p in layer.parameters()
    )
    extra = trainable_parameters(model).trainable - sum(
        p.numel() for _, _, layer in iter_adapters(model) for p in layer.parameters()
    )
    return dict(
        variant=adapter.variant,
        adapter_config=adapter.to_dict(),
        adapter_params=adapter_params,
        trainable_params=adapter_params + extra,
        total_params=trainable_parameters(model).total,
    )


def _run_one(
    config: ExperimentConfig,
    row: RunSpec,
    seed: int,
    env: Environment,
    run_dir: Path,
    overrides: dict[str, Any],
    progress: bool,
    lr: float | None = None,
) -> dict[str, Any]:
    model, record = _prepare_model(config, row, seed, env)
    name = None
    if row.trains:
        if row.has_adapter:
            name = "default"
            record.update(_attach_row(model, config, row, overrides, name))
        else:  # full fine-tuning: no adapter; every parameter is the row's
            total = trainable_parameters(model).total
            record.update(variant="full", adapter_params=0, total_params=total)
        lr = config.row_lr(row) if lr is None else lr
        native = record["native_context"]
        train_cfg = row_train_config(config, row, seed, native, lr)
        record.update(lr=lr, train_length=row.train_length, batch_size=train_cfg.batch_size)
        with PeakMemory(env.device) as mem:
            result = train(
                model.to(env.device),
                env.train_blocks(record["context"]),
                train_cfg,
                output_dir=run_dir / "train",
                progress=progress,
                # train.eval_every: validation perplexity on the evaluation tokens
                eval_data=env.val_tokens[: config.eval.max_tokens]
                if train_cfg.eval_every
                else None,
                run_name=run_key(row, seed),  # the run's name in train.report_to's trackers
            )
        record.update(training_record(result, mem))
        # input tokens trained on: equal for a train_length: native row and its target row
        record["train_tokens_seen"] = (
            result.steps * train_cfg.batch_size * train_cfg.grad_accum * record["context"]
        )
        if not row.has_adapter:
            save_full_model(model, run_dir)
        else:
            save_adapter(model, run_dir / "adapter", format="native")
        if is_sharded(model) and row.has_adapter:
            # FSDP left the frozen base sharded over the processes, which have ended their
            # part: evaluate here, alone, the saved adapter on a fresh base (as a retry does)
            del model
            model, _ = _prepare_model(config, row, seed, env)
            load_adapter(model, run_dir / "adapter", name=name)
    else:
        record.update(variant="none", trainable_params=0, adapter_params=0)
    lengths = eval_lengths(config, record["native_context"])
    record.update(measure.evaluate_run(model, config, env, seed, lengths, name, progress))
    return record


def follow_launched_run(config: ExperimentConfig, row: RunSpec, seed: int, env: Environment):
    """``loravariants train`` under a launcher, on a process other than the main one: train
    run ``(row, seed)`` together with the main process (its :func:`compare` with
    ``launched``): the same base, adapter, data and :func:`~loravariants.train.train` call,
    hence the same collectives. Writes nothing of its own (the main process saves, evaluates
    and records); a run already recorded as done is skipped, as the main process skips it.

    Args:
        config: the experiment, as the main process has it.
        row: the trained row.
        seed: its seed.
        env: the loaded base model and data (after the main process loaded them).
    """
    out = Path(config.output_dir)
    if load_results(out, config).get(run_key(row, seed), {}).get("status") == "ok":
        return
    overrides, _ = matched_overrides(config, env.load_model, lambda line: None)
    model, record = _prepare_model(config, row, seed, env)
    if row.has_adapter:
        _attach_row(model, config, row, overrides.get(row.name, {}), "default")
    lr = launched_lr(config, row)
    train(
        model.to(env.device),
        env.train_blocks(record["context"]),
        row_train_config(config, row, seed, record["native_context"], lr),
        output_dir=run_folder(out, row.name, seed) / "train",
        progress=False,
    )


def launched_lr(config: ExperimentConfig, row: RunSpec) -> float:
    """The rate a launched run trains at: with ``lr_grid``, the selection's, which must have
    run before (every process must train the same thing; the selection runs in one).

    Raises:
        ValueError: the row's selection has not finished.
    """
    if not config.needs_lr_selection(row):
        return config.row_lr(row)
    chosen = lr_select.selection_summary(Path(config.output_dir), config).get(row.name, {})
    if chosen.get("chosen") is None:
        raise ValueError(
            f"runs[{row.name}]: lr_grid's selection has not finished; run it first without a "
            "launcher (loravariants compare), then launch the row"
        )
    return chosen["chosen"]


def _run_concurrent(
    config: ExperimentConfig,
    rows: list[RunSpec],
    seed: int,
    env: Environment,
    out: Path,
    overrides: dict[str, dict[str, Any]],
    progress: bool,
) -> dict[str, dict[str, Any]]:
    """All trained rows of one seed on one frozen base, trained together (ASPEN / m-LoRA).

    Each row keeps its own data order, optimizer, schedule and hooks; each is evaluated with
    only its adapter active. Rows must agree on context extension and attention and may not
    train whole base modules (embeddings/norms would be shared).
    """
    # (rows that cannot share one base are refused when the config is built)
    model, common = _prepare_model(config, rows[0], seed, env)
    names = {row.name: f"row{i}" for i, row in enumerate(rows)}
    records = {
        row.name: {
            **common,
            **_attach_row(model, config, row, overrides[row.name], names[row.name]),
        }
        for row in rows
    }
    blocks = env.train_blocks(common["context"])
    jobs = [
        Job(names[row.name], blocks, TrainConfig(**{**asdict(config.train), "seed": seed}))
        for row in rows
    ]
    with PeakMemory(env.device) as mem:
        results = train_concurrent(model.to(env.device), jobs, progress=progress)
    lengths = eval_lengths(config, common["native_context"])
    for row in rows:
        name = names[row.name]
        save_adapter(model, run_folder(out, row.name, seed) / "adapter", format="native", name=name)
        records[row.name].update(training_record(results[name], mem), concurrent=True)
        set_active_adapters(model, [name])
        records[row.name].update(
            measure.evaluate_run(model, config, env, seed, lengths, name, progress)
        )
    set_active_adapters(model, None)
    return records
