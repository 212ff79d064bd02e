"""A comparison grid spread over many processes or machines: ``compare --shard i/N``.

::

    plan (rows x seeds, in config order):  r0/s0  r0/s1  r1/s0  r1/s1  r2/s0  r2/s1 ...
    shard 0/3 runs plan[0::3]              r0/s0                r1/s1
    shard 1/3 runs plan[1::3]                     r0/s1                r2/s0
    shard 2/3 runs plan[2::3]                            r1/s0                r2/s1
        each -> OUT/shards/shard-<i>-of-<N>.json (its records; rewritten atomically per run)
    compare --merge (or any later compare) -> OUT/results.json + report (as one process)

A job array (SLURM ``--array``, a Kubernetes indexed job) starts the N shards with the same
config and output folder; a shard that dies is rerun with the same command and runs only its
runs that are not finished yet.

Writers on one output folder, and how none loses a record:

* a shard holds a *shared* lock on the output folder (so N shards run together) and an
  exclusive lock on ``OUT/shards/<i>-of-<N>/`` (so one shard is never run twice at once); it
  writes only its own file, and only the runs of its share (each has its own ``runs/`` folder);
* a compare without ``--shard`` and ``--merge`` hold the folder's *exclusive* lock: they wait
  for no one and are refused while a shard runs, and a shard is refused while they run;
* the merge reads every shard file, refuses one from a different experiment (as a resume
  does), keeps the best record per run (ok > ok with failed metrics > failed) and writes
  results.json atomically; shard files are kept, so a merge can be repeated.

Metrics that compare a run with *another* run (``similarity_to_lora``: a row's adapter against
the same seed's first LoRA row, which may have run in another shard) are left out by the shards
and computed from the saved adapters when the results are written
(:mod:`loravariants.compare.crossrun`), as for a one-process comparison.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ..distributed import refuse_launched
from ..utils import OutputLocked, check_output_dir, output_lock
from .crossrun import CrossRunMeasures
from .lr_select import selection_summary
from .plan import Shard, parse_shard, plan_runs, shard_plan
from .records import (
    SHARDS_DIR,
    load_results,
    merge_records,
    read_shard_records,
    run_key,
    shard_file,
    write_shard_records,
)
from .report import write_outputs

__all__ = [
    "Shard",
    "parse_shard",
    "shard_plan",
    "shard_file",
    "shard_lock",
    "read_shard_records",
    "merge_records",
    "write_shard_records",
    "missing_runs",
    "merge_shards",
]


@contextlib.contextmanager
def shard_lock(out: Path, shard: Shard) -> Iterator[None]:
    """A shared lock on ``out`` (other shards may run; a compare without ``--shard`` or a
    merge may not) and an exclusive one on this shard's folder (one process per shard).

    Raises:
        OutputLocked: a compare without ``--shard`` or a merge holds ``out``, or this shard
            runs already.
    """
    own = out / SHARDS_DIR / f"{shard.index}-of-{shard.count}"
    own.mkdir(parents=True, exist_ok=True)
    with contextlib.ExitStack() as held:
        try:
            held.enter_context(output_lock(out, shared=True))
        except OutputLocked:
            raise OutputLocked(
                f"{out} is in use by a loravariants compare without --shard (or a --merge); "
                "shards run only beside other shards"
            ) from None
        try:
            held.enter_context(output_lock(own))
        except OutputLocked:
            raise OutputLocked(f"shard {shard} of {out} is already running") from None
        yield


def merge_shards(config: Any) -> Path:
    """``compare --merge``: the shards' records (and those of results.json) into results.json,
    results.csv, report.md and the plots. Runs nothing, loads no model or data.

    Holds the output folder's exclusive lock: refused while a shard (or a compare) runs there.

    Raises:
        ValueError: nothing to merge, a shard file of a different experiment, or the folder
            in use.
    """
    refuse_launched("loravariants compare --merge")
    out = Path(config.output_dir)
    folder = out / SHARDS_DIR
    check_output_dir(out)  # a folder of someone else's is never written
    if not out.is_dir() or not folder.is_dir():
        raise ValueError(f"nothing to merge: {folder} does not exist (run the shards first)")
    with output_lock(out):
        previous = load_results(out, config)
        results = merge_records(previous, read_shard_records(out, config))
        if not results:
            raise ValueError(f"nothing to merge: no shard in {folder} has finished a run yet")
        cross = CrossRunMeasures(out).measure(config, results)
        selection = selection_summary(out, config)  # lr_grid: the shards' selection records
        write_outputs(
            out, config, results, _base_model(out), cross.seed_to_seed, cross.reference, selection
        )
    return out


def _base_model(out: Path) -> str | None:
    """The base-model path the shards (or an earlier results.json) recorded."""
    files = [out / "results.json", *sorted((out / SHARDS_DIR).glob("shard-*-of-*.json"))]
    for file in files:
        if file.is_file():
            value = json.loads(file.read_text()).get("base_model")
            if value:
                return value
    return None


# ---------------------------------------------------------------------------------------------
# the command line: loravariants compare --shard i/N | --merge
# ---------------------------------------------------------------------------------------------


def add_shard_arguments(parser: Any) -> None:
    """``--shard i/N`` and ``--merge`` (mutually exclusive) on an argparse parser."""
    group = parser.add_mutually_exclusive_group()
    group.add_argument(
        "--shard",
        metavar="i/N",
        help="run only shard i of N (0-based) of the rows x seeds, beside the other shards; "
        "records go to OUTPUT_DIR/shards/",
    )
    group.add_argument(
        "--merge",
        action="store_true",
        help="run nothing: merge the shards' records into results.json and the report",
    )


def shard_summary(out: Path, config: Any, shard: Shard) -> int:
    """Print what the shard did; exit status 1 when one of its runs failed (as compare)."""
    file = shard_file(out, shard)
    runs = json.loads(file.read_text())["runs"] if file.is_file() else []
    failed = [r["key"] for r in runs if r.get("status") != "ok" or r.get("metric_errors")]
    planned = len(shard_plan(plan_runs(config), shard))
    print(f"shard {shard}: {len(runs) - len(failed)} of {planned} runs ok; records: {file}")
    if failed:
        print(f"failed: {', '.join(failed)}; rerun this shard to retry them")
    print("when every shard is done: loravariants compare --config CONFIG --merge")
    return 1 if failed else 0


def missing_runs(out: Path, config: Any) -> list[str]:
    """The planned runs results.json holds no record of (after a merge: shards not run yet, or
    killed before their first record)."""
    file = out / "results.json"
    done = {r["key"] for r in json.loads(file.read_text())["runs"]} if file.is_file() else set()
    return [run_key(r, s) for r, s in plan_runs(config) if run_key(r, s) not in done]


def merge_summary(out: Path, config: Any, status: int) -> int:
    """After ``--merge``: name the runs still missing; exit status 1 while any is."""
    missing = missing_runs(out, config)
    if missing:
        shown = ", ".join(missing[:5]) + (" ..." if len(missing) > 5 else "")
        print(
            f"{len(missing)} run(s) have no record yet ({shown}): rerun their shards (or "
            "compare without --shard to run them here), then --merge again"
        )
    return 1 if missing else status
