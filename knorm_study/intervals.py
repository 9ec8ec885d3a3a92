"""Uncertainty: intervals over documents and over samples."""

from __future__ import annotations

import math
import numbers
from typing import Any, Sequence

import knorm_lib as kl
def aggregate(rows: Sequence[dict[str, Any]], by: Sequence[str], metrics: Sequence[str]) -> Any:
    """Mean, 95 % t-interval half-width, min, max and count of ``metrics`` over the rows of each
    ``by`` group (rows are usually one per document), as a pandas DataFrame."""
    import pandas as pd
    from scipy import stats

    df = pd.DataFrame(rows)
    df = df.assign(**{k: df[k].map(lambda v: tuple(v) if isinstance(v, list) else v) for k in by})
    out = []
    for key, group in df.groupby(list(by), sort=False, dropna=False):
        row = dict(zip(by, key if isinstance(key, tuple) else (key,)))
        for m in metrics:
            vals = group[m].astype(float)
            n = len(vals)
            half = float(stats.t.ppf(0.975, n - 1) * vals.std(ddof=1) / math.sqrt(n)) if n > 1 else float("nan")
            row.update({m: vals.mean(), f"{m}_ci95": half, f"{m}_min": vals.min(), f"{m}_max": vals.max()})
        row["n_docs"] = len(group)
        out.append(row)
    return pd.DataFrame(out)


# Below this many units a percentile bootstrap cannot hold its level (n units give at most n**n
# resamples; with 2 the "interval" is the range of the two values): nothing is called resolved.
MIN_BOOTSTRAP_UNITS = 5


def paired_bootstrap(diffs: Sequence[float], n_boot: int = 10_000, seed: int = 0, level: float = 0.95) -> dict[str, Any]:
    """Mean of paired per-unit differences (one per document: policy A minus policy B on the same
    document) with a percentile bootstrap interval that resamples the units. ``resolved``: the
    interval excludes 0 and there are at least ``MIN_BOOTSTRAP_UNITS`` units; with fewer than 2
    there is no interval."""
    import numpy as np

    kl._positive_int("n_boot", n_boot)
    if not 0 < level < 1:
        raise ValueError(f"level={level!r}: must be in (0, 1)")
    d = np.asarray(diffs, dtype=float)
    if d.ndim != 1 or d.size == 0 or not np.isfinite(d).all():
        raise ValueError(f"diffs: need a non-empty 1-D sequence of finite numbers, got {diffs!r}")
    if d.size < 2:
        return {"n": 1, "mean": float(d[0]), "lo": math.nan, "hi": math.nan, "resolved": False}
    means = d[np.random.default_rng(seed).integers(0, d.size, (n_boot, d.size))].mean(1)
    lo, hi = np.quantile(means, [(1 - level) / 2, (1 + level) / 2])
    return {"n": int(d.size), "mean": float(d.mean()), "lo": float(lo), "hi": float(hi),
            "resolved": bool((lo > 0 or hi < 0) and d.size >= MIN_BOOTSTRAP_UNITS)}


def paired_by_unit(a: dict[Any, float], b: dict[Any, float], **bootstrap: Any) -> dict[str, Any]:
    """``paired_bootstrap`` of ``a[u] - b[u]`` over the units (documents) both dicts hold; with no
    shared unit, ``n`` 0 and no mean or interval."""
    units = sorted(set(a) & set(b))
    if not units:
        return {"n": 0, "mean": math.nan, "lo": math.nan, "hi": math.nan, "resolved": False}
    return paired_bootstrap([a[u] - b[u] for u in units], **bootstrap)


def enough(b: dict[str, Any]) -> bool:
    """Whether a ``paired_bootstrap`` result has the units to resolve anything."""
    return b["n"] >= MIN_BOOTSTRAP_UNITS


def positive(b: dict[str, Any]) -> str:
    """The verdict on "the mean is positive" from a ``paired_bootstrap`` result: "holds" when its
    interval lies above 0, "fails" when it lies below, else (or below ``MIN_BOOTSTRAP_UNITS``
    units) "not resolved"."""
    if not enough(b):
        return "not resolved"
    return "holds" if b["lo"] > 0 else "fails" if b["hi"] < 0 else "not resolved"


def negative(b: dict[str, Any]) -> str:
    """The verdict on "the mean is negative" (a correlation): ``positive`` with the sign turned."""
    return positive({**b, "lo": -b["hi"], "hi": -b["lo"]})


def wilson_interval(successes: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """Wilson score interval (default 95 %) for a success rate of ``successes`` out of ``n``."""
    kl._positive_int("n", n)
    if not isinstance(successes, numbers.Integral) or not 0 <= successes <= n:
        raise ValueError(f"successes={successes!r}: must be an int in 0 .. n={n}")
    p, z2 = successes / n, z * z
    centre = (p + z2 / (2 * n)) / (1 + z2 / n)
    half = z * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n)) / (1 + z2 / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def errorbars(ax: Any, table: Any, by: str, x: str, y: str, fmt: str = "-o", label: str = "{}", **kwargs: Any) -> None:
    """Plot one line per ``by`` group of ``table``: ``y`` against ``x`` with the 95 % interval that
    ``aggregate`` writes (column ``{y}_ci95``) as error bars. ``label`` formats the group's key."""
    for key, sub in table.groupby(by, sort=False):
        sub = sub.sort_values(x)
        ax.errorbar(sub[x], sub[y], yerr=sub[f"{y}_ci95"].fillna(0), fmt=fmt, capsize=3, label=label.format(key),
                    **kwargs)
