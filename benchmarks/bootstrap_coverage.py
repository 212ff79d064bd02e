"""Coverage of the hierarchical bootstrap's 95% interval on synthetic evaluations.

Each synthetic evaluation has ``D`` documents (50-149 tokens, per-token NLL ``4 + N(0, 0.5)``
per document) scored by two rows under ``S`` seeds. Row b's per-token NLL is row a's plus a
per-document shift ``N(0.02, 0.05)``; each seed adds a per-row offset (``N(0, seed_sd)`` for a,
the same plus another ``N(0, seed_sd)`` for b: seeds are paired). The population difference of
perplexities is ``exp(4) - exp(4.02)``. Printed: the share of evaluations whose interval covers
it, side by side: the percentile bootstrap over seeds and documents, the t interval that adds
seed and document variance (``stats.hierarchical_t_interval``), and the Student-t interval
over per-seed differences (``stats.paired_difference``, which ignores document sampling).

    python benchmarks/bootstrap_coverage.py --datasets 400 --resamples 1000
"""

from __future__ import annotations

import argparse
import math

import numpy as np

from loravariants.stats import (
    hierarchical_bootstrap,
    hierarchical_t_interval,
    paired_difference,
)

TRUE = math.exp(4.0) - math.exp(4.02)


def one_evaluation(rng, n_seeds: int, n_docs: int, seed_sd: float):
    tokens = rng.integers(50, 150, n_docs).astype(float)
    difficulty = rng.normal(4.0, 0.5, n_docs)
    shift = rng.normal(0.02, 0.05, n_docs)
    offset_a = rng.normal(0, seed_sd, n_seeds)
    offset_b = offset_a + rng.normal(0, seed_sd, n_seeds)
    a = np.stack([np.stack([tokens * (difficulty + o), tokens], -1) for o in offset_a])
    b = np.stack([np.stack([tokens * (difficulty + shift + o), tokens], -1) for o in offset_b])
    return a, b


def coverage(n_seeds, n_docs, seed_sd, datasets, resamples):
    rng = np.random.default_rng(1)
    boot = hybrid = t_int = 0
    for i in range(datasets):
        a, b = one_evaluation(rng, n_seeds, n_docs, seed_sd)
        res = hierarchical_bootstrap(a, b, resamples=resamples, seed=i)
        boot += res.low <= TRUE <= res.high
        res = hierarchical_t_interval(a, b, resamples=resamples, seed=i)
        hybrid += res.low <= TRUE <= res.high
        ppl = lambda x: np.exp(x[..., 0].sum(-1) / x[..., 1].sum(-1))  # noqa: E731
        d = paired_difference(dict(enumerate(ppl(a))), dict(enumerate(ppl(b))))
        t_int += n_seeds > 1 and d.low <= TRUE <= d.high
    t_cov = t_int / datasets if n_seeds > 1 else float("nan")
    return boot / datasets, hybrid / datasets, t_cov


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--datasets", type=int, default=400)
    parser.add_argument("--resamples", type=int, default=1000)
    parser.add_argument("--docs", type=int, default=100)
    args = parser.parse_args()
    print(f"{args.datasets} evaluations x {args.docs} documents, B = {args.resamples}")
    print("| seeds | seed sd | bootstrap | hierarchical t | t over seeds only |")
    print("|---|---|---|---|---|")
    for n_seeds, seed_sd in [(1, 0.0), (3, 0.0), (3, 0.05), (5, 0.05), (10, 0.05), (20, 0.05)]:
        boot, hybrid, t_cov = coverage(n_seeds, args.docs, seed_sd, args.datasets, args.resamples)
        print(f"| {n_seeds} | {seed_sd} | {boot:.3f} | {hybrid:.3f} | {t_cov:.3f} |", flush=True)


if __name__ == "__main__":
    main()
