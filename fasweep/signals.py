"""Stopping a launch on a signal within a grace period (`Signals`, `GRACE_S`): SIGINT, SIGTERM and SIGHUP stop its
trials, the writer spends the grace period writing what it holds, a second signal (or the grace running out) exits
at once.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from typing import Any

from fasweep.driver import Driver
from fasweep.runs.store import client
from fasweep.runs.writer import RunWriter, mark_interrupted

GRACE_S = 20.0  # after SIGTERM/SIGINT/SIGHUP the driver is gone within this (Kubernetes kills after 30 s)
RESERVE_S = 6.0  # of the grace period, kept after the last write for the parent, the marks, Ray and the last lines
LAST_S = 2.0  # of the reserve, kept after the marks for Ray and the last lines


class Signals:
    """SIGINT, SIGTERM and SIGHUP stop a launch alike: the running trials stop and keep their checkpoints, the
    writer spends the grace period writing what it holds (`RunWriter.hurry`: trials' ends first), the parent and
    the unfinished runs are marked interrupted, the resume line is printed, all within `GRACE_S`; a second signal
    (or the grace running out) marks the parent if it is not yet, says how to continue and exits at once with
    128 + the signal."""

    def __init__(self) -> None:
        self.received: int | None = None
        self.deadline: float | None = None  # time.monotonic() by which the driver is gone, once signalled
        self.writer: RunWriter | None = None  # the launch's writer, for the last word
        self.driver: Driver | None = None  # the driver of the stages, while they run
        self.resume_hint = ""  # the command that continues the launch
        self._saved: dict[int, Any] = {}

    def __enter__(self) -> Signals:
        self.install()
        return self

    def install(self) -> None:
        """(Re)install the handlers: `ray.init` puts its own SIGTERM handler (a native stack dump) in place."""
        if threading.current_thread() is threading.main_thread():
            os.environ["TUNE_DISABLE_SIGINT_HANDLER"] = "1"  # ours stops Tune for SIGINT too (through SIGUSR1)
            for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
                previous = signal.signal(sig, self._handle)
                self._saved.setdefault(sig, previous)

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._saved.items():
            signal.signal(sig, handler)

    def _handle(self, signum: int, frame: Any) -> None:
        if self.received is not None:
            self._give_up(signum)
        self.received = signum
        self.deadline = time.monotonic() + GRACE_S
        timer = threading.Timer(GRACE_S, self._give_up, args=(signum,))
        timer.daemon = True
        timer.start()
        driver = self.driver
        if driver is not None:
            driver.signal = signum
            driver.writer.hurry(self.deadline - RESERVE_S)
        if driver is not None and callable(signal.getsignal(signal.SIGUSR1)):
            driver.interrupt()
        else:
            raise KeyboardInterrupt

    def marks_until(self) -> float | None:
        """Until when (time.monotonic()) the unfinished runs may be marked interrupted: None without a signal."""
        return None if self.deadline is None else self.deadline - LAST_S

    def _give_up(self, signum: int) -> None:
        """Exit now: the parent marked interrupted first where it is still open (a second at most), one line."""
        writer = self.writer
        if writer is not None and writer.parent_id and not writer.ended:
            uri, run_id = writer.uri, writer.parent_id
            mark = threading.Thread(target=lambda: mark_interrupted(client(uri), [run_id], 1.0), daemon=True)
            mark.start()
            mark.join(1.5)
        hint = f"; continue with: {self.resume_hint}" if self.resume_hint else ""
        os.write(2, f"interrupted before every write was made{hint}\n".encode())
        os._exit(128 + signum)
