"""loravariants.stats against known answers: hand-computed cases and scipy references."""

import itertools
import math

import numpy as np
import pytest
from scipy import stats as scipy_stats

from loravariants.stats import (
    MIN_PASSKEY_PROMPTS,
    HolmAdjusted,
    bootstrap_interval,
    check_passkey_prompts,
    contrast_verdict,
    final_loss,
    hierarchical_bootstrap,
    hierarchical_t_interval,
    holm,
    holm_family,
    mcnemar_exact,
    mde_from_se,
    mean_ci,
    min_max,
    minimum_detectable_effect,
    paired_difference,
    paired_power,
    seeds_for_mde,
)


def test_mean_ci_golden():
    mean, half = mean_ci([1.0, 2.0, 3.0])
    assert mean == 2.0
    # t_{0.975,2} = 4.302653, sd = 1
    assert half == pytest.approx(4.302653 / math.sqrt(3), rel=1e-6)
    assert mean_ci([5.0]) == (5.0, 0.0)
    assert all(math.isnan(x) for x in mean_ci([None, float("nan")]))


def test_mean_ci_is_reexported_by_compare():
    from loravariants import compare

    assert compare.mean_ci is mean_ci


def test_min_max():
    assert min_max([3.0, None, 1.0, float("inf")]) == (1.0, 3.0)


def test_paired_difference_removes_shared_seed_spread():
    # large seed-to-seed spread shared by both rows, constant offset 0.1 between them
    a = {0: 10.1, 1: 20.1, 2: 30.1}
    b = {0: 10.0, 1: 20.0, 2: 30.0}
    d = paired_difference(a, b)
    assert d.seeds == (0, 1, 2)
    assert d.mean == pytest.approx(0.1)
    assert d.half_width == pytest.approx(0.0, abs=1e-9)
    assert d.resolved
    # unpaired intervals overlap completely: the rows look indistinguishable without pairing
    (ma, ha), (mb, hb) = mean_ci(list(a.values())), mean_ci(list(b.values()))
    assert ma - ha < mb + hb


def test_paired_difference_not_resolved_when_ci_contains_zero():
    d = paired_difference({0: 1.0, 1: 2.0, 2: 3.0}, {0: 1.5, 1: 1.5, 2: 2.5})
    assert d.mean == pytest.approx(0.1666667, rel=1e-5)
    assert d.low < 0 < d.high
    assert not d.resolved
    assert "not resolved" in d.describe()


def test_paired_difference_uses_common_seeds_only():
    d = paired_difference({0: 1.0, 1: 2.0, 5: 9.0}, {1: 1.0, 0: 0.0, 3: 7.0})
    assert d.seeds == (0, 1)
    assert d.differences == (1.0, 1.0)
    assert d.resolved


def test_paired_difference_one_seed_is_never_resolved():
    d = paired_difference({0: 2.0}, {0: 1.0})
    assert d.mean == 1.0 and not d.resolved and math.isnan(d.half_width)
    assert "one seed" in d.describe()
    assert paired_difference({0: 1.0}, {1: 1.0}).describe() == "no common seed"


# --------------------------------------------------------------------------------------------
# hierarchical_bootstrap / bootstrap_interval


def _rows(n_seeds, n_docs, shift=0.0, seed=0, seed_sd=0.0):
    """Two rows of per-(seed, document) ``(nll_sum, tokens)``: row b's per-token NLL is row
    a's plus ``shift`` plus per-document noise; both share the documents' difficulty."""
    rng = np.random.default_rng(seed)
    tokens = rng.integers(50, 150, n_docs).astype(float)
    difficulty = rng.normal(4.0, 0.5, n_docs)
    a, b = [], []
    for _ in range(n_seeds):
        offset = rng.normal(0, seed_sd)
        a.append(np.stack([tokens * (difficulty + offset), tokens], -1))
        noise = rng.normal(shift, 0.05, n_docs)
        b.append(np.stack([tokens * (difficulty + offset + noise), tokens], -1))
    return np.stack(a), np.stack(b)


def test_bootstrap_identical_rows_give_exactly_zero():
    a, _ = _rows(3, 50)
    res = hierarchical_bootstrap(a, a.copy(), resamples=2000)
    assert (res.estimate, res.low, res.high, res.se) == (0.0, 0.0, 0.0, 0.0)
    assert res.p_value == 1.0


def test_bootstrap_untrained_rows_get_an_interval_from_documents_alone():
    # one seed (untrained rows: seeds change nothing), different per-document NLL
    a, b = _rows(1, 100, shift=0.01)
    res = hierarchical_bootstrap(a[0], b[0], resamples=2000)
    ppl = lambda x: math.exp(x[..., 0].sum() / x[..., 1].sum())  # noqa: E731
    assert res.estimate == pytest.approx(ppl(a) - ppl(b), rel=1e-12)
    assert res.low < res.estimate < res.high
    assert res.high - res.low > 0.01 * abs(res.estimate)
    assert res.se > 0


def test_bootstrap_is_deterministic_in_its_seed():
    a, b = _rows(3, 40, shift=0.02)
    assert hierarchical_bootstrap(a, b, seed=3) == hierarchical_bootstrap(a, b, seed=3)
    assert hierarchical_bootstrap(a, b, seed=3) != hierarchical_bootstrap(a, b, seed=4)


def test_bootstrap_p_value_of_two_documents_is_the_hand_computed_one():
    # one seed, two documents: a resample draws {1,1}, {1,2} or {2,2} with probabilities
    # 1/4, 1/2, 1/4. Per-token NLL (a, b): document 1 (1.0, 1.1), document 2 (2.0, 1.0), equal
    # token counts: a - b is < 0 only for {1,1}, so P(diff <= 0) = 1/4 and p = 2 * 1/4 = 0.5
    a = np.array([[10.0, 10.0], [20.0, 10.0]])
    b = np.array([[11.0, 10.0], [10.0, 10.0]])
    res = hierarchical_bootstrap(a, b, resamples=20_000, seed=0)
    assert res.p_value == pytest.approx(0.5, abs=0.02)  # binomial sd of 2 * P: 0.006
    assert res.low == pytest.approx(math.e - math.exp(1.1))
    assert res.high == pytest.approx(math.exp(2.0) - math.e)


def test_bootstrap_variance_of_a_mean_over_documents_is_the_plug_in_one():
    # a linear statistic (the mean of x_d, one token each): the bootstrap variance over D
    # documents is exactly sum_d (x_d - mean)^2 / D^2
    x = np.random.default_rng(0).normal(size=60)
    rows = np.stack([x, np.ones_like(x)], -1)
    res = bootstrap_interval(rows, statistic=lambda s: s[..., 0] / s[..., 1], resamples=20_000)
    assert res.estimate == pytest.approx(x.mean())
    assert res.se**2 == pytest.approx(((x - x.mean()) ** 2).sum() / x.size**2, rel=0.04)
    assert math.isnan(res.p_value)


def test_bootstrap_resamples_seeds_too():
    # documents identical for every seed, seeds differ: the spread comes from seeds only;
    # two seeds: {1,1}, {1,2}, {2,2} as for documents
    a = np.array([[[10.0, 10.0]], [[20.0, 10.0]]])  # (2 seeds, 1 document, 2)
    b = np.array([[[11.0, 10.0]], [[10.0, 10.0]]])
    res = hierarchical_bootstrap(a, b, resamples=20_000)
    assert res.p_value == pytest.approx(0.5, abs=0.02)
    one = bootstrap_interval(a[:, 0], resamples=100)  # one seed, two documents
    assert one.low == pytest.approx(math.e) and one.high == pytest.approx(math.exp(2.0))


def test_bootstrap_shares_one_document_draw_across_seeds():
    # seeds and documents are crossed: every seed scores the same documents, so copies of
    # one seed add no information and leave the interval as it was (drawing documents afresh
    # for each seed would shrink the standard error by sqrt(4))
    a, b = _rows(1, 80, shift=0.01)
    one = hierarchical_bootstrap(a, b, resamples=20_000)
    four = hierarchical_bootstrap(np.repeat(a, 4, 0), np.repeat(b, 4, 0), resamples=20_000)
    assert four.estimate == pytest.approx(one.estimate, rel=1e-12)
    assert four.se == pytest.approx(one.se, rel=0.05)


def test_bootstrap_coverage_of_a_document_sampling_difference():
    # 200 synthetic evaluations: per-document per-token NLL shifts by N(0.02, 0.05) between
    # the rows; the population difference is exp(4) - exp(4.02) (difficulty has mean 4 and
    # is independent of the documents' lengths)
    rng = np.random.default_rng(1)
    true = math.exp(4.0) - math.exp(4.02)
    covered = 0
    for i in range(200):
        tokens = rng.integers(50, 150, 100).astype(float)
        difficulty = rng.normal(4.0, 0.5, 100)
        delta = rng.normal(0.02, 0.05, 100)
        a = np.stack([tokens * difficulty, tokens], -1)
        b = np.stack([tokens * (difficulty + delta), tokens], -1)
        res = hierarchical_bootstrap(a, b, resamples=500, seed=i)
        covered += res.low <= true <= res.high
    assert 0.90 <= covered / 200 <= 0.99


def test_t_interval_with_one_document_per_seed_is_the_paired_t_test():
    # one document: nothing to resample there, and a linear statistic (mean of x, one token
    # each) makes the pooled difference the mean per-seed difference: scipy's paired t-test
    rng = np.random.default_rng(2)
    xa, xb = rng.normal(5, 1, 4), rng.normal(4, 1, 4)
    rows = [np.stack([x, np.ones(4)], -1)[:, None, :] for x in (xa, xb)]  # (4 seeds, 1, 2)
    res = hierarchical_t_interval(*rows, statistic=lambda s: s[..., 0] / s[..., 1])
    ref = scipy_stats.ttest_rel(xa, xb)
    assert res.estimate == pytest.approx((xa - xb).mean(), rel=1e-12)
    assert res.p_value == pytest.approx(ref.pvalue, rel=1e-9)
    assert res.dof == pytest.approx(3.0)
    low, high = ref.confidence_interval(0.95)
    assert (res.low, res.high) == (pytest.approx(low, rel=1e-9), pytest.approx(high, rel=1e-9))


def test_t_interval_of_untrained_rows_is_the_documents_bootstrap():
    a, b = _rows(1, 100, shift=0.01)
    res = hierarchical_t_interval(np.repeat(a, 3, 0), np.repeat(b, 3, 0), resamples=4000)
    boot = hierarchical_bootstrap(a, b, resamples=4000)
    assert res.estimate == pytest.approx(boot.estimate, rel=1e-12)
    assert res.se == pytest.approx(boot.se, rel=0.05)  # no seed spread: documents only
    assert res.high - res.estimate == pytest.approx(1.959964 * res.se, rel=1e-6)
    same = hierarchical_t_interval(a, a.copy())
    assert (same.low, same.high, same.p_value) == (0.0, 0.0, 1.0)
    # one seed, one document: nothing to resample, so no test
    lone = hierarchical_t_interval(a[:, :1], b[:, :1])
    assert lone.estimate != 0 and lone.se == 0 and math.isnan(lone.p_value)


def test_t_interval_coverage_with_three_noisy_seeds():
    # seeds carry most of the spread (per-row offsets N(0, 0.05) per token), 3 seeds: the
    # interval still covers the population difference about 95% of the time
    rng = np.random.default_rng(1)
    true = math.exp(4.0) - math.exp(4.02)
    covered = 0
    for i in range(200):
        tokens = rng.integers(50, 150, 100).astype(float)
        difficulty = rng.normal(4.0, 0.5, 100)
        delta = rng.normal(0.02, 0.05, 100)
        offset_a = rng.normal(0, 0.05, 3)
        offset_b = offset_a + rng.normal(0, 0.05, 3)
        a = np.stack([np.stack([tokens * (difficulty + o), tokens], -1) for o in offset_a])
        b = np.stack([np.stack([tokens * (difficulty + delta + o), tokens], -1) for o in offset_b])
        res = hierarchical_t_interval(a, b, resamples=300, seed=i)
        covered += res.low <= true <= res.high
    assert 0.90 <= covered / 200 <= 0.99


def test_bootstrap_rejects_bad_input():
    a, b = _rows(2, 10)
    with pytest.raises(ValueError, match="same shape"):
        hierarchical_bootstrap(a, b[:1])
    with pytest.raises(ValueError, match="shape"):
        hierarchical_bootstrap(a[0, :, 0], b[0, :, 0])
    bad = a.copy()
    bad[0, 0, 0] = np.nan
    with pytest.raises(ValueError, match="non-finite"):
        hierarchical_bootstrap(bad, b)
    with pytest.raises(ValueError, match="resamples"):
        hierarchical_bootstrap(a, b, resamples=0)
    with pytest.raises(ValueError, match="confidence"):
        bootstrap_interval(a, confidence=1.0)


# --------------------------------------------------------------------------------------------
# holm


def test_holm_textbook_case():
    # sorted 0.005, 0.01, 0.03, 0.04 -> 4 x 0.005, 3 x 0.01, 2 x 0.03, max(0.06, 1 x 0.04)
    adjusted = holm([0.01, 0.04, 0.03, 0.005])
    assert adjusted == pytest.approx([0.03, 0.06, 0.06, 0.02])
    assert holm([]) == [] and holm([0.3]) == [0.3]
    assert holm([0.5, 0.6]) == pytest.approx([1.0, 1.0])


def test_holm_equals_closed_testing_with_bonferroni():
    # Holm is the closed testing procedure over Bonferroni tests: the adjusted p of H_i is
    # the largest Bonferroni p over every intersection of hypotheses that contains H_i
    p = np.random.default_rng(0).uniform(0, 0.2, 6).tolist()
    expected = []
    for i in range(len(p)):
        others = [j for j in range(len(p)) if j != i]
        worst = 0.0
        for size in range(len(others) + 1):
            for subset in itertools.combinations(others, size):
                members = [i, *subset]
                worst = max(worst, min(1.0, len(members) * min(p[j] for j in members)))
        expected.append(worst)
    assert holm(p) == pytest.approx(expected)


def test_holm_issue_example_does_not_survive_36_cells():
    # COLA - LoRA at p = 0.04 among 36 cells, even as the smallest p: 36 x 0.04 > 1
    family = {"cola-lora": 0.04, **{f"cell{i}": 0.5 for i in range(35)}}
    adjusted = holm_family(family)
    assert adjusted["cola-lora"] == HolmAdjusted(0.04, 1.0, 36)


def test_holm_rejects_non_p_values():
    with pytest.raises(ValueError, match=r"p_values\[1\]"):
        holm([0.1, 1.5])
    with pytest.raises(ValueError, match="p-value"):
        holm([float("nan")])


# --------------------------------------------------------------------------------------------
# mcnemar_exact


def _paired_outcomes(n, both, a_only, b_only):
    a = [1] * both + [1] * a_only + [0] * b_only
    b = [1] * both + [0] * a_only + [1] * b_only
    return a + [0] * (n - len(a)), b + [0] * (n - len(b))


def test_mcnemar_hand_computed_case():
    a, b = _paired_outcomes(100, both=30, a_only=8, b_only=2)
    res = mcnemar_exact(a, b)
    assert (res.n, res.a_only, res.b_only) == (100, 8, 2)
    # 2 * P(X <= 2), X ~ Binomial(10, 1/2): 2 * (1 + 10 + 45) / 1024
    assert res.p_value == pytest.approx(112 / 1024)
    assert res.difference == pytest.approx(0.06)
    # Agresti-Min: 1/2 added to each cell, n~ = 102
    se = math.sqrt(11 - 36 / 102) / 102
    assert res.low == pytest.approx(6 / 102 - 1.959964 * se, rel=1e-6)
    assert res.high == pytest.approx(6 / 102 + 1.959964 * se, rel=1e-6)
    assert res.enough_prompts


def test_mcnemar_agrees_with_the_binomial_tail():
    rng = np.random.default_rng(0)
    for _ in range(5):
        a, b = rng.random(150) < 0.5, rng.random(150) < 0.4
        res = mcnemar_exact(a, b)
        k, m = res.a_only, res.a_only + res.b_only
        tail = min(scipy_stats.binom.cdf(k, m, 0.5), scipy_stats.binom.sf(k - 1, m, 0.5))
        assert res.p_value == pytest.approx(min(1.0, 2 * tail), rel=1e-9)


def test_mcnemar_without_discordant_prompts_keeps_a_width():
    res = mcnemar_exact([0] * 100, [0] * 100)  # both rows at the floor
    assert res.p_value == 1.0 and res.difference == 0.0
    assert res.low < 0 < res.high
    assert not mcnemar_exact([1] * 99, [0] * 99).enough_prompts


def test_passkey_prompt_minimum_and_bad_input():
    check_passkey_prompts(MIN_PASSKEY_PROMPTS)
    with pytest.raises(ValueError, match="at least 100 prompts"):
        check_passkey_prompts(10)
    with pytest.raises(ValueError, match="differ in length"):
        mcnemar_exact([1, 0], [1])
    with pytest.raises(ValueError, match="True/False"):
        mcnemar_exact([1, 2], [1, 0])


# --------------------------------------------------------------------------------------------
# contrast_verdict


def test_verdict_floor_and_ceiling_come_before_the_test():
    assert contrast_verdict(0.0, 0.0, 1.0, floor=0.0) == "uninformative (floor)"
    assert contrast_verdict(0.0, 0.01, 0.001, floor=0.02) == "uninformative (floor)"
    assert contrast_verdict(1.0, 1.0, 1.0, ceiling=1.0) == "uninformative (ceiling)"
    assert contrast_verdict(0.0, 0.5, 0.001, floor=0.0) == "resolved"
    assert contrast_verdict(0.0, 0.5, 0.2, floor=0.0, mde=0.31) == "not resolved (MDE 0.31)"
    assert contrast_verdict(250.0, 245.0, 0.06) == "not resolved"
    assert contrast_verdict(250.0, 245.0, 0.05) == "resolved"
    assert contrast_verdict(250.0, 245.0, float("nan"), mde=2.5) == "not resolved (MDE 2.5)"


# --------------------------------------------------------------------------------------------
# minimum_detectable_effect / paired_power / seeds_for_mde


def test_mde_hand_case_matches_the_issue():
    # sd of paired differences 1.5 ppl, 5 seeds: (t_{.975,4} + t_{.8,4}) * 1.5 / sqrt(5)
    mde = minimum_detectable_effect(1.5, 5)
    assert mde == pytest.approx((2.776445 + 0.940965) * 1.5 / math.sqrt(5), rel=1e-6)
    assert mde == pytest.approx(2.494, abs=1e-3)
    assert mde_from_se(1.0) == pytest.approx(1.959964 + 0.841621, rel=1e-6)
    assert mde_from_se(1.5 / math.sqrt(5), dof=4) == pytest.approx(mde, rel=1e-12)
    assert mde_from_se(1.0, dof=math.inf) == mde_from_se(1.0)
    # a stricter (Holm) level needs a larger effect
    assert minimum_detectable_effect(1.5, 5, alpha=0.05 / 6) > mde


def test_power_at_the_mde_is_about_80_percent():
    assert paired_power(minimum_detectable_effect(1.0, 30), 1.0, 30) == pytest.approx(0.8, abs=3e-3)
    assert paired_power(minimum_detectable_effect(1.0, 3), 1.0, 3) == pytest.approx(0.766, abs=1e-3)
    # simulation: 20,000 paired t-tests on 10 pairs with true mean = the MDE
    n, sd = 10, 1.5
    mde = minimum_detectable_effect(sd, n)
    diffs = np.random.default_rng(0).normal(mde, sd, size=(20_000, n))
    rejected = scipy_stats.ttest_1samp(diffs, 0.0, axis=1).pvalue <= 0.05
    assert rejected.mean() == pytest.approx(paired_power(mde, sd, n), abs=0.015)
    assert rejected.mean() == pytest.approx(0.8, abs=0.02)


def test_seeds_for_mde_is_the_smallest_sufficient_n():
    n = seeds_for_mde(1.5, 2.5)
    assert n == 5
    assert minimum_detectable_effect(1.5, n) <= 2.5 < minimum_detectable_effect(1.5, n - 1)
    n = seeds_for_mde(1.5, 0.02 * 250)
    assert minimum_detectable_effect(1.5, n) <= 5.0 < minimum_detectable_effect(1.5, n - 1)
    assert seeds_for_mde(0.0, 1.0) == 2
    with pytest.raises(ValueError, match="target"):
        seeds_for_mde(1.0, 0.0)
    with pytest.raises(ValueError, match="n must be at least 2"):
        minimum_detectable_effect(1.0, 1)
    with pytest.raises(ValueError, match="power"):
        minimum_detectable_effect(1.0, 5, power=1.0)


# --------------------------------------------------------------------------------------------
# final_loss


def test_final_loss_is_the_mean_of_the_last_tenth():
    assert final_loss([5.0] * 18 + [1.0, 3.0]) == 2.0  # 20 steps: the last 2
    assert final_loss([9.0] * 13 + [1.0, 2.0]) == 1.5  # 15 steps: ceil(1.5) = 2
    assert final_loss([4.0, 3.0]) == 3.0  # at least one step
    assert final_loss([1.0, 2.0, 3.0, 4.0], fraction=0.5) == 3.5
    with pytest.raises(ValueError, match="at least one"):
        final_loss([])
    with pytest.raises(ValueError, match="fraction"):
        final_loss([1.0], fraction=0.0)
