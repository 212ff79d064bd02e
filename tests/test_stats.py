"""mean_ci, min_max and paired_difference: golden values."""

import math

import pytest

from loravariants.stats import mean_ci, min_max, paired_difference


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
