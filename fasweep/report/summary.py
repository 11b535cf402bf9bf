"""A sweep's trials summarized over seeds: a trial's value of a metric (final, best or at an epoch), a group's
statistics (`Stats`: mean, sd, 95% CI, bookkeeping), each condition's computed once (`Conditions`), and the
grouping and plan ordering the tables and plots share."""

from __future__ import annotations

import math
import statistics
from collections import defaultdict
from collections.abc import Callable, Hashable, Iterable
from dataclasses import dataclass
from functools import cached_property
from typing import Any

from fasweep.report.collect import Sweep, Trial
from fasweep.report.stats import Interval, mean_ci
from fasweep.runs.layout import Tag, TrialStatus, best_epoch, selection_metric

LOSS_AXIS = "train.loss"  # the axis the seed report lays out side by side (tables) and the plots panel last


def selector(trials: Iterable[Trial], metric: str) -> str:
    """The metric that chooses the best epoch for `metric` in these trials (`selection_metric`): its validation
    counterpart where they logged one (a validation split), else `metric` itself."""
    return selection_metric(metric, any(selection_metric(metric, True) in t.histories for t in trials))


def trial_value(trial: Trial, metric: str, at: str | int) -> float | None:
    """A trial's metric at its final (latest) epoch, at its best epoch (chosen on the validation metric where
    the trial has one: `selector`), or at epoch `at` (an int: step `at` of the history; a diverged trial that
    ended before it counts with its last value: its training is over); None if never logged (or the trial has
    not reached that epoch)."""
    if isinstance(at, int):
        hist = trial.histories.get(metric, [])
        if trial.status == TrialStatus.DIVERGED and hist and hist[-1][0] < at:
            return hist[-1][1]
        return dict(hist).get(at)
    if at == "final":
        hist = trial.histories.get(metric, [])
        return hist[-1][1] if hist else None
    on = selector([trial], metric)
    epoch = best_epoch(trial.histories.get(on, []), on)
    return None if epoch is None else dict(trial.histories.get(metric, [])).get(epoch)


@dataclass
class Stats:
    """One group of trials (a condition, or a pivot cell): the metric over seeds and the group's bookkeeping."""

    values: list[float]
    seeds: list[str | None]  # each value's train.seed
    launches: list[str | None]  # each value's launch id
    ci_method: str
    runs: int
    diverged: int
    partial: int
    errors: int
    final_epoch: int | None
    best_epoch: int | None
    selected_on: str | None = None  # the metric the best epoch was chosen on (`selector`)

    @property
    def n(self) -> int:
        return len(self.values)

    @property
    def mean(self) -> float:
        return statistics.fmean(self.values) if self.values else math.nan

    @property
    def sd(self) -> float:
        """Sample standard deviation (n − 1); NaN for a single seed."""
        return statistics.stdev(self.values) if len(self.values) > 1 else math.nan

    @property
    def seeded(self) -> list[tuple[str | None, float]]:
        """(train.seed, value) of each seed."""
        return list(zip(self.seeds, self.values, strict=True))

    @cached_property
    def ci(self) -> Interval | None:
        """95% CI of the mean over seeds (`ci_method`); None for fewer than two seeds."""
        return mean_ci(self.values, self.ci_method)


def _by_epoch(trials: Iterable[Trial], metric: str) -> dict[int, list[float]]:
    """Epoch -> the trials' values of `metric` there."""
    out: dict[int, list[float]] = defaultdict(list)
    for t in trials:
        for epoch, v in t.histories.get(metric, []):
            out[epoch].append(v)
    return out


def summarize(trials: list[Trial], metric: str, at: str | int, ci: str = "t") -> Stats:
    """Statistics of `metric` over the trials (seeds) at `at` (final, best or an epoch); best epoch = where the
    seed-mean curve of the selection metric (`selector`: the validation metric where there is one) is best. At a
    given epoch a running trial's value is final (not partial). Errored trials are left out (counted in
    `errors`), as are non-finite values."""
    counted = [t for t in trials if t.status != TrialStatus.ERROR]
    seeded = [(t.params.get("train.seed"), t.tags.get(Tag.LAUNCH), trial_value(t, metric, at)) for t in counted]
    seeded = [(seed, launch, v) for seed, launch, v in seeded if v is not None and math.isfinite(v)]
    by_epoch = _by_epoch(counted, metric)
    on = selector(counted, metric)
    chosen = by_epoch if on == metric else _by_epoch(counted, on)
    curve = {e: statistics.fmean(vs) if all(math.isfinite(v) for v in vs) else math.nan for e, vs in chosen.items()}
    return Stats(
        values=[v for _, _, v in seeded],
        seeds=[seed for seed, _, _ in seeded],
        launches=[launch for _, launch, _ in seeded],
        ci_method=ci,
        runs=len(trials),
        diverged=sum(t.status == TrialStatus.DIVERGED for t in trials),
        partial=0 if isinstance(at, int) else sum(t.status == TrialStatus.RUNNING for t in trials),
        errors=sum(t.status == TrialStatus.ERROR for t in trials),
        final_epoch=max(by_epoch) if by_epoch else None,
        best_epoch=best_epoch(curve.items(), on),
        selected_on=on,
    )


def group_by(trials: Iterable[Trial], key: Callable[[Trial], Hashable]) -> dict[Any, list[Trial]]:
    """Trials grouped by `key(trial)`, groups in order of first appearance."""
    out: dict[Any, list[Trial]] = defaultdict(list)
    for t in trials:
        out[key(t)].append(t)
    return out


def reference_for(sweep: Sweep, trial: Trial, metric: str) -> float | None:
    """The spec's published number for this trial's condition (`stage/condition` or `condition` key)."""
    for name in (trial.label, trial.condition):
        value = (sweep.reference.get(name) or {}).get(metric)
        if isinstance(value, int | float):
            return float(value)
    return None


def reference_epochs(sweep: Sweep, metric: str) -> list[int]:
    """The epochs N of the spec's `<metric>@<N>` reference keys (numbers published at earlier epochs), sorted."""
    keys = (key.rpartition("@") for refs in sweep.reference.values() for key in refs)
    return sorted({int(n) for name, _, n in keys if name == metric and n.isdigit()})


def planned_epochs(group: list[Trial]) -> int | None:
    """The epoch count the group's trials were planned with (their `train.epochs` param), None if unknown."""
    planned = {t.params.get("train.epochs") for t in group}
    value = planned.pop() if len(planned) == 1 else None
    return int(value) if value is not None and value.isdigit() else None


def is_number(text: str) -> bool:
    """Whether a param value (a str) reads as a number."""
    try:
        float(text)
    except ValueError:
        return False
    return True


def sort_values(values: Iterable[str]) -> list[str]:
    """Distinct param values: numbers in numeric order, otherwise in order of first appearance (the plan's)."""
    distinct = list(dict.fromkeys(values))
    return sorted(distinct, key=float) if all(is_number(v) for v in distinct) else distinct


def plan_sorted(sweep: Sweep) -> list[Trial]:
    """The trials in the order of `sweep.condition_order` (the plan's), seeds in start order within."""
    rank = {name: i for i, name in enumerate(sweep.condition_order)}
    return sorted(sweep.trials, key=lambda t: rank[t.label])


@dataclass(frozen=True)
class Conditions:
    """Each condition's trials (by label) and its statistics of `metric` at `at` in plan order: computed once for
    the per-condition table and the declared contrasts."""

    metric: str
    at: str
    ci: str
    trials: dict[str, list[Trial]]  # every label with trials, in order of first appearance
    stats: dict[str, Stats]  # the labels of `sweep.condition_order`


def summarize_conditions(sweep: Sweep, metric: str, at: str, ci: str = "t") -> Conditions:
    """`Conditions` of the sweep: `summarize` of each condition's trials."""
    groups = group_by(sweep.trials, lambda t: t.label)
    stats = {name: summarize(groups[name], metric, at, ci) for name in sweep.condition_order}
    return Conditions(metric, at, ci, groups, stats)
