"""Summarise a comparison's records: per row, mean and 95% CI over seeds of every metric;
paired per-seed differences against the reference row; the parameter-matching warning.
"""

from __future__ import annotations

import functools
import math
from typing import Any, NamedTuple

import numpy as np

from ..adapters.base import VARIANTS, AdapterConfig
from ..config import ExperimentConfig
from ..stats import (
    BootstrapResult,
    final_loss,
    hierarchical_t_interval,
    mean_ci,
    min_max,
    paired_difference,
)

SUMMARY_METRICS = [
    ("trainable_params", "trainable params", "{:,.0f}"),
    ("train_loss_final", "train loss (last 10% of steps)", "{:.3f}"),
    ("tokens_per_s", "train tokens/s", "{:,.0f}"),
    ("peak_mem_mib", "peak mem (MiB)", "{:,.0f}"),
    ("wall_s", "train time (s)", "{:.1f}"),
]


# timings: with fewer than 3 seeds a Student-t interval is meaningless (t_{0.975,1} = 12.7),
# so the table shows min-max instead
TIMING_METRICS = ("tokens_per_s", "wall_s")


# measured for the whole group when rows train concurrently on one base
SHARED_WHEN_CONCURRENT = ("tokens_per_s", "peak_mem_mib", "wall_s")


PARAM_MATCH_TOLERANCE = 0.10

# document resamples per interval: the bootstrap's own error on se is about 1/sqrt(2B) = 1.6%
INTERVAL_RESAMPLES = 2000


def describe_rank(adapter_config: dict[str, Any] | None) -> str:
    """A short description of an adapter's rank(s), e.g. ``r=8 x3 links`` or ``8 exp. r=8``."""
    c = adapter_config or {}
    return _variant_of(c).describe_rank(c)


def describe_targets(adapter_config: dict[str, Any] | None) -> str:
    """The modules an adapter adapts, as its variant describes them (``q_proj,v_proj``)."""
    c = adapter_config or {}
    return _variant_of(c).describe_targets(c)


def _variant_of(fields: dict[str, Any]) -> type[AdapterConfig]:
    """The registered class of a saved config; the base class for an unknown variant."""
    return VARIANTS.get(fields.get("variant"), AdapterConfig)


def train_loss_final(record: dict[str, Any]) -> float | None:
    """A run's training loss: the mean of its last 10% of steps (``record["train_loss_final"]``,
    else :func:`~loravariants.stats.final_loss` of its ``loss_curve``; ``None`` without
    either)."""
    value = record.get("train_loss_final")
    if isinstance(value, int | float):
        return float(value)
    curve = [v for v in record.get("loss_curve") or [] if isinstance(v, int | float)]
    return final_loss(curve) if curve else None


def row_lr(config: Any, spec: Any, ok: list[dict[str, Any]]) -> float | tuple[float, ...] | None:
    """The learning rate a trained row used: ``record["lr"]`` of its finished runs (one value,
    or the sorted values when its seeds differ), else the row's ``lr`` or ``train.lr``."""
    used = sorted({float(r["lr"]) for r in ok if isinstance(r.get("lr"), int | float)})
    if used:
        return used[0] if len(used) == 1 else tuple(used)
    if not spec.trains:
        return None
    fixed = getattr(spec, "lr", None)  # (a hand-built config may have neither)
    default = getattr(getattr(config, "train", None), "lr", None)
    chosen = fixed if fixed is not None else default
    return None if chosen is None else float(chosen)


def per_seed(results: dict[str, dict[str, Any]], row: str, metric: str) -> dict[int, float]:
    """``{seed: value}`` of one row's finished runs; ``metric`` is a record key or ``ppl@N``,
    ``passkey@N``, ``lm_eval@<task>`` (any ``<group>@<key>`` of a record's dict), ``svd.<key>``;
    ``train_loss_final`` falls back to the mean of the last 10% of the loss curve."""
    out = {}
    for r in results.values():
        if r["row"] != row or r.get("status") != "ok":
            continue
        if metric == "train_loss_final":
            value = train_loss_final(r)
        elif "@" in metric:
            group, length = metric.split("@")
            value = r.get(group, {}).get(length)
        elif metric.startswith("svd."):
            value = r.get("svd", {}).get(metric[4:])
        else:
            value = r.get(metric)
        if isinstance(value, (int, float)) and math.isfinite(value):
            out[int(r["seed"])] = float(value)
    return out


def summarize(
    config: ExperimentConfig,
    results: dict[str, dict[str, Any]],
    seed_to_seed: dict[str, dict[str, list[float]]] | None = None,
    reference: str | None = None,
) -> list[dict[str, Any]]:
    """One summary row per comparison row: mean and 95% CI of every metric over seeds.

    Also per row: the variant, its rank(s) and target modules, the adapter parameter count,
    min-max of the timings (``<metric>_range``), whether timings are shared group figures
    (``concurrent``), the ``match_params`` outcome, and (``seed_to_seed``, from
    :func:`seed_to_seed_similarity`) the row's own seed-to-seed subspace similarity;
    ``reference``: the cross-run measures' reference row, flagged ``"reference"``.
    """
    rows = []
    for spec in config.runs:
        runs = [r for r in results.values() if r["row"] == spec.name]
        ok = [r for r in runs if r.get("status") == "ok"]
        failed = [r for r in runs if r.get("status") == "failed"]
        first = ok[0] if ok else {}
        row: dict[str, Any] = {
            "row": spec.name,
            "adapter": spec.adapter,
            "seeds_ok": len(ok),
            "seeds_failed": len(failed),
            "trains": spec.trains,
            "variant": first.get("variant", "none" if not spec.trains else None),
            "rank": describe_rank(first.get("adapter_config")) if spec.trains else "—",
            "targets": describe_targets(first.get("adapter_config")) if spec.trains else "—",
            "trainable": list(spec.trainable),
            "concurrent": any(r.get("concurrent") for r in ok),
            "reference": spec.name == reference,
        }
        if failed:
            row["reason"] = failed[0]["reason"]
        if first.get("match_params"):
            row["match_params"] = first["match_params"]
        metric_keys = [k for k, _, _ in SUMMARY_METRICS] + ["adapter_params"]
        ppl_keys = sorted({k for r in ok for k in r.get("ppl", {})}, key=int)
        pk_keys = sorted({k for r in ok for k in r.get("passkey", {})}, key=int)
        task_keys = sorted({k for r in ok for k in r.get("lm_eval", {})})
        for key in metric_keys:
            row[key] = mean_ci([r.get(key, float("nan")) for r in ok])
        row["train_loss_final"] = mean_ci([train_loss_final(r) for r in ok])
        row["lr"] = row_lr(config, spec, ok)
        for key in TIMING_METRICS:
            row[f"{key}_range"] = min_max([r.get(key) for r in ok])
        for key in ppl_keys:
            row[f"ppl@{key}"] = mean_ci([r.get("ppl", {}).get(key, float("nan")) for r in ok])
        for key in pk_keys:
            row[f"passkey@{key}"] = mean_ci(
                [r.get("passkey", {}).get(key, float("nan")) for r in ok]
            )
        for key in task_keys:  # lm-eval tasks: each task's main metric
            row[f"lm_eval@{key}"] = mean_ci(
                [r.get("lm_eval", {}).get(key, float("nan")) for r in ok]
            )
        for key in ("effective_rank", "energy_top4"):
            vals = [r["svd"].get(key, float("nan")) for r in ok if "svd" in r]
            if vals:
                row[f"svd.{key}"] = mean_ci(vals)
        for key in ("similarity_to_lora", "similarity_to_lora_right", "similarity_random"):
            vals = [r["svd"][key] for r in ok if key in r.get("svd", {})]
            if vals:
                row[f"sim.{key}"] = mean_ci(vals)
        for key, vals in (seed_to_seed or {}).get(spec.name, {}).items():
            name = (
                f"sim.{key}_other_seed" if key.startswith("vs_lora") else f"sim.seed_to_seed_{key}"
            )
            row[name] = mean_ci(vals)
        rows.append(row)
    return rows


def param_match_warning(summary: list[dict[str, Any]]) -> str | None:
    """A warning line when the trained rows differ by more than 10% in adapter parameters or
    adapt different modules; ``None`` when they are matched."""
    trained = [r for r in summary if r.get("trains") and math.isfinite(r["adapter_params"][0])]
    if len(trained) < 2:
        return None
    lo = min(trained, key=lambda r: r["adapter_params"][0])
    hi = max(trained, key=lambda r: r["adapter_params"][0])
    problems = []
    if hi["adapter_params"][0] > (1 + PARAM_MATCH_TOLERANCE) * lo["adapter_params"][0]:
        problems.append(
            f"adapter parameters range from {lo['adapter_params'][0]:,.0f} ({lo['row']}) to "
            f"{hi['adapter_params'][0]:,.0f} ({hi['row']}), "
            f"{hi['adapter_params'][0] / max(lo['adapter_params'][0], 1):.1f}x"
        )
    targets = {r["targets"] for r in trained}
    if len(targets) > 1:
        problems.append(f"they adapt different modules ({'; '.join(sorted(targets))})")
    extra = {tuple(r.get("trainable") or ()) for r in trained}
    if len(extra) > 1:
        problems.append("some also train embeddings/norms (trainable params column)")
    if not problems:
        return None
    return (
        "**Warning: the rows are not parameter-matched**: "
        + "; ".join(problems)
        + ". A difference between rows mixes the method with its capacity; set "
        "`match_params: N` to compare at equal size."
    )


def paired_differences(
    summary: list[dict[str, Any]], results: dict[str, dict[str, Any]]
) -> tuple[str | None, dict[str, dict[str, Any]]]:
    """Every trained row against a reference row, per seed, on each quality metric.

    The reference is the row ``summarize`` flagged (the cross-run measures' reference row),
    else the first trained row. Metrics: final
    train loss, perplexity at every evaluated length and every lm-eval task.

    Returns:
        ``(reference row, {row: {metric: PairedDifference}})``.
    """
    trained = [r["row"] for r in summary if r.get("trains") and r["seeds_ok"]]
    if len(trained) < 2:
        return None, {}
    by_name = {r["row"]: r for r in summary}
    lora = [n for n in trained if by_name[n].get("reference")]
    reference = (lora or trained)[0]
    metrics = ["train_loss_final"] + sorted(
        {k for n in trained for k in by_name[n] if k.startswith("ppl@")},
        key=lambda k: int(k.split("@")[1]),
    )
    metrics += sorted({k for n in trained for k in by_name[n] if k.startswith("lm_eval@")})
    out = {}
    for name in trained:
        if name != reference:
            out[name] = {
                m: paired_difference(per_seed(results, name, m), per_seed(results, reference, m))
                for m in metrics
            }
    return reference, out


class RowPerplexity(NamedTuple):
    """One row's perplexity at one length, with its 95% interval.

    ``method``: ``"seeds × documents"`` (every finished seed's per-document NLL pooled, the
    hierarchical t interval) or ``"seeds only"`` (Student t over the seeds' perplexities:
    records without ``doc_nll``).
    """

    value: float
    low: float
    high: float
    seeds: int
    method: str


@functools.lru_cache(maxsize=512)
def _interval_of_bytes(a: bytes, b: bytes, shape: tuple[int, ...]) -> BootstrapResult:
    xa = np.frombuffer(a, dtype=np.float64).reshape(shape)
    xb = np.frombuffer(b, dtype=np.float64).reshape(shape)
    return hierarchical_t_interval(xa, xb, resamples=INTERVAL_RESAMPLES, seed=0)


def t_interval(a: np.ndarray, b: np.ndarray) -> BootstrapResult:
    """:func:`~loravariants.stats.hierarchical_t_interval` of two ``(seeds, documents, 2)``
    arrays (2000 document resamples, seed 0), remembered: the report is rewritten after every
    run, and a finished run's sums never change, so each interval is computed once."""
    a = np.ascontiguousarray(a, dtype=np.float64)
    b = np.ascontiguousarray(b, dtype=np.float64)
    if a.shape != b.shape:  # (the stats function names the problem)
        return hierarchical_t_interval(a, b, resamples=INTERVAL_RESAMPLES, seed=0)
    return _interval_of_bytes(a.tobytes(), b.tobytes(), a.shape)


def _row_interval(sums: np.ndarray) -> tuple[float, float, float]:
    """``(ppl, low, high)`` of one row's ``(seeds, documents, 2)`` sums: the hierarchical t
    interval of ``ppl(row) - 1``, against a row of zero NLL on the same tokens (perplexity
    exactly 1 in every resample), shifted back by 1."""
    one = sums.copy()
    one[..., 0] = 0.0
    res = t_interval(sums, one)
    return res.estimate + 1, res.low + 1, res.high + 1


def perplexity_by_length(
    config: ExperimentConfig, results: dict[str, dict[str, Any]]
) -> dict[str, dict[str, RowPerplexity]]:
    """``{row: {length: RowPerplexity}}`` for every length a finished run was scored at: the
    perplexity-vs-length curve with its intervals."""
    out: dict[str, dict[str, RowPerplexity]] = {}
    for spec in config.runs:
        ok = [r for r in results.values() if r["row"] == spec.name and r.get("status") == "ok"]
        lengths = sorted({k for r in ok for k in r.get("ppl", {})}, key=int)
        curve = {}
        for length in lengths:
            docs = [(r.get("doc_nll") or {}).get(length) for r in ok]
            shapes = {np.shape(d) for d in docs if d}
            if docs and all(docs) and len(shapes) == 1:
                sums = np.asarray(docs, dtype=np.float64).reshape(len(docs), -1, 2)
                value, low, high = _row_interval(sums)
                curve[length] = RowPerplexity(value, low, high, len(ok), "seeds × documents")
            else:
                mean, half = mean_ci([r.get("ppl", {}).get(length) for r in ok])
                curve[length] = RowPerplexity(mean, mean - half, mean + half, len(ok), "seeds only")
        if curve:
            out[spec.name] = curve
    return out
