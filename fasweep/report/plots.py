"""Figures of a sweep (matplotlib Agg, no pyplot state): learning curves, alignment angles, metric vs axis."""

from __future__ import annotations

import math
from collections import defaultdict
from pathlib import Path

import numpy as np
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from fasweep.report.collect import Sweep, Trial
from fasweep.report.stats import mean_ci
from fasweep.report.tables import group_by, is_number, plan_sorted, sort_values, summarize
from fasweep.runs.layout import TrialStatus

MAX_CURVES = 12  # more conditions than this: learning/angle curves are drawn per value of the main axis


def _mean_band(trials: list[Trial], key: str) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Epochs, mean over seeds and its 95% CI (Student t; NaN where one seed) per epoch; non-finite points and
    errored trials dropped."""
    by_epoch: dict[int, list[float]] = defaultdict(list)
    for t in (t for t in trials if t.status != TrialStatus.ERROR):
        for epoch, v in t.histories.get(key, []):
            if math.isfinite(v):
                by_epoch[epoch].append(v)
    epochs = sorted(by_epoch)
    bands = [mean_ci(by_epoch[e]) or (math.nan, math.nan) for e in epochs]
    mean = np.array([np.mean(by_epoch[e]) for e in epochs])
    return np.array(epochs), mean, np.array([b[0] for b in bands]), np.array([b[1] for b in bands])


def curve_groups(sweep: Sweep, axis: str | None) -> tuple[dict[str, list[Trial]], str]:
    """One curve per condition; beyond MAX_CURVES conditions, one per value of `axis` (other axes pooled)."""
    trials = plan_sorted(sweep)
    if axis is None or len(sweep.condition_order) <= MAX_CURVES:
        return group_by(trials, lambda t: t.label), "condition"
    groups = group_by(trials, lambda t: t.params.get(axis, ""))
    short = axis.rsplit(".", 1)[-1]
    return {f"{short}={v}": groups[v] for v in sort_values(groups)}, axis


def _curves(ax: Axes, groups: dict[str, list[Trial]], key: str) -> None:
    """One line per group (mean over its trials) with a 95% CI band."""
    for (name, trials), color in zip(groups.items(), _colors(len(groups)), strict=True):
        epochs, mean, low, high = _mean_band(trials, key)
        if len(epochs):
            ax.plot(epochs, mean, color=color, label=name, marker="o" if len(epochs) < 4 else None, ms=3)
            ax.fill_between(epochs, low, high, where=np.isfinite(low), color=color, alpha=0.2, lw=0)
    ax.set_xlabel("epoch")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel(key)
    ax.grid(alpha=0.3)


def _colors(n: int) -> list[tuple[float, ...]]:
    import matplotlib

    cmap = matplotlib.colormaps["tab10" if n <= 10 else "tab20"]
    return [cmap(i % cmap.N) for i in range(n)]


def _save(fig: Figure, path: Path) -> Path:
    fig.savefig(path, dpi=110, bbox_inches="tight")
    return path


def _band_title(grouping: str) -> str:
    band = "band: 95% CI of the mean (Student t)"
    return f"mean over seeds, {band}" if grouping == "condition" else f"per {grouping}, mean over its trials, {band}"


def learning_curves(name: str, groups: dict[str, list[Trial]], grouping: str, metric: str, path: Path) -> Path:
    """`metric` and train loss against epoch, one line per group with a band."""
    logged = any("train_loss" in t.metrics for trials in groups.values() for t in trials)
    keys = [metric] + (["train_loss"] if logged and metric != "train_loss" else [])
    fig = Figure(figsize=(5.5 * len(keys) + 2, 4), layout="constrained")
    axes = fig.subplots(1, len(keys), squeeze=False)[0]
    for ax, key in zip(axes, keys, strict=True):
        _curves(ax, groups, key)
    axes[-1].legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1))
    fig.suptitle(f"{name}: learning curves ({_band_title(grouping)})")
    return _save(fig, path)


def angle_keys(sweep: Sweep) -> list[str]:
    """The `angle/<layer>` metrics any trial logged, sorted by layer name."""
    return sorted({k for t in sweep.trials for k in t.metrics if k.startswith("angle/")})


def angle_curves(name: str, groups: dict[str, list[Trial]], grouping: str, keys: list[str], path: Path) -> Path:
    """One panel per layer: the angle between the rule's weight update and the BP gradient, one line per group."""
    cols = min(3, len(keys))
    rows = math.ceil(len(keys) / cols)
    fig = Figure(figsize=(4.5 * cols + 2, 3.5 * rows), layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False).ravel()
    for ax, key in zip(axes, keys, strict=False):
        _curves(ax, groups, key)
        ax.set_title(key.removeprefix("angle/"))
        ax.set_ylabel("angle to BP gradient (°)")
    for ax in axes[len(keys) :]:
        ax.set_visible(False)
    axes[cols - 1].legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1))
    fig.suptitle(f"{name}: alignment angles per layer ({_band_title(grouping)})")
    return _save(fig, path)


def metric_vs_axis(sweep: Sweep, metric: str, at: str, x_axis: str, line_axis: str | None, path: Path) -> Path:
    """`metric` (mean and 95% CI over trials) against the values of `x_axis`, one line per `line_axis` value."""
    fig = Figure(figsize=(7, 4.5), layout="constrained")
    ax = fig.subplots()
    trials = plan_sorted(sweep)
    xs = sort_values(t.params.get(x_axis, "") for t in trials)
    numeric = all(is_number(x) for x in xs)
    lines = group_by(trials, lambda t: t.params.get(line_axis, "") if line_axis else "")
    names = sort_values(lines)
    for name, color in zip(names, _colors(len(names)), strict=True):
        cells = group_by(lines[name], lambda t: t.params.get(x_axis, ""))
        points = [(x, summarize(cells[x], metric, at)) for x in xs if x in cells]
        points = [(x, s) for x, s in points if s.n]
        pos = [float(x) if numeric else xs.index(x) for x, _ in points]
        bars = [(s.mean - s.ci[0], s.ci[1] - s.mean) if s.ci else (0.0, 0.0) for _, s in points]
        ax.errorbar(
            pos,
            [s.mean for _, s in points],
            yerr=np.array(bars).T.reshape(2, -1),
            color=color,
            marker="o",
            ls="-" if numeric else ":",  # categories: the line only guides the eye
            capsize=3,
            label=f"{line_axis}={name}" if line_axis else None,
        )
    if not numeric:
        ax.set_xticks(range(len(xs)), xs, rotation=30, ha="right")
    ax.set_xlabel(x_axis)
    ax.set_ylabel(f"{metric} ({at})")
    ax.grid(alpha=0.3)
    if line_axis:
        ax.legend(fontsize=8)
    fig.suptitle(f"{sweep.name}: {metric} vs {x_axis} (mean, bars: 95% CI, Student t)")
    return _save(fig, path)
