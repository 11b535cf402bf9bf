"""One trial's learning curves (loss | accuracy per epoch), drawn when its run ends and logged as curves.png."""

from __future__ import annotations

from typing import Any

CURVE_KEYS = ("train_loss", "val_loss", "test_loss", "train_acc", "val_acc", "test_acc")


def trial_curves(history: list[dict[str, float]], title: str) -> Any | None:
    """A loss | accuracy figure of a trial's per-epoch curves (None without any)."""
    from matplotlib.figure import Figure

    history = sorted(history, key=lambda m: m["epoch"])
    series = {k: [(m["epoch"], m[k]) for m in history if k in m] for k in CURVE_KEYS}
    series = {k: v for k, v in series.items() if v}
    if not series:
        return None
    panels = [p for p in ("loss", "acc") if any(k.endswith(p) for k in series)]
    figure = Figure(figsize=(5 * len(panels), 3.5))  # fixed margins: no layout engine re-measuring text
    figure.subplots_adjust(left=0.13 / len(panels), right=1 - 0.02 / len(panels), bottom=0.14, top=0.88, wspace=0.25)
    for ax, panel in zip(figure.subplots(1, len(panels), squeeze=False)[0], panels, strict=True):
        for name, points in series.items():
            if name.endswith(panel):
                ax.plot(*zip(*points, strict=True), marker="o", ms=3, label=name)
        ax.set_xlabel("epoch")
        ax.set_ylabel(panel)
        ax.legend()
    figure.suptitle(title, fontsize=9)
    return figure
