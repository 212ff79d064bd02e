"""The comparison: every row x seed through the one loop, on one base, data and budget.

A pipeline of small modules, each reading the one before it::

    plan.py     rows x seeds; adapter overrides (match_params); resumption check
    env.py      Environment: base model, tokenizer and data, loaded once
    run.py      compare(): for each run, fresh base -> context -> attach -> train -> save
    measure.py  peak memory, perplexity, passkey, SVD summary, layer stats, similarity
    summary.py  mean +- 95% CI per row, paired differences, parameter-matching warning
    report.py   results.json / results.csv / report.md (its Findings: findings.py), plots
                (plots.py)

Fairness by construction: every row sees the same base checkpoint, the same packed training
blocks in the same order (the seed fixes it), the same token budget and the same evaluation
tokens; throughput and peak memory are measured the same way for all rows
(:class:`PeakMemory`). A run that fails is recorded with its reason and the others go on;
finished runs are never redone: a rerun of the same command resumes the missing ones.
"""

from ..stats import mean_ci
from .env import Environment, load_environment
from .measure import PeakMemory, factor_similarity, seed_to_seed_similarity
from .plan import (
    MATCH_TOLERANCE,
    count_adapter_params,
    eval_lengths,
    match_rank,
    plan_runs,
    run_key,
)
from .report import CSV_FIELDS, RESULTS_SCHEMA_VERSION, summary_table, write_outputs
from .run import compare
from .summary import (
    PARAM_MATCH_TOLERANCE,
    SHARED_WHEN_CONCURRENT,
    SUMMARY_METRICS,
    TIMING_METRICS,
    describe_rank,
    paired_differences,
    param_match_warning,
    per_seed,
    summarize,
)

__all__ = [
    "CSV_FIELDS",
    "Environment",
    "MATCH_TOLERANCE",
    "PARAM_MATCH_TOLERANCE",
    "PeakMemory",
    "RESULTS_SCHEMA_VERSION",
    "SHARED_WHEN_CONCURRENT",
    "SUMMARY_METRICS",
    "TIMING_METRICS",
    "compare",
    "count_adapter_params",
    "describe_rank",
    "eval_lengths",
    "factor_similarity",
    "load_environment",
    "match_rank",
    "mean_ci",
    "paired_differences",
    "param_match_warning",
    "per_seed",
    "plan_runs",
    "run_key",
    "seed_to_seed_similarity",
    "summarize",
    "summary_table",
    "write_outputs",
]
