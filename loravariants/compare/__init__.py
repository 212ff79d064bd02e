"""The comparison: every row x seed through the one loop, on one base, data and budget.

A pipeline in its data flow as in its files; each stage reads what the one before it made
and never calls back into it::

    plan.py      rows x seeds (a shard's share); adapter overrides, rank matching
                 (match_params); evaluation lengths
    records.py   the records store: run keys and folders, results.json and the shards' files
                 read (checked) and written, merging, the same-experiment check (resumption)
    env.py       Environment: base model, tokenizer and data, loaded once
    protocol.py  how one row trains: its rate, training length and batch, full fine-tuning
    lr_select.py lr_grid: each row's rate chosen on the held-out selection documents
    run.py       compare(): for each planned run not done yet, one record (train, save,
                 measure.py's per-run measures: perplexity, passkey, SVD, layer statistics)
    crossrun.py  the measures across runs, once per write set from the saved adapters:
                 similarity to the seed's reference run (the one rule: the first finished
                 run of the reference variant), seed-to-seed similarity
    summary.py   mean +- 95% CI per row, perplexity against length, paired differences,
                 parameter-matching warning
    contrasts.py the contrasts (a row against its comparator), Holm families, and what else
                 two contrasted rows differ in
    findings.py  each contrast tested (seeds x documents, McNemar), Holm, verdicts
    report.py    rendering only: results.json / results.csv / report.md, plots (plots.py)
    shard.py     --shard i/N locks, --merge (records -> cross-run measures -> report)
    workers.py   --workers N: the shards as N local processes, then the merge

Fairness by construction: every row sees the same base checkpoint, the same packed training
blocks in the same order (the seed fixes it), the same token budget and the same evaluation
tokens; throughput and peak memory are measured the same way for all rows
(:class:`PeakMemory`). A run that fails is recorded with its reason and the others go on;
finished runs are never redone: a rerun of the same command resumes the missing ones.
"""

from ..stats import mean_ci
from .crossrun import CrossRunMeasures, reference_runs, seed_to_seed_similarity
from .env import Environment, load_environment
from .measure import PeakMemory, factor_similarity
from .plan import (
    MATCH_TOLERANCE,
    count_adapter_params,
    eval_lengths,
    match_rank,
    plan_runs,
)
from .records import RESULTS_SCHEMA_VERSION, run_folder, run_key
from .report import CSV_FIELDS, summary_table, write_outputs
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
    "CrossRunMeasures",
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
    "reference_runs",
    "run_folder",
    "run_key",
    "seed_to_seed_similarity",
    "summarize",
    "summary_table",
    "write_outputs",
]
