"""Figures of a sweep (matplotlib Agg, no pyplot state): learning curves, alignment angles, metric vs axis.

Nothing is pooled silently: a curve is one condition (mean over its seeds); past MAX_CURVES conditions the figure
is split into small multiples (one row per value of an axis) rather than pooling conditions; whatever a figure
does pool or leave out is named in its title and in its caption (the report prints the caption under it).
"""

from __future__ import annotations

import math
import re
import textwrap
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from fasweep.report.collect import Sweep, Trial
from fasweep.report.stats import mean_ci
from fasweep.report.summary import LOSS_AXIS, group_by, is_number, plan_sorted, sort_values, summarize
from fasweep.runs.layout import TrialStatus

MAX_CURVES = 12  # the legend's limit: more conditions than this are drawn as small multiples (one row per value)
MAX_PANELS = 8  # metric vs axis: at most this many panels for the axes beyond x and line, else those are pooled
STAGE = "stage"  # the pseudo-axis of a staged sweep's stages
BAND = "band: 95% CI of that mean, Student t"

# The values a metric can take, by metric-name prefix (the longest matching prefix wins): every band and error bar
# is clipped to it, so a wide interval of few seeds never draws an accuracy below 0 or an angle below 0°.
METRIC_RANGES: dict[str, tuple[float, float]] = {
    "train_acc": (0.0, 1.0),
    "val_acc": (0.0, 1.0),
    "test_acc": (0.0, 1.0),
    "train_loss": (0.0, math.inf),
    "val_loss": (0.0, math.inf),
    "test_loss": (0.0, math.inf),
    "angle/": (0.0, 180.0),
    "delta_angle/": (0.0, 180.0),
    "bw_angle/": (0.0, 180.0),
    "bw_norm_ratio/": (0.0, math.inf),
    "epoch_time_s": (0.0, math.inf),
}

# An angle whose every value is within this of 0° is an exact gradient, not alignment: acos in float64 resolves
# about 1e-6° next to cos = 1, and two float32 evaluations of the same gradient differ only by rounding.
ZERO_ANGLE = 1e-3
OMIT_ZERO = f"angle identically 0° (within {ZERO_ANGLE:g}°) at every epoch and seed: exact gradient"
OMIT_NAN = "angle undefined (NaN: a zero update or gradient) at every epoch and seed"


def metric_range(key: str) -> tuple[float, float]:
    """(low, high) a metric's values can take: METRIC_RANGES' longest prefix of `key`, else unbounded."""
    prefixes = [p for p in METRIC_RANGES if key.startswith(p)]
    return METRIC_RANGES[max(prefixes, key=len)] if prefixes else (-math.inf, math.inf)


def _range_text(key: str) -> str:
    low, high = metric_range(key)
    unit = "°" if key.startswith(("angle/", "delta_angle/", "bw_angle/")) else ""
    if math.isinf(high):
        return f"≥ {low:g}{unit}"
    return f"[{low:g}{unit}, {high:g}{unit}]"


@dataclass
class Plot:
    """A drawn figure, its file name and the caption the report writes under it."""

    name: str
    figure: Figure
    caption: str

    def save(self, folder: Path) -> Path:
        path = folder / self.name
        self.figure.savefig(path, dpi=110, bbox_inches="tight")
        return path


@dataclass
class Panel:
    """One panel's (or row's) curves: `title` names the value of the split axis ('' when there is one panel);
    `groups` maps a legend name to the trials of one condition."""

    title: str
    groups: dict[str, list[Trial]]


def _live(trials: Iterable[Trial]) -> list[Trial]:
    return [t for t in trials if t.status != TrialStatus.ERROR]


def _mean_band(trials: list[Trial], key: str) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Epochs, mean over seeds and its 95% CI (Student t; NaN where one seed) per epoch, the CI clipped to the
    metric's range; non-finite points and errored trials dropped."""
    by_epoch: dict[int, list[float]] = defaultdict(list)
    for t in _live(trials):
        for epoch, v in t.histories.get(key, []):
            if math.isfinite(v):
                by_epoch[epoch].append(v)
    epochs = sorted(by_epoch)
    bands = [mean_ci(by_epoch[e]) or (math.nan, math.nan) for e in epochs]
    mean = np.array([np.mean(by_epoch[e]) for e in epochs])
    low, high = metric_range(key)
    lows = np.clip(np.array([b[0] for b in bands], dtype=float), low, high)
    highs = np.clip(np.array([b[1] for b in bands], dtype=float), low, high)
    return np.array(epochs), mean, lows, highs


def _axis_value(trial: Trial, axis: str) -> str:
    return trial.stage if axis == STAGE else trial.params.get(axis, "")


def varied_axes(sweep: Sweep) -> list[str]:
    """The sweep's axes (grid fields, condition overrides) that take more than one value, `stage` first when
    the sweep has several stages."""
    stages = [STAGE] if len({t.stage for t in sweep.trials}) > 1 else []
    return stages + [a for a in sweep.axes if len({t.params.get(a) for t in sweep.trials} - {None}) > 1]


def _strip(trial: Trial, axis: str) -> str:
    """A condition's legend name inside a panel of one `axis` value: its label without that axis' part."""
    if axis == STAGE:
        return trial.condition
    names = {axis, axis.rsplit(".", 1)[-1]}
    parts = [p for p in trial.condition.split(",") if p.split("=", 1)[0].strip() not in names]
    name = ",".join(parts) or trial.condition
    return name if trial.stage == "main" else f"{trial.stage}/{name}"


def split_axis(sweep: Sweep) -> str | None:
    """The axis to split the curves by: None up to MAX_CURVES conditions; else the varied axis that leaves at most
    MAX_CURVES conditions per panel in the fewest panels (train.loss first: its losses are on different scales),
    or, when none does, the one leaving the fewest per panel."""
    if len(sweep.condition_order) <= MAX_CURVES:
        return None
    trials = plan_sorted(sweep)
    fits, rest = [], []
    for axis in varied_axes(sweep):
        panels = group_by(trials, lambda t, a=axis: _axis_value(t, a))
        widest = max(len({t.label for t in group}) for group in panels.values())
        (fits if widest <= MAX_CURVES else rest).append((axis != LOSS_AXIS, len(panels), widest, axis))
    if fits:
        return min(fits)[3]
    return min(rest, key=lambda r: (r[2], r[1]))[3] if rest else None


def curve_panels(sweep: Sweep) -> tuple[list[Panel], str | None]:
    """One curve per condition, always; past MAX_CURVES conditions, one panel per value of `split_axis` (the
    conditions with that value). Also returns that axis (None: one panel)."""
    trials = plan_sorted(sweep)
    axis = split_axis(sweep)
    if axis is None:
        return [Panel("", group_by(trials, lambda t: t.label))], None
    by_value = group_by(trials, lambda t: _axis_value(t, axis))
    panels = []
    for value in sort_values(by_value):
        conditions = group_by(by_value[value], lambda t: t.label)
        names = {label: _strip(group[0], axis) for label, group in conditions.items()}
        if len(set(names.values())) < len(names):  # stripping made two conditions alike: keep the full labels
            names = {label: label for label in conditions}
        panels.append(Panel(f"{axis} = {value or '(unset)'}", {names[k]: g for k, g in conditions.items()}))
    return panels, axis


def _colors(n: int) -> list[tuple[float, ...]]:
    import matplotlib

    cmap = matplotlib.colormaps["tab10" if n <= 10 else "tab20"]
    return [cmap(i % cmap.N) for i in range(n)]


def _curves(ax: Axes, groups: dict[str, list[Trial]], key: str, colors: dict[str, tuple[float, ...]]) -> None:
    """One line per group (the mean over its seeds) with its 95% CI band, clipped to the metric's range."""
    for name, trials in groups.items():
        epochs, mean, low, high = _mean_band(trials, key)
        if len(epochs):
            color = colors[name]
            ax.plot(epochs, mean, color=color, label=name, marker="o" if len(epochs) < 4 else None, ms=3)
            ax.fill_between(epochs, low, high, where=np.isfinite(low), color=color, alpha=0.2, lw=0)
    ax.set_xlabel("epoch")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel(key)
    ax.grid(alpha=0.3)


def _palette(panels: list[Panel]) -> dict[str, tuple[float, ...]]:
    """One color per legend name, the same in every panel (a condition keeps its color across rows)."""
    names = list(dict.fromkeys(n for p in panels for n in p.groups))
    return dict(zip(names, _colors(len(names)), strict=True))


def _seeds(panels: list[Panel], keys: list[str]) -> str:
    """'n = 3 seeds' (or 'n = 2–3 seeds') per drawn condition: its trials that logged any of `keys`."""
    counts = {
        sum(1 for t in _live(trials) if any(t.histories.get(k) for k in keys))
        for p in panels
        for trials in p.groups.values()
    } - {0}
    if not counts:
        return "n = 0 seeds"
    low, high = min(counts), max(counts)
    return f"n = {low} seed{'s' * (high != 1)}" if low == high else f"n = {low}–{high} seeds"


def _split_text(axis: str | None, n_conditions: int, what: str) -> str:
    if axis is None:
        return ""
    return f"one {what} per {axis} value ({n_conditions} conditions, more than {MAX_CURVES} for one legend); "


def _legend(ax: Axes) -> None:
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1))


def _wrap(text: str) -> str:
    return "\n".join(line for paragraph in text.split("\n") for line in textwrap.wrap(paragraph, 160))


def learning_curves(sweep: Sweep, metric: str) -> Plot:
    """`metric` and train loss against epoch: one line per condition with a band; small multiples (one row per
    value of `split_axis`) past MAX_CURVES conditions."""
    panels, axis = curve_panels(sweep)
    logged = any("train_loss" in t.metrics for t in sweep.trials)
    keys = [metric] + (["train_loss"] if logged and metric != "train_loss" else [])
    fig = Figure(figsize=(5.5 * len(keys) + 2, 4 * len(panels)), layout="constrained")
    grid = fig.subplots(len(panels), len(keys), squeeze=False)
    colors = _palette(panels)
    for row, panel in zip(grid, panels, strict=True):
        for ax, key in zip(row, keys, strict=True):
            _curves(ax, panel.groups, key, colors)
            if panel.title:
                ax.set_title(panel.title, fontsize=10)
        _legend(row[-1])
    split = _split_text(axis, len(sweep.condition_order), "row")
    fig.suptitle(_wrap(f"{sweep.name}: learning curves, one line per condition ({split}mean over seeds, {BAND})"))
    ranges = ", ".join(f"{k} to {_range_text(k)}" for k in keys)
    caption = (
        f"Learning curves: each line is one condition, the mean over its seeds ({_seeds(panels, keys)}); the band "
        f"is the 95% CI of that mean (Student t; none where one seed), clipped to the metric's range ({ranges}). "
        + (f"Small multiples: {split.rstrip('; ')}. " if split else "")
        + "Nothing pooled: every condition has its own line."
    )
    return Plot("curves.png", fig, caption)


def angle_keys(sweep: Sweep) -> list[str]:
    """The `angle/<layer>` metrics any trial logged, sorted by layer name."""
    return sorted({k for t in sweep.trials for k in t.metrics if k.startswith("angle/")})


def _degenerate(trials: list[Trial], key: str) -> str | None:
    """Why a condition's angle series is not a curve: identically 0° (an exact gradient, e.g. a BP layer) or NaN
    at every epoch and seed; None when it is a curve (or was never logged)."""
    values = [v for t in _live(trials) for _, v in t.histories.get(key, [])]
    if not values:
        return None
    finite = [v for v in values if math.isfinite(v)]
    if not finite:
        return OMIT_NAN
    return OMIT_ZERO if all(abs(v) <= ZERO_ANGLE for v in finite) else None


def _omitted_text(omitted: dict[str, dict[str, list[str]]], layers: list[str], conditions: list[str]) -> str:
    """'Not drawn, <reason>: layer dense4 (every condition); DD0 (every layer)' per reason, from
    reason -> condition -> layers omitted."""
    parts = []
    for reason, by_condition in omitted.items():
        whole_layers = [k for k in layers if all(k in by_condition.get(c, []) for c in conditions)]
        names = [f"layer {k.removeprefix('angle/')} (every condition)" for k in whole_layers]
        for cond, keys in by_condition.items():
            rest = [k.removeprefix("angle/") for k in keys if k not in whole_layers]
            if rest:
                every = len(rest) == len(layers) - len(whole_layers)
                names.append(f"{cond} ({'every layer' if every else 'layer ' + ', '.join(rest)})")
        parts.append(f"Not drawn, {reason}: {'; '.join(names)}")
    return ". ".join(parts)


def angle_curves(sweep: Sweep, keys: list[str]) -> Plot:
    """The angle between each layer's weight update and the BP gradient: one panel per layer (one row of them per
    value of `split_axis` past MAX_CURVES conditions), one line per condition. A condition's series that is
    identically 0° (or NaN) is not drawn; a layer where every condition's is, gets no panel; both are named."""
    panels, axis = curve_panels(sweep)
    labels = list(dict.fromkeys(t.label for t in plan_sorted(sweep)))
    omitted: dict[str, dict[str, list[str]]] = {}
    drop: dict[str, set[tuple[str, str]]] = defaultdict(set)  # layer key -> (panel, legend name) not drawn
    for key in keys:
        for panel in panels:
            for name, trials in panel.groups.items():
                if reason := _degenerate(trials, key):
                    omitted.setdefault(reason, {}).setdefault(trials[0].label, []).append(key)
                    drop[key].add((panel.title, name))
    for by_condition in omitted.values():  # conditions in the plan's order
        ordered = {c: by_condition[c] for c in labels if c in by_condition}
        by_condition.clear()
        by_condition.update(ordered)
    every = {(p.title, n) for p in panels for n in p.groups}
    shown = [k for k in keys if not every <= drop[k]]
    note = _omitted_text(omitted, keys, labels)
    split = _split_text(axis, len(sweep.condition_order), "row of panels")
    title = f"{sweep.name}: alignment angles per layer, one line per condition ({split}mean over seeds, {BAND})"
    if axis:
        rows, cols = len(panels), max(1, len(shown))
    else:
        cols = min(3, max(1, len(shown)))
        rows = max(1, math.ceil(len(shown) / cols))
    fig = Figure(figsize=(4.5 * cols + 2, 3.5 * rows + 0.4 * bool(note)), layout="constrained")
    grid = fig.subplots(rows, cols, squeeze=False)
    colors = _palette(panels)
    cells = (
        [(grid[r][c], panels[r], k) for r in range(rows) for c, k in enumerate(shown)]
        if axis
        else [(ax, panels[0], k) for ax, k in zip(grid.ravel(), shown, strict=False)]
    )
    for ax, panel, key in cells:
        groups = {n: g for n, g in panel.groups.items() if (panel.title, n) not in drop[key]}
        _curves(ax, groups, key, colors)
        ax.set_title(" · ".join(filter(None, [key.removeprefix("angle/"), panel.title])), fontsize=10)
        ax.set_ylabel("angle to BP gradient (°)")
    used = {id(ax) for ax, _, _ in cells}
    for ax in grid.ravel():
        if id(ax) not in used:
            ax.set_visible(False)
    for r in range(rows):  # a legend beside each row's last panel that has lines
        drawn = [ax for ax in grid[r] if id(ax) in used and ax.get_legend_handles_labels()[0]]
        if drawn and (axis or r == 0):
            _legend(drawn[-1])
    if not shown:
        grid[0][0].set_visible(True)
        grid[0][0].set_axis_off()
        grid[0][0].text(0.5, 0.5, "no angle series to draw", ha="center", va="center")
    fig.suptitle(_wrap(title + (f"\n{note}" if note else "")), fontsize=10 if note else None)
    caption = (
        f"Alignment angles (the angle between each layer's weight update under its rule and the true BP gradient): "
        f"each line is one condition, the mean over its seeds ({_seeds(panels, shown)}); the band is the 95% CI of "
        f"that mean (Student t; none where one seed), clipped to [0°, 180°]. "
        + (f"Small multiples: {split.rstrip('; ')}. " if split else "")
        + "Nothing pooled."
        + (f" {note}." if note else "")
    )
    return Plot("angles.png", fig, caption)


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text)


def _pooled(points: list[list[Trial]]) -> list[str]:
    """What the points pool beyond seeds: the params (and `stage`) that differ between a point's conditions."""
    names: dict[str, None] = {}
    mixed = [trials for trials in points if len({t.label for t in trials}) > 1]
    for trials in mixed:
        if len({t.stage for t in trials}) > 1:
            names[STAGE] = None
        keys = sorted({k for t in trials for k in t.params} - {"train.seed"})
        names.update(dict.fromkeys(k for k in keys if len({t.params.get(k) for t in trials}) > 1))
    return list(names) or (["conditions"] if mixed else [])


def metric_vs_axis(sweep: Sweep, metric: str, at: str, x_axis: str, line_axis: str | None) -> Plot:
    """`metric` (mean and 95% CI over trials) against the values of `x_axis`, one line per `line_axis` value; one
    panel per combination of the other varied axes (up to MAX_PANELS; beyond, they are pooled and named)."""
    trials = plan_sorted(sweep)
    xs = sort_values(t.params.get(x_axis, "") for t in trials)
    numeric = all(is_number(x) for x in xs)
    others = [a for a in varied_axes(sweep) if a not in (x_axis, line_axis)]
    by_panel = group_by(trials, lambda t: tuple(_axis_value(t, a) for a in others))
    if len(by_panel) > MAX_PANELS:
        others, by_panel = [], {(): trials}
    n_panels = len(by_panel)
    cols = min(3, n_panels)
    rows = math.ceil(n_panels / cols)
    fig = Figure(figsize=(7 if n_panels == 1 else 4.8 * cols + 1.5, 4.5 * rows), layout="constrained")
    grid = fig.subplots(rows, cols, squeeze=False, sharey=True)
    names = sort_values(t.params.get(line_axis, "") if line_axis else "" for t in trials)
    colors = dict(zip(names, _colors(len(names)), strict=True))
    low, high = metric_range(metric)
    points: list[tuple[list[Trial], int]] = []  # (trials, n with a value) per drawn point
    for ax, (combo, panel_trials) in zip(grid.ravel(), by_panel.items(), strict=False):
        lines = group_by(panel_trials, lambda t: t.params.get(line_axis, "") if line_axis else "")
        for name in (n for n in names if n in lines):
            cells = group_by(lines[name], lambda t: t.params.get(x_axis, ""))
            stats = [(x, summarize(cells[x], metric, at)) for x in xs if x in cells]
            stats = [(x, s) for x, s in stats if s.n]
            points += [(cells[x], s.n) for x, s in stats]
            pos = [float(x) if numeric else xs.index(x) for x, _ in stats]
            clipped = [(max(s.ci[0], low), min(s.ci[1], high)) if s.ci else (s.mean, s.mean) for _, s in stats]
            bars = [(s.mean - lo, hi - s.mean) for (_, s), (lo, hi) in zip(stats, clipped, strict=True)]
            ax.errorbar(
                pos,
                [s.mean for _, s in stats],
                yerr=np.array(bars).T.reshape(2, -1),
                color=colors[name],
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
        if others:
            ax.set_title(", ".join(f"{a} = {v}" for a, v in zip(others, combo, strict=True)), fontsize=10)
        if line_axis:
            ax.legend(fontsize=8)
    for ax in grid.ravel()[n_panels:]:
        ax.set_visible(False)
    pooled = _pooled([p for p, _ in points])
    ns = [n for _, n in points]
    n_text = f"n = {min(ns)}" if min(ns, default=0) == max(ns, default=0) else f"n = {min(ns)}–{max(ns)}"
    pooled_text = f"pooled over {', '.join(pooled)} ({n_text} trials per point)" if pooled else ""
    split_text = f"one panel per {' × '.join(others)} value" if others else ""
    detail = "; ".join(["mean, bars: 95% CI, Student t", *filter(None, [split_text, pooled_text])])
    fig.suptitle(_wrap(f"{sweep.name}: {metric} vs {x_axis} ({detail})"))
    caption = (
        f"{metric} ({at}) against {x_axis}"
        + (f", one line per {line_axis} value" if line_axis else "")
        + (f", {split_text}" if split_text else "")
        + f": each point is the mean over the trials of that cell ({n_text}), the bars its 95% CI (Student t; none "
        f"where one trial), clipped to {metric}'s range ({_range_text(metric)}). "
        + (f"Pooled: {pooled_text}." if pooled else "Nothing pooled beyond seeds.")
    )
    return Plot(f"{_slug(metric)}_vs_{_slug(x_axis)}.png", fig, caption)
