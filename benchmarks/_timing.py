"""Timing helpers shared by the benchmark scripts: interleaved pairs, medians, peak memory."""

from __future__ import annotations

import resource
import statistics
import time
from collections.abc import Callable


def interleaved_medians(
    fns: dict[str, Callable[[], object]], repeats: int, warmup: int = 1
) -> dict[str, float]:
    """Run every function once per round, ``repeats`` rounds; median seconds per function.

    Interleaving (A, B, A, B, ...) spreads the machine's drift over all contenders, which
    matters on shared 2-core machines where single timings vary by 20%.
    """
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(ts) for name, ts in times.items()}


def peak_rss_mib() -> float:
    """Peak resident set size of this process so far, MiB (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
