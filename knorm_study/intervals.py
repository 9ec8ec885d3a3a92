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
