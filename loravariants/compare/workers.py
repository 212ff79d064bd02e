"""A comparison's grid in N local processes: ``compare --workers N`` (or ``auto``).

N processes with cores/N torch threads each run ``compare --shard i/N`` (:mod:`.shard`) and
the parent merges them: the job-array path on one machine, without a shell loop::

    parent: validate the config  ->  spawn  compare --shard 0/N ... --shard N-1/N --quiet
            (OMP_NUM_THREADS = cores // N each)  ->  wait, forwarding their lines  ->  --merge

It pays where a process does not scale over the cores its threads get; on a 2-vCPU VM whose
vCPUs are one core's two hardware threads it gains nothing (docs/benchmarks.md), so the
default stays 1.

The shards share nothing but the output folder (each writes its own records file, and the
learning-rate selection's records, which every shard reads before it runs one), so the merge
gives the records a one-process compare gives, and a rerun resumes as any compare does.
"""

from __future__ import annotations

import os
import queue
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import IO, Any

from .plan import plan_runs
from .records import read_shard_records, run_key

__all__ = ["MAX_AUTO_WORKERS", "available_cores", "default_workers", "parse_workers", "run_workers"]

#: the most processes ``auto`` starts (each holds its own base model and data)
MAX_AUTO_WORKERS = 4
#: seconds between looks at the shards' records (the progress bar)
_POLL_S = 2.0
#: lines of a failed worker's output shown with its error
_TAIL_LINES = 5


def available_cores() -> int:
    """The CPU cores this process may run on (its affinity mask where the OS has one)."""
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return max(1, os.cpu_count() or 1)


def default_workers(config: Any, cores: int | None = None, cuda: bool | None = None) -> int:
    """``--workers auto``: one process per core (at most :data:`MAX_AUTO_WORKERS`, at most one
    per planned run) on a CPU; 1 on a GPU (one device) or for ``concurrent: true`` (a seed's
    rows train together in one process).

    Args:
        config: the experiment.
        cores: the usable cores (default :func:`available_cores`).
        cuda: whether a GPU is used (default: ``torch.cuda.is_available()``).
    """
    if cuda is None:
        import torch

        cuda = torch.cuda.is_available()
    if cuda or config.concurrent:
        return 1
    cores = available_cores() if cores is None else cores
    return max(1, min(cores, MAX_AUTO_WORKERS, len(plan_runs(config))))


def parse_workers(text: str) -> int | str:
    """``--workers`` value: ``"auto"`` or a whole number >= 1.

    Raises:
        ValueError: anything else (one line for the CLI).
    """
    if text == "auto":
        return text
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise ValueError(f"--workers must be a whole number >= 1 or auto, got {text!r}")
    return value


def run_workers(
    config: Any,
    config_file: str | os.PathLike,
    overrides: Sequence[str],
    workers: int,
    progress: bool = True,
    log: Callable[[str], None] = print,
    cores: int | None = None,
) -> Path:
    """Run the comparison as ``workers`` shard processes, then merge their records.

    Args:
        config: the experiment, as loaded from ``config_file`` with ``overrides`` (the
            parent's check that it is valid, before any process starts).
        config_file, overrides: what each worker loads (``compare --config FILE overrides``).
        workers: the number of processes, >= 2.
        progress: a bar over the planned runs (tqdm); the workers' own lines are forwarded
            either way, each prefixed with its worker.
        log: where the forwarded lines go.
        cores: cores shared out among the workers (default :func:`available_cores`).

    Returns:
        The output directory (merged: results.json, report.md, plots).

    Raises:
        ValueError: a worker stopped on an error (its message, with the worker named), or
            the config cannot be split into shards (``concurrent: true``).
    """
    from ..distributed import refuse_launched
    from .run import check_shardable
    from .shard import merge_shards

    refuse_launched("loravariants compare --workers")  # the workers would inherit its ranks
    check_shardable(config)
    threads = max(1, (available_cores() if cores is None else cores) // workers)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    procs = [
        subprocess.Popen(
            _worker_command(config_file, overrides, index, workers),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            errors="replace",
            env=env,
        )
        for index in range(workers)
    ]
    lines: queue.Queue[tuple[int, str | None]] = queue.Queue()
    for index, proc in enumerate(procs):
        threading.Thread(target=_pump, args=(index, proc.stdout, lines), daemon=True).start()
    try:
        tails = _follow(config, procs, lines, progress, log)
    except BaseException:  # Ctrl-C (or a bug here): never leave workers running
        for proc in procs:
            proc.terminate()
        for proc in procs:
            proc.wait()
        raise
    for index, proc in enumerate(procs):
        if proc.returncode not in (0, 1):  # 1: a run failed, which the merged report shows
            raise ValueError(f"worker {index} of {workers} stopped: {_error_line(tails[index])}")
    return merge_shards(config)


def _worker_command(
    config_file: str | os.PathLike, overrides: Sequence[str], index: int, count: int
) -> list[str]:
    return [
        sys.executable,
        "-m",
        "loravariants",
        "compare",
        "--config",
        str(config_file),
        "--shard",
        f"{index}/{count}",
        "--quiet",
        *overrides,
    ]


def _pump(index: int, stream: IO[str], lines: queue.Queue) -> None:
    """Hand a worker's output lines to the parent, then ``None`` at its end."""
    for line in stream:
        lines.put((index, line.rstrip("\n")))
    lines.put((index, None))


def _follow(
    config: Any,
    procs: list[subprocess.Popen],
    lines: queue.Queue,
    progress: bool,
    log: Callable[[str], None],
) -> list[list[str]]:
    """Forward the workers' lines until every worker has ended; each worker's last lines."""
    from tqdm.auto import tqdm

    keys = [run_key(row, seed) for row, seed in plan_runs(config)]
    out = Path(config.output_dir)
    bar = tqdm(total=len(keys), desc="runs", unit="run", disable=not progress)
    write = bar.write if progress else log
    tails: list[list[str]] = [[] for _ in procs]
    open_streams, last_poll = len(procs), 0.0
    while open_streams:
        try:
            index, line = lines.get(timeout=_POLL_S)
        except queue.Empty:
            index, line = -1, ""
        if index >= 0 and line is None:
            open_streams -= 1
        elif index >= 0:
            tails[index] = [*tails[index][-(_TAIL_LINES - 1) :], line]
            write(f"[worker {index}] {line}")
        if progress and time.monotonic() - last_poll >= _POLL_S:
            last_poll = time.monotonic()
            bar.n = _finished(out, config, keys)
            bar.refresh()
    for proc in procs:
        proc.wait()
    if progress:
        bar.n = _finished(out, config, keys)
    bar.close()
    return tails


def _finished(out: Path, config: Any, keys: list[str]) -> int:
    """How many planned runs the shards' records hold (0 while a file is unreadable)."""
    try:
        records = read_shard_records(out, config)
    except (OSError, ValueError):
        return 0
    return sum(1 for key in keys if key in records)


def _error_line(tail: list[str]) -> str:
    """A worker's error message: its ``error:`` line, else its last line."""
    for line in reversed(tail):
        if ": error: " in line:
            return line.split(": error: ", 1)[1]
    return tail[-1] if tail else "no output (killed?)"
