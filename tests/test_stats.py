"""fasweep.report.stats and the statistics of the report tables, recomputed independently on fixed per-seed values.

The reference side never calls scipy: Student t's CDF is integrated from its density (Simpson's rule) and
inverted by bisection, then checked against the closed forms for 1 and 2 degrees of freedom; Welch, paired t,
Holm and P(X > Y) are the textbook formulas in plain numpy / Python loops.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest

from fasweep.report.collect import Sweep, Trial
from fasweep.report.stats import (
    BOOTSTRAP_MIN_N,
    compare,
    conclusion,
    holm,
    mean_ci,
    pair_by_seed,
    prob_improvement,
    tost,
    verdict,
)
from fasweep.report.summary import summarize_conditions
from fasweep.report.tables import condition_table

A = [0.81, 0.78, 0.84, 0.80, 0.79]  # per-seed accuracies of a condition, seeds 0..4
B = [0.70, 0.74, 0.69, 0.73, 0.71]  # its baseline, same seeds
C = [0.76, 0.70, 0.79, 0.74, 0.72]  # close to A seed by seed: pairing narrows the interval


# --- Student t without scipy ----------------------------------------------------------------------------------


def t_pdf(x: np.ndarray, df: float) -> np.ndarray:
    norm = math.exp(math.lgamma((df + 1) / 2) - math.lgamma(df / 2)) / math.sqrt(df * math.pi)
    return norm * (1 + x**2 / df) ** (-(df + 1) / 2)


def t_cdf(x: float, df: float, steps: int = 20_000) -> float:
    """0.5 + the integral of the density from 0 to x (composite Simpson)."""
    grid = np.linspace(0.0, abs(x), steps + 1)
    f = t_pdf(grid, df)
    area = (grid[1] - grid[0]) / 3 * (f[0] + f[-1] + 4 * f[1:-1:2].sum() + 2 * f[2:-1:2].sum())
    return 0.5 + math.copysign(area, x)


def t_quantile(q: float, df: float) -> float:
    low, high = 0.0, 200.0
    for _ in range(60):
        mid = (low + high) / 2
        low, high = (mid, high) if t_cdf(mid, df) < q else (low, mid)
    return (low + high) / 2


def t_p_two_sided(t: float, df: float) -> float:
    return 2 * (1 - t_cdf(abs(t), df))


def test_reference_t_matches_closed_forms() -> None:
    """df = 1 is Cauchy (quantile tan(π(q − ½))); df = 2 has t = (2q − 1)/√(2q(1 − q))."""
    assert t_quantile(0.975, 1) == pytest.approx(math.tan(math.pi * 0.475), rel=1e-6)
    assert t_quantile(0.975, 2) == pytest.approx(0.95 / math.sqrt(2 * 0.975 * 0.025), rel=1e-7)
    assert t_cdf(3.0, 1) == pytest.approx(0.5 + math.atan(3.0) / math.pi, abs=1e-9)
    assert t_quantile(0.975, 4) == pytest.approx(2.7764451, rel=1e-6)  # printed tables


# --- intervals of a mean --------------------------------------------------------------------------------------


def t_interval(values: list[float]) -> tuple[float, float]:
    x = np.array(values)
    half = t_quantile(0.975, len(x) - 1) * x.std(ddof=1) / math.sqrt(len(x))
    return x.mean() - half, x.mean() + half


@pytest.mark.parametrize("n", [2, 3, 4, 5])
def test_student_t_interval(n: int) -> None:
    assert mean_ci(A[:n]) == pytest.approx(t_interval(A[:n]), rel=1e-7)


def test_interval_undefined_or_degenerate() -> None:
    assert mean_ci([]) is None
    assert mean_ci([0.8]) is None
    with pytest.raises(ValueError, match="needs n >= 10"):
        mean_ci(A, "bootstrap")  # n = 5: a percentile interval would cover far less than 95%
    assert mean_ci([0.5, 0.5, 0.5]) == (0.5, 0.5)
    low, high = mean_ci(A[:2])  # n = 2: defined, but t(0.975, 1) = 12.7 makes it wide
    assert high - low > 10 * abs(A[0] - A[1])


def test_bootstrap_interval() -> None:
    """Percentile bootstrap of the mean for n ≥ 10 (recomputed with numpy's own resampling)."""
    rng = np.random.default_rng(12345)
    many = [*A, *B]
    assert len(many) == BOOTSTRAP_MIN_N
    x = np.array(many)
    means = x[rng.integers(0, len(x), (40_000, len(x)))].mean(axis=1)
    expected = np.percentile(means, [2.5, 97.5])
    low, high = mean_ci(many, "bootstrap")
    sd = x.std(ddof=1)
    assert abs(low - expected[0]) < 0.05 * sd and abs(high - expected[1]) < 0.05 * sd
    assert (low, high) == mean_ci(many, "bootstrap")  # fixed seed: the same report twice
    assert (low, high) != pytest.approx(t_interval(many), rel=1e-3)  # not the t interval in disguise


def test_bootstrap_coverage_at_small_n_is_why_it_is_refused() -> None:
    """The README's reason, by hand: a percentile interval lies within the seeds' range, and the range of n draws
    from a symmetric distribution misses its mean with probability 2·(1/2)^n: 25% at n = 3."""
    rng = np.random.default_rng(7)
    draws = rng.normal(0.0, 1.0, (20_000, 3))
    inside = ((draws.min(axis=1) <= 0) & (draws.max(axis=1) >= 0)).mean()
    assert inside == pytest.approx(0.75, abs=0.01)


# --- comparisons ----------------------------------------------------------------------------------------------


def welch(x: list[float], y: list[float]) -> tuple[float, tuple[float, float], float]:
    x_, y_ = np.array(x), np.array(y)
    vx, vy = x_.var(ddof=1) / len(x_), y_.var(ddof=1) / len(y_)
    se = math.sqrt(vx + vy)
    df = (vx + vy) ** 2 / (vx**2 / (len(x_) - 1) + vy**2 / (len(y_) - 1))
    diff = x_.mean() - y_.mean()
    half = t_quantile(0.975, df) * se
    return diff, (diff - half, diff + half), t_p_two_sided(diff / se, df)


def paired(x: list[float], y: list[float]) -> tuple[float, tuple[float, float], float]:
    d = np.array(x) - np.array(y)
    se = d.std(ddof=1) / math.sqrt(len(d))
    half = t_quantile(0.975, len(d) - 1) * se
    return d.mean(), (d.mean() - half, d.mean() + half), t_p_two_sided(d.mean() / se, len(d) - 1)


def test_welch() -> None:
    for x, y in ((A, B), (C, B), (A[:2], B[:3]), (A[:3], C)):
        got = compare(x, y)
        diff, ci, p = welch(x, y)
        assert not got.paired
        assert got.diff == pytest.approx(diff, abs=1e-12)
        assert got.ci == pytest.approx(ci, rel=1e-6)
        assert got.p == pytest.approx(p, rel=1e-5, abs=1e-9)


def test_paired_by_seed_and_narrower() -> None:
    got = compare(A, C, pairs=(A, C))
    diff, ci, p = paired(A, C)
    assert got.paired
    assert got.diff == pytest.approx(diff, abs=1e-12)
    assert got.ci == pytest.approx(ci, rel=1e-6)
    assert got.p == pytest.approx(p, rel=1e-5, abs=1e-9)
    unpaired = compare(A, C)
    assert got.ci[1] - got.ci[0] < 0.5 * (unpaired.ci[1] - unpaired.ci[0])  # A and C move together seed by seed


def test_pair_by_seed() -> None:
    x = [("0", 0.8), ("1", 0.7), ("2", 0.9)]
    y = [("2", 0.5), ("0", 0.6), ("3", 0.1)]
    assert pair_by_seed(x, y) == ([0.8, 0.9], [0.6, 0.5])  # shared seeds 0 and 2, in X's order
    assert pair_by_seed(x, [("0", 0.6), ("5", 0.1)]) is None  # one shared seed: no paired test
    assert pair_by_seed([*x, ("0", 0.75)], y) is None  # seed 0 twice (pooled launches)


def test_comparison_undefined_parts() -> None:
    one = compare([0.6], B)  # n = 1: a difference, no interval, no test
    assert one.diff == pytest.approx(0.6 - np.mean(B)) and one.ci is None and one.p is None
    flat = compare([0.5, 0.5], [0.4, 0.4])  # no spread: the interval is the point, t is undefined
    assert flat.ci == pytest.approx((0.1, 0.1)) and flat.p is None
    assert compare([], B) is None
    lone_pair = compare(A[:2], B[:2], pairs=(A[:1], B[:1]))
    assert lone_pair.paired and lone_pair.ci is None and lone_pair.p is None


def t_sf(t: float, df: float) -> float:
    """P(T > t), from the Simpson-integrated CDF."""
    return 1 - t_cdf(t, df)


def tost_by_hand(x: list[float], y: list[float], m: float, paired: bool) -> float:
    """TOST from the textbook: t_low = (diff + m)/se, t_high = (diff − m)/se; p = max(P(T > t_low), P(T < t_high))."""
    if paired:
        d = np.subtract(x, y)
        diff, se, df = d.mean(), d.std(ddof=1) / math.sqrt(len(d)), len(d) - 1
    else:
        x_, y_ = np.array(x), np.array(y)
        vx, vy = x_.var(ddof=1) / len(x_), y_.var(ddof=1) / len(y_)
        diff, se = x_.mean() - y_.mean(), math.sqrt(vx + vy)
        df = (vx + vy) ** 2 / (vx**2 / (len(x_) - 1) + vy**2 / (len(y_) - 1))
    return max(t_sf((diff + m) / se, df), 1 - t_sf((diff - m) / se, df))


@pytest.mark.parametrize("paired", [False, True])
@pytest.mark.parametrize(("x", "y", "m"), [(A, C, 0.1), (A, C, 0.03), (C, B, 0.05), (A, B, 0.2)])
def test_tost_matches_the_textbook(x: list[float], y: list[float], m: float, paired: bool) -> None:
    expected = tost_by_hand(x, y, m, paired)
    got = tost(x, y, m, pairs=(x, y) if paired else None)
    assert got == pytest.approx(expected, rel=1e-5, abs=1e-9)
    assert compare(x, y, pairs=(x, y) if paired else None, margin=m).p_tost == got
    assert compare(x, y).p_tost is None  # no margin, no TOST


def test_tost_decides_equivalence_only_within_the_margin() -> None:
    """A and C differ by 0.062 seed by seed (sd 0.013): equivalent within ±0.1, not within ±0.03 (the difference
    itself lies outside), and a wide margin never turns a non-test (one seed, no spread) into a verdict."""
    assert tost(A, C, 0.1, pairs=(A, C)) < 0.01
    assert tost(A, C, 0.03, pairs=(A, C)) > 0.5
    assert tost([0.6], B, 1.0, pairs=None) is None
    assert tost([0.5, 0.5], [0.4, 0.4], 1.0, pairs=None) is None
    assert conclusion(0.2, 0.01, 0.1) == "equivalent within ±0.1"
    assert conclusion(0.01, 0.3, 0.1) == "different"
    assert conclusion(0.2, 0.3, 0.1) == conclusion(None, None, 0.1) == "undecided"


def test_holm() -> None:
    assert holm([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02])  # worked by hand
    assert holm([0.5, 0.6]) == pytest.approx([1.0, 1.0])  # capped at 1
    assert holm([]) == []
    assert holm([0.01, None, 0.02]) == pytest.approx([0.03, 1.0, 0.04])  # an untestable member still counts in m
    p = np.random.default_rng(3).uniform(0, 0.2, 9).tolist()
    p[4] = p[1]  # a tie
    order = sorted(range(len(p)), key=lambda i: p[i])
    expected, running = [0.0] * len(p), 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (len(p) - rank) * p[i]))
        expected[i] = running
    assert holm(p) == pytest.approx(expected, abs=1e-15)


def p_better(x: list[float], y: list[float], lower: bool = False) -> float:
    wins = sum((xi < yj if lower else xi > yj) + 0.5 * (xi == yj) for xi in x for yj in y)
    return wins / (len(x) * len(y))


def test_probability_of_improvement_with_ties() -> None:
    x, y = [1.0, 2.0, 2.0], [2.0, 0.0]
    assert prob_improvement(x, y) == pytest.approx(4 / 6)  # 3 wins + 2 ties of 6 pairs
    assert prob_improvement(x, y, lower_is_better=True) == pytest.approx(2 / 6)
    assert prob_improvement([0.5], [0.5]) == 0.5
    for a, b in ((A, B), (C, A), (A[:1], C)):
        assert prob_improvement(a, b) == pytest.approx(p_better(a, b))
        assert compare(a, b, lower_is_better=True).p_improve == pytest.approx(p_better(a, b, lower=True))


def test_verdict() -> None:
    assert verdict(0.5, (0.4, 0.6)) == "inside"
    assert verdict(0.7, (0.4, 0.6)) == "above"
    assert verdict(0.3, (0.4, 0.6)) == "below"
    assert verdict(0.5, None) is None


# --- the statistics in a report table -------------------------------------------------------------------------

EPOCHS = 4


def trial(cond: str, seed: int, acc: list[float], status: str = "finished", planned: int | None = EPOCHS) -> Trial:
    params = {"train.seed": str(seed)} | ({"train.epochs": str(planned)} if planned else {})
    hist = list(enumerate(acc, start=1))
    key = f"{cond}-{seed}"
    return Trial(
        run_id=key,
        key=key,
        stage="main",
        condition=cond,
        seed=seed,
        status=status,
        name=key,
        start_time=seed,
        end_time=0,
        metrics={"test_acc": acc[-1]},
        params=params,
        tags={},
        histories={"test_acc": hist},
    )


def curve(final: float, epochs: int = EPOCHS) -> list[float]:
    return [final - 0.01 * (epochs - e) for e in range(1, epochs + 1)]


def table_sweep() -> Sweep:
    """bp (3 seeds); random: seed 2 diverged after 2 epochs; short: still running at epoch 2 of 4; single: one
    seed (its second seed errored); tied: every seed equal to bp's seed 0 value; unplanned: no train.epochs."""
    trials = [trial("bp", s, curve(v)) for s, v in enumerate(A[:3])]
    trials += [trial("random", s, curve(v)) for s, v in enumerate(B[:2])]
    trials.append(trial("random", 2, [0.55, 0.52], status="diverged"))
    trials += [trial("short", s, curve(v, 2), status="running") for s, v in enumerate(C[:2])]
    trials.append(trial("single", 0, curve(0.6)))
    trials.append(trial("single", 1, [0.9], status="error"))
    trials += [trial("tied", s, curve(A[0])) for s in range(3)]
    trials += [trial("unplanned", s, curve(v), planned=None) for s, v in enumerate((0.5, 0.52))]
    order = list(dict.fromkeys(t.label for t in trials))
    reference = {
        "random": {"test_acc": 0.99, "test_acc@2": 0.6},
        "short": {"test_acc": 0.75},
        "bp": {"test_acc": 0.5},
        "unplanned": {"test_acc": 0.5},
    }
    return Sweep("s", "sqlite://", ["p"], ["L"], ["L"], [], reference, order, trials)


def rows_of(**kwargs: Any) -> dict[str, dict[str, Any]]:
    sweep = table_sweep()
    table = condition_table(sweep, summarize_conditions(sweep, "test_acc", "final"), **kwargs)
    return {r["condition"]: r | {"cells": row} for r, row in zip(table.records, table.rows, strict=True)}


def test_table_intervals_diverged_errors_and_unreached_reference() -> None:
    rows = rows_of()
    bp, rnd, short, single = rows["bp"], rows["random"], rows["short"], rows["single"]
    assert (bp["ci_low"], bp["ci_high"]) == pytest.approx(t_interval(A[:3]), rel=1e-7)
    random_values = [*B[:2], 0.52]  # the diverged seed counts with its last value
    assert [v["value"] for v in rnd["values"]] == pytest.approx(random_values) and rnd["diverged"] == 1
    assert [v["seed"] for v in rnd["values"]] == [0, 1, 2]
    assert (rnd["ci_low"], rnd["ci_high"]) == pytest.approx(t_interval(random_values), rel=1e-7)
    assert (
        single["values"] == [{"seed": 0, "launch": None, "value": 0.6}] and single["errors"] == 1 and single["n"] == 1
    )  # the errored seed left out
    assert single["ci_low"] is None and single["cells"][2] == "n/a (n=1)"
    assert short["cells"][2].endswith(" wide (n=2)")
    # reference at the planned final epoch (4): the running trials are at epoch 2: no delta, a reason
    assert short["delta"] is None and short["reason"] == "ran 2 of 4 epochs" and short["reference_epoch"] == 4
    assert short["cells"][8] == "ran 2 of 4 epochs"
    # random reached epoch 4 with 2 seeds, the diverged one counts with its last value at epoch 4 too
    assert rnd["delta"] == pytest.approx(np.mean(random_values) - 0.99, abs=1e-12)
    assert rnd["verdict"] == "above" and rnd["cells"][8] == f"{np.mean(random_values) - 0.99:+.4f} (ref above CI)"
    assert bp["verdict"] == "below"
    # test_acc@2: epoch 2 of every seed (the diverged one reached it)
    at2 = [B[0] - 0.02, B[1] - 0.02, 0.52]
    assert [v["value"] for v in rnd["test_acc@2.values"]] == pytest.approx(at2)
    assert rnd["test_acc@2.delta"] == pytest.approx(np.mean(at2) - 0.6, abs=1e-12)
    assert (rnd["test_acc@2.ci_low"], rnd["test_acc@2.ci_high"]) == pytest.approx(t_interval(at2), rel=1e-7)
    assert rows["unplanned"]["delta"] is None and "planned epochs unknown" in rows["unplanned"]["reason"]
    assert "baseline" not in bp and "p" not in rnd  # no baseline, no comparison


@pytest.mark.parametrize("pairing", ["none", "seed"])
def test_table_comparisons_and_holm(pairing: str) -> None:
    rows = rows_of(baseline="bp", pairing=pairing)
    bp = rows["bp"]
    assert bp["cells"][9] == "baseline" and "diff" not in bp
    values = {name: [v["value"] for v in r["values"]] for name, r in rows.items()}
    tested = []
    for name in ("random", "short", "single", "tied", "unplanned"):
        r, x, y = rows[name], values[name], values["bp"]
        assert r["baseline"] == "bp"
        assert r["p_improve"] == pytest.approx(p_better(x, y))
        shared = min(len(x), len(y))  # every condition's seeds are 0..n-1, as bp's
        if pairing == "seed" and shared >= 2:
            assert r["pairing"] == "seed"
            diff, ci, p = paired(x[:shared], y[:shared])
        elif len(x) >= 2:
            assert r["pairing"] == "none"
            diff, ci, p = welch(x, y)
        else:  # single: one seed
            assert r["diff"] == pytest.approx(x[0] - np.mean(y)) and r["p"] is None and r["diff_ci_low"] is None
            assert r["p_holm"] is None and r["cells"][10] == "n/a"
            continue
        assert r["diff"] == pytest.approx(diff, abs=1e-12)
        assert (r["diff_ci_low"], r["diff_ci_high"]) == pytest.approx(ci, rel=1e-6)
        assert r["p"] == pytest.approx(p, rel=1e-5, abs=1e-9)
        tested.append(name)
    m = len(tested)
    order = sorted(tested, key=lambda n: rows[n]["p"])
    running = 0.0
    for rank, name in enumerate(order):
        running = max(running, min(1.0, (m - rank) * rows[name]["p"]))
        assert rows[name]["p_holm"] == pytest.approx(running, rel=1e-12)
    assert rows["tied"]["p_improve"] == pytest.approx((0.5 + 1 + 0) / 3)  # ties bp's seed 0, beats 1, loses to 2


def test_table_baseline_errors_and_pairing_note() -> None:
    from fasweep.errors import UserError

    with pytest.raises(
        UserError, match=r"--baseline: got 'bpp'; expected a condition of the sweep \(did you mean bp\?\)"
    ):
        rows_of(baseline="bpp")
    sweep = table_sweep()
    table = condition_table(sweep, summarize_conditions(sweep, "test_acc", "final"), baseline="bp", pairing="seed")
    note = next(n for n in table.footnotes if n.startswith("pairing by seed"))
    assert "of the Welch CIs' width" in note
    assert any("Holm over the 4 tests of this table: an ad-hoc family" in n for n in table.footnotes)


def test_contrasts_without_trials_are_listed_short() -> None:
    """Declared contrasts naming many conditions without trials: the note lists 12 of them and how many more, as
    the spec's errors list names (`fasweep.errors.listed`), not hundreds."""
    from fasweep.report.comparisons import contrast_table
    from fasweep.spec.contrasts import Contrast

    sweep = table_sweep()
    gone = [f"gone{i}" for i in range(15)]
    sweep.contrasts = tuple(Contrast(name, "bp", "none", "contrasts") for name in gone)
    table = contrast_table(sweep, summarize_conditions(sweep, "test_acc", "final"))
    assert table is not None and len(table.rows) == 15
    shown = ", ".join(sorted(gone)[:12])
    assert table.footnotes[-1] == f"declared contrasts name conditions without trials: {shown} and 3 more"
