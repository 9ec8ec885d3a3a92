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

