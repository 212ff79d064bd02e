"""What compare prints as a grid runs: one line per finished run and an ETA for the rest.

    [3/12] lora/seed1: ok in 41.2 s, final loss 3.2145, ppl@1024 45.21 | ETA 6m 10s (9 runs)

The ETA is the sum over the runs still to do of their row's mean time so far in this process
(rows differ: an untrained row takes seconds, a MixLoRA row minutes), the mean over every run
so far for a row not yet timed; runs finished before (kept from an earlier invocation) cost
nothing.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

__all__ = ["GridClock", "main_metric", "run_line"]


def main_metric(record: dict[str, Any]) -> tuple[str, float] | None:
    """A record's headline: perplexity at its longest length, else its first lm-eval task."""
    ppl = record.get("ppl") or {}
    if ppl:
        length = max(ppl, key=int)
        return f"ppl@{length}", float(ppl[length])
    tasks = record.get("lm_eval") or {}
    if tasks:
        task = sorted(tasks)[0]
        return task, float(tasks[task])
    return None


def run_line(record: dict[str, Any]) -> str:
    """``ok in 41.2 s, final loss 3.2145, ppl@1024 45.21`` (or ``failed in 2.0 s``)."""
    parts = [f"{record.get('status', '?')} in {record.get('elapsed_s', float('nan')):.1f} s"]
    if record.get("status") == "ok":
        loss = record.get("final_loss")
        if isinstance(loss, (int, float)) and math.isfinite(loss):
            parts.append(f"final loss {loss:.4f}")
        found = main_metric(record)
        if found is not None:
            parts.append(f"{found[0]} {found[1]:.4g}")
        for task, value in sorted((record.get("lm_eval") or {}).items()):
            if found is None or task != found[0]:
                parts.append(f"{task} {value:.4g}")
    return ", ".join(parts)


def _duration(seconds: float) -> str:
    seconds = max(0, round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h {minutes:02d}m"
    return f"{minutes}m {secs:02d}s" if minutes else f"{secs}s"


class GridClock:
    """Times of the runs done in this process, by row, and the ETA of those left."""

    def __init__(self) -> None:
        self.times: dict[str, list[float]] = {}

    def add(self, row: str, seconds: float) -> None:
        self.times.setdefault(row, []).append(float(seconds))

    def eta(self, remaining: Sequence[str]) -> str:
        """`` | ETA 6m 10s (9 runs)`` for the rows of the runs still to do; ``""`` when
        nothing is left or nothing was timed yet."""
        if not remaining or not self.times:
            return ""
        every = [t for ts in self.times.values() for t in ts]
        overall = sum(every) / len(every)
        total = sum(
            sum(self.times[r]) / len(self.times[r]) if r in self.times else overall
            for r in remaining
        )
        runs = f"{len(remaining)} run{'s' if len(remaining) != 1 else ''}"
        return f" | ETA {_duration(total)} ({runs})"
