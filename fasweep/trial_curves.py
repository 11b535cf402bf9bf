"""One trial's learning curves (loss | accuracy per epoch), drawn when its run ends and logged as curves.png.

A launch draws one figure per trial on the driver's writer thread, hundreds of them, most at once when packed
trials end together; building a matplotlib figure (axes, ticks) costs more than drawing it, so one figure per
set of curves is built once and its lines' data replaced for each trial.
"""

from __future__ import annotations

import importlib
import threading
from pathlib import Path
from typing import Any

CURVE_KEYS = ("train_loss", "val_loss", "test_loss", "train_acc", "val_acc", "test_acc")
_PANELS = ("loss", "acc")
_figures: dict[tuple[str, ...], tuple[Any, Any, dict[str, Any]]] = {}  # curves -> (figure, title, line per curve)
_lock = threading.Lock()


def trial_curves(history: list[dict[str, float]], title: str, path: Path) -> bool:
    """Write a loss | accuracy PNG of a trial's per-epoch curves to `path`; False (nothing written) without any.
    An empty history only loads matplotlib (a driver does that while its first trials run)."""
    history = sorted(history, key=lambda m: m["epoch"])
    series = {k: [(m["epoch"], m[k]) for m in history if k in m] for k in CURVE_KEYS}
    series = {k: v for k, v in series.items() if v}
    if not series:
        importlib.import_module("matplotlib.figure")  # what an empty history is for: load it ahead of the draws
        return False
    with _lock:
        figure, text, lines = _figure(tuple(series))
        for name, points in series.items():
            lines[name].set_data(*zip(*points, strict=True))
        for ax in figure.axes:
            ax.relim()
            ax.autoscale_view()
        text.set_text(title)
        figure.savefig(path)
    return True


def _figure(names: tuple[str, ...]) -> tuple[Any, Any, dict[str, Any]]:
    """The figure drawing curves `names` (built on first use): a panel per kind of curve, a line per curve (no data
    yet), a title."""
    from matplotlib.figure import Figure

    if names not in _figures:
        panels = [p for p in _PANELS if any(k.endswith(p) for k in names)]
        figure = Figure(figsize=(5 * len(panels), 3.5))  # fixed margins: no layout engine re-measuring text
        figure.subplots_adjust(
            left=0.13 / len(panels), right=1 - 0.02 / len(panels), bottom=0.14, top=0.88, wspace=0.25
        )
        lines = {}
        for ax, panel in zip(figure.subplots(1, len(panels), squeeze=False)[0], panels, strict=True):
            for name in names:
                if name.endswith(panel):
                    (lines[name],) = ax.plot([], [], marker="o", ms=3, label=name)
            ax.set_xlabel("epoch")
            ax.set_ylabel(panel)
            ax.legend()
        _figures[names] = figure, figure.suptitle("", fontsize=9), lines
    return _figures[names]
