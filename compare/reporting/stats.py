"""Statistics over seeds: mean, standard deviation and a 95% confidence interval.

The interval is Student's t-interval, mean +- t(0.975, n-1) * s / sqrt(n), with
s the sample standard deviation (ddof 1): seeds are few (3 to 5), so the normal
approximation's 1.96 would be far too narrow (t is 4.30 for n = 3). With one
seed there is no spread to measure: std and the interval are NaN, and reports
say the number rests on one seed.
"""

from __future__ import annotations

import math

import numpy as np
from scipy import stats as _scipy_stats

from . import metrics

CONFIDENCE = 0.95


def seed_stats(values, confidence: float = CONFIDENCE) -> dict:
    """{n, mean, std, ci_low, ci_high} of the finite values (one per seed)."""
    x = np.asarray([v for v in values if v is not None and math.isfinite(v)], dtype=np.float64)
    n = len(x)
    if n == 0:
        return {"n": 0, "mean": math.nan, "std": math.nan, "ci_low": math.nan, "ci_high": math.nan}
    mean = float(x.mean())
    if n == 1:
        return {"n": 1, "mean": mean, "std": math.nan, "ci_low": math.nan, "ci_high": math.nan}
    std = float(x.std(ddof=1))
    half = float(_scipy_stats.t.ppf(0.5 + confidence / 2, n - 1)) * std / math.sqrt(n)
    return {"n": n, "mean": mean, "std": std, "ci_low": mean - half, "ci_high": mean + half}


def metric_bounds(metric: str) -> tuple:
    """(low, high) of the values a metric (a column name) can take, from the registry (compare.reporting.metrics);
    (-inf, inf) for a column that is no metric. A t-interval from few seeds can reach past them; reports show it
    clipped to them."""
    return metrics.bounds(metric)


def difference_bounds(metric: str) -> tuple:
    """(low, high) of a difference of two values of `metric` (a paired comparison)."""
    low, high = metric_bounds(metric)
    return low - high, high - low


def clipped(low: float, high: float, bounds: tuple) -> tuple:
    """An interval clipped to what the metric can be (NaN stays NaN)."""
    if math.isnan(low) or math.isnan(high):
        return low, high
    return max(low, bounds[0]), min(high, bounds[1])


def median_interval(n: int, confidence: float = 0.95):
    """(k, coverage): the distribution-free interval for a median from n values is (x_(k), x_(n+1-k)) of the
    sorted values, with the largest k whose coverage 1 - 2 P(Binomial(n, 1/2) < k) is at least `confidence`;
    None when even (min, max) covers less (n < 6 at 95%)."""
    best = None
    for k in range(1, n // 2 + 1):
        coverage = 1 - 2 * float(_scipy_stats.binom.cdf(k - 1, n, 0.5))
        if coverage >= confidence:
            best = (k, coverage)
    return best


def paired_ratio(numerator, denominator) -> dict:
    """The median of the per-repeat ratios numerator[i] / denominator[i], with its distribution-free 95%
    interval (median_interval; NaN below 6 repeats).

    The loops of one repeat run next to each other, so a ratio within a repeat cancels the machine's
    slow drift (on a shared 2-core machine one epoch's figure moves by 10-30% from repeat to repeat);
    the median, unlike a mean, is not dragged by the odd epoch that a neighbour's burst slowed down."""
    ratios = sorted(a / b for a, b in zip(numerator, denominator))
    found = median_interval(len(ratios))
    low, high = (ratios[found[0] - 1], ratios[-found[0]]) if found else (math.nan, math.nan)
    return {"": float(np.median(ratios)), "_low": low, "_high": high}
