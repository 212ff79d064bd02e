"""Plan a comparison: the (row, seed) runs and a shard's share of them, each row's adapter
overrides (parameter matching: the rank whose adapter has the wanted size), and the
evaluation lengths. Nothing here reads or writes a record (that is :mod:`.records`).
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from torch import nn

from ..config import ExperimentConfig, RunSpec, load_adapter_spec
from ..inject import attach

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


@dataclass(frozen=True)
class Shard:
    """Shard ``index`` (0-based) of ``count``."""

    index: int
    count: int

    def __str__(self) -> str:
        return f"{self.index}/{self.count}"


def parse_shard(spec: str) -> Shard:
    """``"i/N"`` -> :class:`Shard`: ``N >= 1`` shards, ``0 <= i < N`` (0-based, as a Kubernetes
    completion index or ``SLURM_ARRAY_TASK_ID`` of ``--array=0-(N-1)``).

    Raises:
        ValueError: one line naming the spec and the allowed form.
    """
    match = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", spec or "")
    if match is None:
        raise ValueError(
            f"--shard must be i/N with whole numbers, 0 <= i < N (e.g. 0/4), got {spec!r}"
        )
    index, count = int(match[1]), int(match[2])
    if count < 1:
        raise ValueError(f"--shard {spec}: the number of shards N must be >= 1")
    if index >= count:
        raise ValueError(
            f"--shard {spec}: the shard index must be in 0..{count - 1} (0-based) for N={count}"
        )
    return Shard(index, count)


def shard_plan(plan: list, shard: Shard) -> list:
    """The shard's share of the plan: every N-th run from position i (rows x seeds spread
    round-robin, so each shard gets a mix of rows and seeds)."""
    return plan[shard.index :: shard.count]


def row_variant(config: ExperimentConfig, row: RunSpec) -> str | None:
    """The variant a row's adapter spec names (``None``: a row without an adapter, full
    fine-tuning included, or a spec that cannot be read, which the run itself then reports)."""
    if not row.has_adapter:
        return None
    try:
        return load_adapter_spec(
            row.adapter, config.adapter_overrides(row), config.spec_dir
        ).variant
    except (OSError, ValueError):
        return None


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
