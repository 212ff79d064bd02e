"""The records store: one record per run, keyed ``<row>/seed<s>``; where a run's files go;
``results.json`` and the shards' record files read (checked whole) and written; two record
sets merged; and whether an output folder's records belong to this experiment (resumption).

Nothing here measures or renders: a record is stored as the run (or the cross-run measures)
left it.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict
from pathlib import Path
from typing import Any

from .._version import __version__
from ..config import ExperimentConfig, RunSpec
from ..utils import atomic_write, config_differences, printable
from .plan import Shard

RESULTS_SCHEMA_VERSION = 1
SHARDS_DIR = "shards"


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
            "train_loss_final",
            "lr",
        )
    },
    **{
        name: ((str,), "a string or null") for name in ("reason", "variant", "attention", "adapter")
    },
    **{
        name: ((dict,), "a mapping or null")
        for name in (
            "ppl",
            "passkey",
            "svd",
            "metric_errors",
            "adapter_config",
            "match_params",
            "doc_nll",
            "passkey_outcomes",
        )
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
        problem = _per_item_problem(record)
        if problem:
            return f"runs[{i}].{problem}"
    return None


def _is_number(value: Any) -> bool:
    return isinstance(value, _NUMBER) and not isinstance(value, bool) and math.isfinite(value)


def _per_item_problem(record: dict[str, Any]) -> str | None:
    """What is wrong with a record's per-document NLL or per-prompt passkey outcomes."""
    for length, pairs in (record.get("doc_nll") or {}).items():
        where = f"doc_nll[{_show(length)}]"
        if not isinstance(pairs, list):
            return f"{where} must be a list of [nll_sum, tokens] pairs, got {_show(pairs)}"
        for j, pair in enumerate(pairs):
            good = (
                isinstance(pair, list)
                and len(pair) == 2
                and all(_is_number(v) for v in pair)
                and pair[0] >= 0
                and pair[1] > 0
            )
            if not good:
                return f"{where}[{j}] must be [nll_sum >= 0, tokens > 0], got {_show(pair)}"
    for length, outcomes in (record.get("passkey_outcomes") or {}).items():
        where = f"passkey_outcomes[{_show(length)}]"
        if not isinstance(outcomes, list) or any(
            v not in (0, 1) or not isinstance(v, int) for v in outcomes
        ):
            return f"{where} must be a list of 0/1 outcomes, one per prompt, got {_show(outcomes)}"
    return None


def _show(value: Any) -> str:
    return printable(repr(value), limit=60)


def config_dict(config: ExperimentConfig) -> dict[str, Any]:
    """The experiment as plain JSON values (as results.json records it)."""
    return json.loads(json.dumps(asdict(config), default=str))


def _rank(record: dict[str, Any]) -> int:
    if record.get("status") != "ok":
        return 0
    return 1 if record.get("metric_errors") else 2


def merge_records(
    base: dict[str, dict[str, Any]], extra: dict[str, dict[str, Any]]
) -> dict[str, dict[str, Any]]:
    """``base`` with ``extra``'s records added; a run in both keeps the better record (ok >
    ok with failed metrics > failed; a tie keeps ``base``'s)."""
    merged = dict(base)
    for key, record in extra.items():
        if key not in merged or _rank(record) > _rank(merged[key]):
            merged[key] = record
    return merged


def shard_file(out: Path, shard: Shard) -> Path:
    """Where shard ``shard`` keeps its records: ``out/shards/shard-<i>-of-<N>.json``."""
    return out / SHARDS_DIR / f"shard-{shard.index}-of-{shard.count}.json"


def read_shard_records(out: Path, config: Any) -> dict[str, dict[str, Any]]:
    """Every record in ``out/shards/*.json``, each file checked to come from ``config``'s
    experiment.

    Raises:
        ValueError: a shard file is not JSON, or holds records of a different experiment.
    """
    folder = out / SHARDS_DIR
    records: dict[str, dict[str, Any]] = {}
    if not folder.is_dir():
        return records
    for file in sorted(folder.glob("shard-*-of-*.json")):
        # written atomically: a broken file is not a cut write but a hand edit (or not ours)
        data = read_records(file, "shard file", "rerun that shard")
        runs = data["runs"]
        if runs:
            try:
                check_same_experiment(out, data.get("config") or {}, config)
            except ValueError as e:
                raise ValueError(f"{file}: {e}") from None
        records = merge_records(records, {r["key"]: r for r in runs})
    return records


def write_shard_records(
    out: Path,
    shard: Shard,
    config: Any,
    records: dict[str, dict[str, Any]],
    base_model: str | None = None,
) -> Path:
    """Rewrite this shard's file atomically with ``records`` (its own runs only);
    ``base_model``: the resolved base-model path, for the merged results.json."""
    file = shard_file(out, shard)
    payload = {
        "schema_version": RESULTS_SCHEMA_VERSION,
        "library_version": __version__,
        "shard": str(shard),
        "base_model": base_model,
        "config": config_dict(config),
        "runs": list(records.values()),
    }
    atomic_write(file, json.dumps(payload, indent=2, default=str))
    return file
