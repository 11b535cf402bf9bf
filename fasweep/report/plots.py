"""Figures of a sweep (matplotlib Agg, no pyplot state): learning curves, alignment angles, metric vs axis."""

from __future__ import annotations

import math
import statistics
from collections import defaultdict
from pathlib import Path

import numpy as np
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from fasweep.report.collect import Sweep, Trial
from fasweep.report.tables import group_by, is_number, plan_sorted, sort_values, summarize


def _mean_band(trials: list[Trial], key: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Epochs, mean over seeds and sd over seeds (0 for one seed) of a metric; non-finite points dropped."""
    by_epoch: dict[int, list[float]] = defaultdict(list)
    for t in trials:
        for epoch, v in t.histories.get(key, []):
            if math.isfinite(v):
                by_epoch[epoch].append(v)
    epochs = sorted(by_epoch)
    mean = [statistics.fmean(by_epoch[e]) for e in epochs]
    sd = [statistics.stdev(by_epoch[e]) if len(by_epoch[e]) > 1 else 0.0 for e in epochs]
    return np.array(epochs), np.array(mean), np.array(sd)


def _curves(ax: Axes, sweep: Sweep, key: str) -> bool:
    """One line per condition (mean over seeds) with a ±sd band; False when nobody logged `key`."""
    groups = group_by(sweep.trials, lambda t: t.label)
    colors = _colors(len(sweep.condition_order))
    drew = False
    for label, color in zip(sweep.condition_order, colors, strict=True):
        epochs, mean, sd = _mean_band(groups[label], key)
        if len(epochs) == 0:
            continue
        drew = True
        ax.plot(epochs, mean, color=color, label=label, marker="o" if len(epochs) < 4 else None, ms=3)
        ax.fill_between(epochs, mean - sd, mean + sd, color=color, alpha=0.2, lw=0)
    ax.set_xlabel("epoch")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel(key)
    ax.grid(alpha=0.3)
    return drew


def _colors(n: int) -> list[tuple[float, ...]]:
    import matplotlib

    cmap = matplotlib.colormaps["tab10" if n <= 10 else "tab20"]
    return [cmap(i % cmap.N) for i in range(n)]


def _save(fig: Figure, path: Path) -> Path:
    fig.savefig(path, dpi=110, bbox_inches="tight")
    return path


def learning_curves(sweep: Sweep, metric: str, path: Path) -> Path:
    """`metric` and train loss against epoch, one line per condition with a band over seeds."""
    keys = [metric] + [k for k in ("train_loss",) if k != metric and any(k in t.latest for t in sweep.trials)]
    fig = Figure(figsize=(5.5 * len(keys) + 2, 4), layout="constrained")
    axes = fig.subplots(1, len(keys), squeeze=False)[0]
    for ax, key in zip(axes, keys, strict=True):
        _curves(ax, sweep, key)
    axes[-1].legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1))
    fig.suptitle(f"{sweep.name}: learning curves (mean ± sd over seeds)")
    return _save(fig, path)


def angle_keys(sweep: Sweep) -> list[str]:
    """The `angle/<layer>` metrics any trial logged, sorted by layer name."""
    return sorted({k for t in sweep.trials for k in t.latest if k.startswith("angle/")})


def angle_curves(sweep: Sweep, path: Path) -> Path | None:
    """One panel per layer: angle between the rule's update and the BP gradient, per condition; None if none."""
    keys = angle_keys(sweep)
    if not keys:
        return None
    cols = min(3, len(keys))
    rows = math.ceil(len(keys) / cols)
    fig = Figure(figsize=(4.5 * cols + 2, 3.5 * rows), layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False).ravel()
    for ax, key in zip(axes, keys, strict=False):
        _curves(ax, sweep, key)
        ax.set_title(key.removeprefix("angle/"))
        ax.set_ylabel("angle to BP gradient (°)")
    for ax in axes[len(keys) :]:
        ax.set_visible(False)
    axes[min(cols, len(keys)) - 1].legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1))
    fig.suptitle(f"{sweep.name}: alignment angles per layer (mean ± sd over seeds)")
    return _save(fig, path)


def metric_vs_axis(sweep: Sweep, metric: str, at: str, x_axis: str, line_axis: str | None, path: Path) -> Path:
    """`metric` (mean ± sd over trials) against the values of `x_axis`, one line per `line_axis` value."""
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
        ax.errorbar(
            pos,
            [s.mean for _, s in points],
            yerr=[0.0 if s.n < 2 else s.sd for _, s in points],
            color=color,
            marker="o",
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
    fig.suptitle(f"{sweep.name}: {metric} vs {x_axis} (mean ± sd)")
    return _save(fig, path)
