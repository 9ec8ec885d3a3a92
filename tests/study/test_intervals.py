"""knorm_study.intervals."""

from __future__ import annotations

import pytest

from knorm_study import intervals


def test_wilson_interval():
    """Wilson 95 % interval: inside [0, 1], contains the rate, known values, bad input refused."""
    lo, hi = intervals.wilson_interval(5, 10)
    assert lo == pytest.approx(0.2366, abs=1e-3) and hi == pytest.approx(0.7634, abs=1e-3)
    assert intervals.wilson_interval(0, 5)[0] == 0.0 and intervals.wilson_interval(5, 5)[1] == 1.0
    assert intervals.wilson_interval(5, 5)[0] > 0.5
    with pytest.raises(ValueError, match="successes"):
        intervals.wilson_interval(6, 5)
    with pytest.raises(ValueError, match="n="):
        intervals.wilson_interval(0, 0)



def test_paired_bootstrap():
    """Paired bootstrap over documents: the interval holds the mean, resolves a consistent
    difference, does not resolve one that changes sign, is reproducible, refuses bad input."""
    consistent = intervals.paired_bootstrap([0.10, 0.12, 0.08, 0.11, 0.09, 0.10])
    assert consistent["n"] == 6 and consistent["mean"] == pytest.approx(0.10)
    assert 0.08 <= consistent["lo"] <= consistent["mean"] <= consistent["hi"] <= 0.12 and consistent["resolved"]
    few = intervals.paired_bootstrap([0.10, 0.12, 0.08])  # consistent, but too few documents to resolve
    assert few["lo"] > 0 and not few["resolved"]
    mixed = intervals.paired_bootstrap([0.3, -0.2, 0.1, -0.25, 0.05])
    assert mixed["lo"] < 0 < mixed["hi"] and not mixed["resolved"]
    assert intervals.paired_bootstrap([0.3, -0.2, 0.1], seed=1) == intervals.paired_bootstrap([0.3, -0.2, 0.1], seed=1)
    one = intervals.paired_bootstrap([0.5])
    assert one["n"] == 1 and one["lo"] != one["lo"] and not one["resolved"]
    for bad in ([], [float("nan")], [[1.0, 2.0]]):
        with pytest.raises(ValueError, match="diffs"):
            intervals.paired_bootstrap(bad)
    with pytest.raises(ValueError, match="level"):
        intervals.paired_bootstrap([1.0, 2.0], level=1.5)


def test_paired_by_unit_pairs_the_shared_units_only():
    """a[u] - b[u] over the units both hold, whatever the dicts' order; none shared: n 0, no interval."""
    a = {"d1": 1.0, "d2": 2.0, "d3": 3.0, "only_a": 100.0}
    b = {"d3": 2.5, "d1": 0.5, "d2": 1.5, "only_b": -100.0}
    assert intervals.paired_by_unit(a, b) == intervals.paired_bootstrap([0.5, 0.5, 0.5])
    assert intervals.paired_by_unit(b, a)["mean"] == pytest.approx(-0.5)
    none = intervals.paired_by_unit({"x": 1.0}, {"y": 1.0})
    assert none["n"] == 0 and none["mean"] != none["mean"] and not none["resolved"]
