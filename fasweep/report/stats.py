"""Statistics over seeds (scipy.stats): 95% intervals of a mean, comparisons with a baseline, equivalence tests
(TOST), Holm's adjustment.

Pure functions on lists of per-seed values. Undefined quantities are None (never a made-up number): an
interval needs two seeds, a t-test two seeds on each side (or two shared seeds when paired).
"""

from __future__ import annotations

import math
import warnings
from collections import Counter
from collections.abc import Hashable, Sequence
from dataclasses import dataclass

import numpy as np
from scipy import stats

CONFIDENCE = 0.95
ALPHA = 1 - CONFIDENCE  # a (Holm-adjusted) p below it decides
# A percentile interval lies within the seeds' range, which misses a symmetric distribution's mean with probability
# 2·(1/2)^n: at n = 3 it covers at most 75%. Below this n the report refuses `--ci bootstrap`.
BOOTSTRAP_MIN_N = 10
BOOTSTRAP_RESAMPLES = 10_000
BOOTSTRAP_SEED = 0  # fixed: the same runs give the same report

Interval = tuple[float, float]


def _finite(value: float) -> float | None:
    return float(value) if math.isfinite(value) else None


def mean_ci(values: Sequence[float], method: str = "t") -> Interval | None:
    """95% confidence interval of the mean; None for fewer than two values.

    `t`: mean ± t(0.975, n−1)·sd/√n. `bootstrap`: percentile bootstrap of the mean (10,000 resamples,
    fixed seed); a ValueError below BOOTSTRAP_MIN_N values.
    """
    x = np.asarray(values, dtype=float)
    if method == "bootstrap" and len(x) < BOOTSTRAP_MIN_N:
        raise ValueError(f"a bootstrap interval needs n >= {BOOTSTRAP_MIN_N}; got n = {len(x)}")
    if len(x) < 2:
        return None
    mean = float(x.mean())
    if np.ptp(x) == 0:  # identical seeds: the interval is the point (scipy's formulas would warn, then agree)
        return mean, mean
    if method == "bootstrap":
        res = stats.bootstrap(
            (x,),
            np.mean,
            confidence_level=CONFIDENCE,
            n_resamples=BOOTSTRAP_RESAMPLES,
            method="percentile",
            rng=np.random.default_rng(BOOTSTRAP_SEED),
        )
        return float(res.confidence_interval.low), float(res.confidence_interval.high)
    half = float(stats.t.ppf((1 + CONFIDENCE) / 2, len(x) - 1)) * float(x.std(ddof=1)) / math.sqrt(len(x))
    return mean - half, mean + half


def verdict(reference: float, ci: Interval | None) -> str | None:
    """Where a published number lies relative to an interval: inside, above or below it (None without one)."""
    if ci is None:
        return None
    low, high = ci
    return "above" if reference > high else "below" if reference < low else "inside"


@dataclass(frozen=True)
class Comparison:
    """A condition (X) against a baseline (Y): difference of means, its 95% CI, a t-test's p, P(X better), and
    the TOST p of equivalence within ±margin (None without a margin or a test)."""

    diff: float
    ci: Interval | None
    p: float | None
    p_improve: float
    paired: bool
    p_tost: float | None = None


def prob_improvement(x: Sequence[float], y: Sequence[float], lower_is_better: bool = False) -> float:
    """P(X better than Y) over all seed pairs (x_i, y_j), ties counting ½ (rliable's probability of
    improvement): the Mann-Whitney U of X over nx·ny; `lower_is_better` counts x_i < y_j."""
    u = float(stats.mannwhitneyu(x, y).statistic) / (len(x) * len(y))  # #(x > y) + ½ #(x = y)
    return 1 - u if lower_is_better else u


def compare(
    x: Sequence[float],
    y: Sequence[float],
    *,
    pairs: tuple[Sequence[float], Sequence[float]] | None = None,
    lower_is_better: bool = False,
    margin: float | None = None,
) -> Comparison | None:
    """X − Y with a 95% CI and a two-sided p: Welch's t-test on the means, or, given `pairs` (the values of the
    seeds both ran, in the same order), the paired t-test on those pairs; with a `margin`, the TOST p of the same
    test (`tost`). None when a side has no value."""
    if not len(x) or not len(y):
        return None
    improve = prob_improvement(x, y, lower_is_better)
    if pairs is not None:
        a, b = (np.asarray(v, dtype=float) for v in pairs)
        diff, enough, spread = float(np.mean(a - b)), len(a) >= 2, np.ptp(a - b) > 0
    else:
        diff, enough = float(np.mean(x) - np.mean(y)), len(x) >= 2 and len(y) >= 2
        spread = np.ptp(x) > 0 or np.ptp(y) > 0
    if not enough:  # one seed on a side (or one shared seed): no interval, no test
        return Comparison(diff, None, None, improve, pairs is not None)
    if not spread:  # every seed alike: the interval is the point, t is 0/0 or infinite
        return Comparison(diff, (diff, diff), None, improve, pairs is not None)
    with warnings.catch_warnings():  # nearly identical seeds: scipy warns about precision, its answer stands
        warnings.simplefilter("ignore", RuntimeWarning)
        res = stats.ttest_rel(a, b) if pairs is not None else stats.ttest_ind(x, y, equal_var=False)
        low, high = res.confidence_interval(CONFIDENCE)
        p_tost = None if margin is None else tost(x, y, margin, pairs=pairs)
    return Comparison(diff, (float(low), float(high)), _finite(res.pvalue), improve, pairs is not None, p_tost)


def tost(
    x: Sequence[float], y: Sequence[float], margin: float, *, pairs: tuple[Sequence[float], Sequence[float]] | None
) -> float | None:
    """Two one-sided tests (Schuirmann 1987) of |X − Y| < margin: p = max(p of X − Y > −margin, p of X − Y <
    margin), each a one-sided Welch t-test, or paired t-test on `pairs`. A small p says the difference lies within
    ±margin. None where the t-test is undefined (fewer than two values a side, no spread)."""
    if pairs is not None:
        d = np.subtract(*(np.asarray(v, dtype=float) for v in pairs))
        if len(d) < 2 or np.ptp(d) == 0:
            return None
        above = stats.ttest_1samp(d + margin, 0.0, alternative="greater").pvalue
        below = stats.ttest_1samp(d - margin, 0.0, alternative="less").pvalue
    else:
        a, b = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
        if len(a) < 2 or len(b) < 2 or (np.ptp(a) == 0 and np.ptp(b) == 0):
            return None
        above = stats.ttest_ind(a + margin, b, equal_var=False, alternative="greater").pvalue
        below = stats.ttest_ind(a - margin, b, equal_var=False, alternative="less").pvalue
    return _finite(max(float(above), float(below)))


def conclusion(p_holm: float | None, p_tost_holm: float | None, margin: float) -> str:
    """What a comparison decides, both p's Holm-adjusted over one family: `equivalent within ±m` (TOST p < ALPHA),
    else `different` (t-test p < ALPHA), else `undecided`."""
    if p_tost_holm is not None and p_tost_holm < ALPHA:
        return f"equivalent within ±{margin:g}"
    return "different" if p_holm is not None and p_holm < ALPHA else "undecided"


def pair_by_seed(
    x: Sequence[tuple[Hashable, float]], y: Sequence[tuple[Hashable, float]]
) -> tuple[list[float], list[float]] | None:
    """The values of the seeds both sides ran, in X's order, from (seed, value) lists; None when fewer than two
    seeds are shared or a side ran a seed twice (pooled launches): then the comparison is unpaired."""
    counts = [Counter(seed for seed, _ in side) for side in (x, y)]
    if any(n > 1 for c in counts for n in c.values()):
        return None
    ys = dict(y)
    shared = [(v, ys[seed]) for seed, v in x if seed in ys]
    if len(shared) < 2:
        return None
    return [a for a, _ in shared], [b for _, b in shared]


def holm(pvalues: Sequence[float | None]) -> list[float]:
    """Holm's step-down adjustment (Holm 1979), in the input order: the i-th smallest of m p-values becomes
    max over j ≤ i of min(1, (m − j + 1)·p_(j)). (scipy has only BH/BY; this is statsmodels' `holm`.) A None (a
    comparison of the family that could not be tested) counts as p = 1: it still counts in m."""
    p = np.asarray([1.0 if v is None else v for v in pvalues], dtype=float)
    order = np.argsort(p, kind="stable")
    steps = (len(p) - np.arange(len(p))) * p[order]
    adjusted = np.empty_like(p)
    adjusted[order] = np.minimum(1.0, np.maximum.accumulate(steps))
    return adjusted.tolist()
