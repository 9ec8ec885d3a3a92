"""Probes of knorm_study/intervals.py (see knorm_study/fingerprint.py): per-document aggregates
(t intervals), the paired bootstrap and its verdicts at and around their boundaries, Wilson
intervals; all on synthetic numbers."""

from __future__ import annotations

from knorm_study.fingerprint import probe


def _rows() -> list[dict]:
    """Per-document rows shaped like 03/04/05's: a list-valued ``by`` key (skip_layers), a None key
    (kept by ``dropna=False``), groups of 1, 2, 3 and 6 documents in a first-seen order that is not
    sorted."""
    rows = []
    spec = [("random", [0, 1], 6), ("knorm", [0, 1], 3), ("knorm", [], 2), (None, [0], 1), ("high_norm", [0, 1], 1)]
    for g, (policy, skip, n) in enumerate(spec):
        for d in range(n):
            rows.append({"policy": policy, "skip_layers": skip, "document": f"doc{d}",
                         "ppl": 10.0 + 1.7 * g + 0.37 * d * d - 0.11 * d, "kl": 0.01 * (g + 1) * (1 + ((d * 7) % 5)),
                         "acc": int((d + g) % 3 == 0)})
    rows.insert(4, rows.pop())   # interleave: the last group's row first seen early
    return rows


@probe("intervals")
def aggregate_groups() -> dict:
    """``aggregate`` by (policy, skip_layers) and by policy alone: mean, t half-width (NaN for one
    document), min, max, count, group order."""
    from knorm_study import intervals

    rows = _rows()
    two = intervals.aggregate(rows, ["policy", "skip_layers"], ["ppl", "kl", "acc"])
    one = intervals.aggregate(rows, ["policy"], ["ppl"])
    return {"by_policy_skip": two.to_dict("records"), "by_policy": one.to_dict("records"),
            "columns": sorted(two.columns)}


@probe("intervals")
def paired_bootstrap_cases() -> dict:
    """``paired_bootstrap`` for one unit, two, four (clear but below ``MIN_BOOTSTRAP_UNITS``), five,
    clear negative, straddling zero; a second seed, another level and ``n_boot``; and
    ``paired_by_unit`` over partly shared, string-keyed units and none shared."""
    from knorm_study import intervals

    cases = {
        "one": [0.3],
        "two": [0.2, 0.5],
        "four_positive": [0.21, 0.34, 0.27, 0.30],
        "five_positive": [0.21, 0.34, 0.27, 0.30, 0.25],
        "six_negative": [-0.12, -0.31, -0.2, -0.18, -0.26, -0.09],
        "eight_straddle": [0.4, -0.35, 0.12, -0.05, 0.3, -0.28, 0.02, -0.1],
        "nine_skewed": [0.01, 0.02, 0.015, 0.03, 0.9, 0.011, 0.02, 0.025, -0.004],
    }
    out = {k: intervals.paired_bootstrap(v) for k, v in cases.items()}
    out["seed3"] = intervals.paired_bootstrap(cases["nine_skewed"], seed=3)
    out["level90_nboot500"] = intervals.paired_bootstrap(cases["eight_straddle"], n_boot=500, level=0.9)
    a = {f"d{i}": 2.0 + 0.13 * i * i for i in range(9)}
    b = {f"d{i}": 1.9 + 0.11 * i * i + (0.05 if i % 2 else -0.04) for i in range(2, 12)}
    out["by_unit"] = intervals.paired_by_unit(a, b)
    out["by_unit_kwargs"] = intervals.paired_by_unit(a, b, n_boot=300, seed=7)
    out["by_unit_none_shared"] = intervals.paired_by_unit({"x": 1.0}, {"y": 2.0})
    out["min_units"] = intervals.MIN_BOOTSTRAP_UNITS
    out["verdicts"] = {k: [intervals.enough(v), intervals.positive(v), intervals.negative(v)]
                       for k, v in out.items() if isinstance(v, dict)}
    return out


@probe("intervals")
def verdict_boundaries() -> dict:
    """``enough``, ``positive`` and ``negative`` on hand-made results: at n 4 and 5, an interval
    touching 0 from either side, above, below, straddling."""
    from knorm_study import intervals

    cases = [(n, lo, hi) for n in (4, 5, 30) for lo, hi in
             ((0.1, 0.3), (0.0, 0.3), (-0.3, -0.1), (-0.3, 0.0), (-0.2, 0.2), (1e-12, 1e-11))]
    return {f"n{n} [{lo}, {hi}]": [intervals.enough(b), intervals.positive(b), intervals.negative(b)]
            for n, lo, hi in cases for b in [{"n": n, "mean": (lo + hi) / 2, "lo": lo, "hi": hi}]}


@probe("intervals")
def wilson() -> dict:
    """``wilson_interval`` at 0, all, a few and most successes, small and large n, another z."""
    from knorm_study import intervals

    cases = [(0, 10), (10, 10), (3, 10), (1, 1), (0, 1), (17, 40), (40, 40), (39, 40), (2, 200), (120, 200)]
    out = {f"{s}/{n}": list(intervals.wilson_interval(s, n)) for s, n in cases}
    out["17/40 z=1"] = list(intervals.wilson_interval(17, 40, z=1.0))
    out["3/10 z=2.576"] = list(intervals.wilson_interval(3, 10, z=2.576))
    return out
