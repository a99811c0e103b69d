"""Intervals, in plain Python (the worker computes them for its rows, the report again from the raw samples the rows
keep): Student-t 95% intervals on means of independent samples (timed runs, perplexity windows), and the paired
interval of a difference over the same windows.

Every quantity here is positive (times, perplexities, ratios): intervals are taken on the log scale (the delta
method: mean × exp(±t × se / mean)), so they never go below zero, and none is given from fewer than MIN_SAMPLES
samples (with two, Student's t is 12.7 and the interval says nothing)."""
from __future__ import annotations

import math
from statistics import NormalDist, fmean, stdev

# two-sided 95%: the 0.975 quantile of Student's t by degrees of freedom (1..30); beyond, the normal's 1.96 grows
# into them smoothly enough (30 -> 2.042)
T975 = [12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131,
        2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042]
METHOD = "Student-t 95% interval over independent samples (timed runs, or perplexity windows), on the log scale"
MIN_SAMPLES = 3


def t975(df: int) -> float:
    if df < 1:
        return math.inf
    if df <= len(T975):
        return T975[df - 1]
    z = NormalDist().inv_cdf(0.975)  # Cornish-Fisher correction of the normal quantile for larger df
    return z + (z ** 3 + z) / (4 * df) + (5 * z ** 5 + 16 * z ** 3 + 3 * z) / (96 * df ** 2)


def mean_interval(values: list[float]) -> tuple[float, float, float] | None:
    """(mean, low, high) of a 95% t-interval on the mean of positive values, on the log scale; None with fewer than
    MIN_SAMPLES values or a mean that is not positive."""
    values = [float(v) for v in values]
    if len(values) < MIN_SAMPLES:
        return None
    m = fmean(values)
    if m <= 0:
        return None
    rel = t975(len(values) - 1) * stdev(values) / math.sqrt(len(values)) / m
    return m, m * math.exp(-rel), m * math.exp(rel)


def relative_halfwidth(values: list[float]) -> float | None:
    """The interval's half-width on the log scale, t × se / mean: ±2% means within about 2% either way."""
    values = [float(v) for v in values]
    if len(values) < MIN_SAMPLES or fmean(values) <= 0:
        return None
    return t975(len(values) - 1) * stdev(values) / math.sqrt(len(values)) / fmean(values)


def ratio_interval(sums: list[float], counts: list[float]) -> tuple[float, float, float] | None:
    """(Σsums/Σcounts, low, high): a 95% interval on a ratio of totals over independent clusters (perplexity
    windows of any lengths: the loss of a window over its scored tokens), by the ratio estimator's variance."""
    n = len(sums)
    if n < MIN_SAMPLES or n != len(counts):
        return None
    total = float(sum(counts))
    r = sum(sums) / total
    var = n / (n - 1) * sum((s - r * c) ** 2 for s, c in zip(sums, counts)) / total ** 2
    half = t975(n - 1) * math.sqrt(var)
    return r, r - half, r + half


def perplexity_interval(window_nll: list[float], window_tokens: list[int]) -> tuple[float, float, float] | None:
    """(perplexity, low, high) from per-window summed cross-entropy and scored tokens: the interval on the mean loss
    per token, through exp."""
    iv = ratio_interval(window_nll, window_tokens)
    return None if iv is None else tuple(math.exp(x) for x in iv)


def paired_log_ratio(a_nll: list[float], b_nll: list[float], tokens: list[int]) -> tuple[float, float, float] | None:
    """ln(ppl_a / ppl_b) and its paired 95% interval over the same windows: the interval on the mean per-token loss
    difference, window by window."""
    if len(a_nll) != len(b_nll) or len(a_nll) != len(tokens):
        return None
    return ratio_interval([x - y for x, y in zip(a_nll, b_nll)], tokens)


def percentile(sorted_values: list[float], q: float) -> float:
    """Linear interpolation between closest ranks (numpy's default) of an already sorted list."""
    if not sorted_values:
        return math.nan
    pos = (len(sorted_values) - 1) * q
    lo = int(math.floor(pos))
    hi = min(lo + 1, len(sorted_values) - 1)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (pos - lo)
