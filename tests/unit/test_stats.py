"""Paired bootstrap statistics (core/stats.py) on cases whose answers are known."""

from __future__ import annotations

import pytest

from core.stats import Comparison, ConfidenceInterval, bootstrap_ci, compare, paired_difference, paired_ratio

pytestmark = pytest.mark.unit


def test_paired_difference_of_a_constant_shift_is_exact() -> None:
    a = [0.1 * i for i in range(50)]
    b = [x + 0.5 for x in a]
    d = paired_difference(a, b)
    assert d.mean == pytest.approx(0.5) and d.low == pytest.approx(0.5) and d.high == pytest.approx(0.5)
    # the marginal intervals overlap widely; pairing removes the item-to-item spread
    assert bootstrap_ci(a).high > bootstrap_ci(b).low


def test_paired_difference_skips_items_missing_on_either_side() -> None:
    d = paired_difference([1.0, None, 3.0, 4.0], [2.0, 5.0, None, 5.0])
    assert d.n == 2 and d.mean == pytest.approx(1.0)
    with pytest.raises(ValueError, match="same items"):
        paired_difference([1.0], [1.0, 2.0])
    with pytest.raises(ValueError, match="no item"):
        paired_difference([None], [1.0])


def test_identical_variants_have_a_zero_interval_and_no_verdict() -> None:
    items = [0.0, 1.0, 1.0, 0.0, 1.0] * 10
    c = compare("quantized", "uniform", "contains", items, items, variant_bits=5.0, baseline_bits=5.0)
    assert (c.difference.mean, c.difference.low, c.difference.high) == (0.0, 0.0, 0.0)
    assert c.verdict == "no_difference"


def test_verdict_directions_and_bits() -> None:
    better = ConfidenceInterval(0.1, 0.05, 0.15, 100)
    worse = ConfidenceInterval(-0.1, -0.15, -0.05, 100)
    straddles = ConfidenceInterval(0.01, -0.02, 0.04, 100)
    assert Comparison("q", "u", "contains", better, 5.0, 5.0).verdict == "beats"
    assert Comparison("q", "u", "contains", worse, 5.0, 5.0).verdict == "loses"
    assert Comparison("q", "u", "contains", straddles, 5.0, 5.0).verdict == "no_difference"
    # a lower NLL is better: a negative difference wins
    assert Comparison("q", "u", "gold_nll", worse, 5.0, 5.0).verdict == "beats"
    assert Comparison("q", "u", "gold_nll", better, 5.0, 5.0).verdict == "loses"
    # a win bought with more bits is not a win
    assert Comparison("q", "u", "contains", better, 5.1, 5.0).verdict == "beats_with_more_bits"
    assert Comparison("q", "u", "contains", better, 4.9, 5.0).verdict == "beats"
    data = Comparison("q", "u", "gold_nll", worse, 5.0, 5.0).to_dict()
    assert data["lower_is_better"] is True and data["verdict"] == "beats"


def test_compare_is_variant_minus_baseline() -> None:
    mine = [1.0] * 30 + [0.0] * 10
    theirs = [1.0] * 20 + [0.0] * 20
    c = compare("quantized", "random", "contains", mine, theirs, variant_bits=5.0, baseline_bits=5.0, seed=1)
    assert c.difference.mean == pytest.approx(0.25) and c.difference.low > 0 and c.verdict == "beats"


def test_paired_ratio_retained() -> None:
    fp = [1.0] * 40 + [0.0] * 10
    q = [1.0] * 30 + [0.0] * 20
    r = paired_ratio(q, fp)
    assert r.mean == pytest.approx(0.75) and r.low < 0.75 < r.high and r.high <= 1.0
    assert paired_ratio(fp, fp).low == 1.0 == paired_ratio(fp, fp).high
    assert paired_ratio(q, [0.0] * 50) is None


def test_bootstrap_is_seeded() -> None:
    values = [float(i % 7) for i in range(60)]
    assert bootstrap_ci(values, seed=3) == bootstrap_ci(values, seed=3)
    assert bootstrap_ci(values, seed=3) != bootstrap_ci(values, seed=4)
