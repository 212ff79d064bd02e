"""Plan a comparison: the (row, seed) runs, each row's adapter overrides (parameter matching
included), the evaluation lengths, and whether an output folder's finished runs belong to this
experiment (resumption).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

from torch import nn

from ..config import ExperimentConfig, RunSpec, load_adapter_spec
from ..inject import attach
from ..utils import config_differences, printable

# the variant every row is compared with (subspace similarity, paired differences): the
# report's reference, by design, whichever variants the experiment holds
REFERENCE_VARIANT = "lora"
MATCH_TOLERANCE = 0.10


def count_adapter_params(model_factory: Callable[[], nn.Module], adapter_config) -> int:
    """Trainable adapter parameters ``adapter_config`` adds to a fresh model."""
    model = attach(model_factory(), adapter_config)
    return sum(
        p.numel() for n, p in model.named_parameters() if p.requires_grad and ".adapters." in n
    )


def match_rank(
    model_factory: Callable[[], nn.Module],
    spec: str,
    overrides: dict[str, Any],
    target: int,
    spec_dir: str | None,
    max_rank: int = 512,
    tolerance: float | None = MATCH_TOLERANCE,
) -> tuple[dict[str, Any], int]:
    """The rank whose adapter's parameter count is closest to ``target``.

    One value ``r`` is set on every rank field of the variant (``AdapterConfig.with_rank``;
    MixLoRA: the attention LoRA's ``r`` and the experts' ``expert_r``; COLA's ``link_ranks``
    and any ``rank_pattern`` entries too), so parameters that do not depend on a rank
    (MixLoRA's router) are the only fixed cost. Counts grow monotonically with ``r``, so a
    bisection finds the crossing; the nearer of its two neighbours wins.

    Args:
        model_factory: builds a fresh base model.
        spec, overrides, spec_dir: the row's adapter spec and its overrides.
        target: wanted adapter parameter count.
        max_rank: largest rank tried.
        tolerance: largest accepted relative miss ``|achieved - target| / target``; ``None``
            accepts any miss.

    Returns:
        ``(overrides with the rank fields set, achieved parameter count)``.

    Raises:
        ValueError: the variant has no rank field, or the best rank misses ``target`` by more
            than ``tolerance`` (e.g. a target below the rank-1 adapter's size).
    """
    config = load_adapter_spec(spec, overrides, spec_dir)
    if not config.rank_fields:
        raise ValueError(f"match_params: variant {config.variant!r} has no rank field")

    counts: dict[int, int] = {}

    def count(r: int) -> int:
        if r not in counts:
            adapter = load_adapter_spec(spec, {**overrides, **config.with_rank(r)}, spec_dir)
            counts[r] = count_adapter_params(model_factory, adapter)
        return counts[r]

    lo, hi = 1, max_rank
    if count(hi) < target:
        best = hi
    elif count(lo) >= target:
        best = lo
    else:
        while hi - lo > 1:
            mid = (lo + hi) // 2
            if count(mid) < target:
                lo = mid
            else:
                hi = mid
        best = min((lo, hi), key=lambda r: abs(count(r) - target))
    achieved = count(best)
    miss = abs(achieved - target) / target
    if tolerance is not None and miss > tolerance:
        fields = "/".join(config.rank_fields)
        reach = (
            f"rank 1 already has {count(1):,}"
            if best == 1
            else f"rank {max_rank} has only {count(max_rank):,}"
            if best == max_rank
            else f"the nearest, {fields}={best}, has {achieved:,}"
        )
        raise ValueError(
            f"match_params: {target:,} adapter parameters is out of reach for {spec!r} "
            f"({reach}: {achieved / target - 1:+.0%}); set match_params to a reachable count "
            f"or match_params_tolerance: {math.ceil(miss * 100) / 100:g} to accept the miss"
        )
    return {**overrides, **config.with_rank(best)}, achieved


def eval_lengths(config: ExperimentConfig, native: int) -> list[int]:
    if config.eval.lengths:
        return list(config.eval.lengths)
    target = config.context.target_length or native
    if target < native:  # a long-context base trained on shorter blocks: score at that length
        return [target]
    lengths, n = [], native
    while n <= target:
        lengths.append(n)
        n *= 2
    return lengths


def plan_runs(config: ExperimentConfig) -> list[tuple[RunSpec, int]]:
    plan = []
    for row in config.runs:
        # untrained rows too: each seed draws its own passkey prompts, and the Findings pair
        # every row's seed s with the same prompts (compare/findings.py)
        for seed in config.seeds:
            plan.append((row, seed))
    return plan


def run_key(row: RunSpec, seed: int) -> str:
    return f"{row.name}/seed{seed}"


def run_folder(out: Path, row_name: str, seed: int) -> Path:
    """Where one run's adapter, metrics and error file go: ``out/runs/<row>/seed<s>``."""
    return out / "runs" / row_name / f"seed{seed}"


# may differ between a comparison and its resumption: more seeds or rows, another folder
_RESUMABLE_KEYS = {"seeds", "runs", "output_dir", "spec_dir"}
# ... and, inside a section, bookkeeping that changes no record: trackers, validation curves
_RESUMABLE_FIELDS = {"train": ("report_to", "eval_every")}
# fields newer than some saved configs: a saved config without one had its default
_NEWER_FIELDS = {
    "eval": {
        "lm_eval": [],
        "lm_eval_include": None,
        "lm_eval_limit": None,
        "lm_eval_batch_size": 8,
    },
    "train": {"report_to": [], "eval_every": 0},
    "data": {"selection_fraction": None},
}
# ... at the top level, and in every row
_NEWER_TOP_FIELDS = {"lr_grid": None, "lr_grid_seeds": [0], "lr_grid_steps": None}
_NEWER_ROW_FIELDS = {"lr": None, "train_length": "target"}
# fields that change only the report (which contrasts, their families), never a run: a finished
# study may be reported again with new contrast declarations
_REPORT_ONLY_KEYS = ("families",)
_REPORT_ONLY_ROW_KEYS = ("comparator", "question")


def _comparable(config: dict[str, Any]) -> dict[str, Any]:
    """A config dict with the newer fields filled in and the bookkeeping fields left out."""
    config = dict(config)
    for section, defaults in _NEWER_FIELDS.items():
        if isinstance(config.get(section), dict):
            config[section] = {**defaults, **config[section]}
    for section, keys in _RESUMABLE_FIELDS.items():
        if isinstance(config.get(section), dict):
            config[section] = {k: v for k, v in config[section].items() if k not in keys}
    config = {**_NEWER_TOP_FIELDS, **config}
    for key in _REPORT_ONLY_KEYS:
        config.pop(key, None)
    if isinstance(config.get("runs"), list):
        config["runs"] = [
            {
                k: v
                for k, v in {**_NEWER_ROW_FIELDS, **row}.items()
                if k not in _REPORT_ONLY_ROW_KEYS
            }
            if isinstance(row, dict)
            else row
            for row in config["runs"]
        ]
    return config


def check_same_experiment(out: Path, saved: dict[str, Any], config: ExperimentConfig) -> None:
    """Finished runs are reused only by the experiment that made them.

    A rerun may add seeds or rows; any other change (budget, data, base model, a row's
    adapter or overrides) would silently mix runs of two experiments in one table.

    Raises:
        ValueError: naming the first differences.
    """
    now = _comparable(config_dict(config))
    then = _comparable(saved)
    differ = config_differences(then, now, _RESUMABLE_KEYS, show=json.dumps)
    saved_rows = {r.get("name"): r for r in then.get("runs") or [] if isinstance(r, dict)}
    differ += [
        f"runs[{r['name']}] changed"
        for r in now["runs"]
        if r["name"] in saved_rows and saved_rows[r["name"]] != r
    ]
    if differ:
        raise ValueError(
            f"{out} holds results of a different experiment ({'; '.join(differ[:3])}); "
            "choose another output_dir, or move that folder away to start over"
        )


def load_results(out: Path, config: ExperimentConfig) -> dict[str, dict[str, Any]]:
    """The finished runs in ``out``, checked to come from this experiment."""
    file = out / "results.json"
    if not file.is_file() and not file.is_symlink():
        return {}
    data = read_records(file, "results file", "move it away to start over")
    results = {r["key"]: r for r in data["runs"]}
    if results:
        check_same_experiment(out, data.get("config") or {}, config)
    return results


# the largest records store read (a few KB per run: a million runs would still fit)
MAX_RECORDS_BYTES = 1 << 30

# the fields of a record that other code reads, and what each must be (others are kept as
# they are); a value of the wrong type would otherwise fail every later write of the report
_NUMBER = (int, float)
_RECORD_FIELDS: dict[str, tuple[tuple[type, ...], str]] = {
    **{
        name: (_NUMBER, "a number or null")
        for name in (
            "final_loss",
            "tokens",
            "tokens_per_s",
            "wall_s",
            "peak_mem_mib",
            "peak_mem_delta_mib",
            "elapsed_s",
            "trainable_params",
            "adapter_params",
            "total_params",
            "matched_params",
            "context",
            "native_context",
        )
    },
    **{
        name: ((str,), "a string or null") for name in ("reason", "variant", "attention", "adapter")
    },
    **{
        name: ((dict,), "a mapping or null")
        for name in ("ppl", "passkey", "svd", "metric_errors", "adapter_config", "match_params")
    },
    **{name: ((list,), "a list or null") for name in ("loss_curve", "trainable")},
    "concurrent": ((bool,), "true, false or null"),
}


def read_records(file: Path, what: str, hint: str) -> dict[str, Any]:
    """A records store (``results.json``, a shard's file) read and checked whole.

    Raises:
        ValueError: one line naming ``file`` and what is wrong with it (not readable, not
            UTF-8 JSON, too large or too deeply nested, or of the wrong shape), then ``hint``.
    """
    try:
        if file.is_symlink():
            raise ValueError(f"{file}: is a link, not a {what} loravariants wrote; {hint}")
        if file.stat().st_size > MAX_RECORDS_BYTES:
            raise ValueError(f"{file}: larger than {MAX_RECORDS_BYTES >> 20} MiB; {hint}")
        raw = file.read_bytes()
    except OSError as e:
        raise ValueError(f"{file}: cannot be read ({e.strerror or e}); {hint}") from None
    try:
        data = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError:
        raise ValueError(f"{file}: not a {what} (not UTF-8 text); {hint}") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{file}: corrupt {what} ({e}); {hint}") from None
    except RecursionError:
        raise ValueError(f"{file}: not a {what} (nested too deeply); {hint}") from None
    problem = records_problem(data)
    if problem:
        raise ValueError(f"{file}: not a {what} of loravariants ({problem}); {hint}")
    return data


def records_problem(data: Any) -> str | None:
    """What is wrong with a parsed records store, or None: a mapping whose ``runs`` is a list
    of records, each with a string ``key`` equal to ``<row>/seed<seed>``, a ``status`` and
    fields of the types :data:`_RECORD_FIELDS` gives."""
    if not isinstance(data, dict):
        return f"a JSON {type(data).__name__}, not a mapping"
    runs = data.get("runs")
    if not isinstance(runs, list):
        return '"runs" is missing' if runs is None else f'"runs" is a {type(runs).__name__}'
    if not isinstance(data.get("config", {}), dict):
        return '"config" is not a mapping'
    keys = set()
    for i, record in enumerate(runs):
        if not isinstance(record, dict):
            return f"runs[{i}] is a {type(record).__name__}, not a mapping"
        row, seed, key = record.get("row"), record.get("seed"), record.get("key")
        if not isinstance(row, str) or not isinstance(seed, int) or isinstance(seed, bool):
            return f"runs[{i}] lacks a string row and an integer seed"
        if key != f"{row}/seed{seed}":
            return f"runs[{i}].key is {_show(key)}, not {row}/seed{seed}"
        if key in keys:
            return f"runs[{i}] repeats {key}"
        keys.add(key)
        if record.get("status") not in ("ok", "failed"):
            return f'runs[{i}].status must be "ok" or "failed", got {_show(record.get("status"))}'
        for name, (types, kind) in _RECORD_FIELDS.items():
            value = record.get(name)
            bad = value is not None and (
                not isinstance(value, types) or (bool not in types and isinstance(value, bool))
            )
            if bad:
                return f"runs[{i}].{name} must be {kind}, got {_show(value)}"
        for name in ("ppl", "passkey"):
            for length, value in (record.get(name) or {}).items():
                if value is not None and (
                    not isinstance(value, _NUMBER) or isinstance(value, bool)
                ):
                    return f"runs[{i}].{name}[{_show(length)}] must be a number, got {_show(value)}"
    return None


def _show(value: Any) -> str:
    return printable(repr(value), limit=60)


def config_dict(config: ExperimentConfig) -> dict[str, Any]:
    """The experiment as plain JSON values (as results.json records it)."""
    return json.loads(json.dumps(asdict(config), default=str))


def matched_overrides(
    config: ExperimentConfig,
    load_model: Callable[[], nn.Module],
    log: Callable[[str], None],
) -> tuple[dict[str, dict[str, Any]], dict[str, dict[str, Any]]]:
    """Every trained row's adapter overrides; with ``match_params``, its rank set to match.

    Returns:
        ``(overrides by row, match outcome by row)``; the outcome (``target``, ``achieved``,
        ``deviation``) is empty without ``match_params``.
    """
    overrides = {row.name: config.adapter_overrides(row) for row in config.runs if row.has_adapter}
    matched: dict[str, dict[str, Any]] = {}
    if not config.match_params:
        return overrides, matched
    tolerance = config.match_params_tolerance
    for row in config.runs:
        if row.has_adapter:  # full fine-tuning has no rank to match
            overrides[row.name], achieved = match_rank(
                load_model,
                row.adapter,
                overrides[row.name],
                config.match_params,
                config.spec_dir,
                tolerance=MATCH_TOLERANCE if tolerance is None else tolerance,
            )
            matched[row.name] = {
                "target": config.match_params,
                "achieved": achieved,
                "deviation": achieved / config.match_params - 1,
            }
            log(
                f"match_params: {row.name} -> {overrides[row.name]} ({achieved:,} adapter "
                f"parameters, {matched[row.name]['deviation']:+.1%} from "
                f"{config.match_params:,})"
            )
    return overrides, matched
