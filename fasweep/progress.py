"""The driver's progress line: trial counts by status (adding up to the stage's trials), running epochs, best so far."""

from __future__ import annotations

import contextlib
import math
import os
import time
from collections.abc import Iterator

from rich.console import Console
from rich.live import Live
from rich.text import Text

from fasweep.runs.layout import Best, TrialStatus

_ORDER = (
    TrialStatus.PENDING,
    TrialStatus.RUNNING,
    TrialStatus.FINISHED,
    TrialStatus.DIVERGED,
    TrialStatus.STOPPED,
    TrialStatus.ERROR,
)


def progress_line(
    stage: str,
    statuses: dict[str, str],
    latest: dict[str, dict[str, float]],
    best: Best,
    *,
    epochs: bool = True,
    eta_s: float | None = None,
) -> str:
    """`[stage] 2 pending · 2 running (epoch 3, 5) · 4 finished · best test_acc 0.91 (key) · ETA 4m`: every trial
    of the stage counted once (`statuses`: key -> status), the running trials' epochs (with `epochs`), the best by
    the one definition over `latest` metrics, and the time left while trials are (`eta_s`)."""
    counts = dict.fromkeys(_ORDER, 0)
    for status in statuses.values():
        counts[TrialStatus(status)] += 1
    parts = []
    for status, n in counts.items():
        if not n and status in (TrialStatus.STOPPED, TrialStatus.DIVERGED):
            continue
        text = f"{n} {status}"
        if status == TrialStatus.RUNNING and n and epochs:
            epochs = sorted(int(latest[k]["epoch"]) for k, s in statuses.items() if s == status and k in latest)
            text += f" (epoch {', '.join(map(str, epochs[:8]))}{', ...' if len(epochs) > 8 else ''})" if epochs else ""
        parts.append(text)
    line = f"[{stage}] " + " · ".join(parts)
    chosen = best.choose((k, statuses.get(k, ""), m) for k, m in latest.items() if k in statuses)
    if chosen:
        line += f" · best {best.metric} {chosen[1]:.4f} ({chosen[0]})"
    if eta_s is not None and counts[TrialStatus.PENDING] + counts[TrialStatus.RUNNING]:
        line += f" · ETA {_duration(eta_s)}"
    return line


def _duration(seconds: float) -> str:
    """`45s`, `12m`, `3h05m`."""
    if seconds < 90:
        return f"{seconds:.0f}s"
    if seconds < 5400:
        return f"{seconds / 60:.0f}m"
    return f"{int(seconds // 3600)}h{int(seconds % 3600 // 60):02d}m"


LOG_EVERY_S = float(os.environ.get("FASWEEP_PROGRESS_S", "30"))


class Progress:
    """A live line on a terminal; in a log (no TTY), the line at most every `LOG_EVERY_S` seconds and once at
    the end of each stage, so a sweep of hundreds of trials prints tens of lines, not hundreds."""

    def __init__(self, console: Console) -> None:
        self.console = console
        self._line = ""
        self._printed = ""
        self._printed_at = -math.inf
        self._live: Live | None = None

    def show(self, line: str) -> None:
        """Show `line` (nothing when it has not changed; in a log, only when due)."""
        if line == self._line:
            return
        self._line = line
        if self._live is not None:
            self._live.update(Text(line))
        elif time.monotonic() - self._printed_at >= LOG_EVERY_S:
            self._print(line)

    def _print(self, line: str) -> None:
        self._printed, self._printed_at = line, time.monotonic()
        self.say(line)

    def say(self, text: str) -> None:
        """Print one plain line (no rich markup: stage names are in brackets)."""
        self.console.print(text, markup=False, highlight=False, soft_wrap=True)

    @contextlib.contextmanager
    def live(self) -> Iterator[None]:
        """Keep the line live while the block runs (a rich Live line on a terminal)."""
        self._line = ""
        if not self.console.is_terminal:
            try:
                yield
            finally:
                if self._line and self._line != self._printed:
                    self._print(self._line)  # where the stage ended
            return
        with Live(Text(""), console=self.console, refresh_per_second=4, transient=False) as live:
            self._live = live
            try:
                yield
            finally:
                self._live = None
