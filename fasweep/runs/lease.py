"""The launch lease: one running launch per (sweep, MLflow experiment), held in an experiment tag.

`fasweep launch` (and `--resume`) takes the lease before any compute and keeps it fresh with a heartbeat; a second
driver finds it held and stops with one line naming the holder. A holder is stale when its heartbeat is older
than `STALE_S`, or when it ran on this host and its process is gone (a SIGKILLed driver); a stale lease is
taken over, and `--force` takes over a live one. MLflow has no compare-and-swap, so taking the lease is write,
settle, read back: of two drivers starting together the one whose write landed last keeps it.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import threading
import time
from dataclasses import asdict, dataclass
from typing import Any

from fasweep.errors import UserError
from fasweep.runs.layout import LEASE_TAG_PREFIX
from fasweep.runs.store import retry

log = logging.getLogger(__name__)
HEARTBEAT_S = float(os.environ.get("FASWEEP_LEASE_HEARTBEAT_S", "10"))
STALE_S = float(os.environ.get("FASWEEP_LEASE_STALE_S", "60"))
SETTLE_S = 0.3  # between writing the lease and reading it back (two drivers' read-then-write gap is ms)


@dataclass(frozen=True)
class Holder:
    """Who holds a lease: the launch, where its driver runs, when it started and last beat."""

    launch_id: str
    host: str
    pid: int
    started: float
    heartbeat: float

    def stale(self, now: float) -> bool:
        """The heartbeat stopped, or the driver ran on this host and its process is gone."""
        if now - self.heartbeat > STALE_S:
            return True
        if self.host == socket.gethostname():
            try:
                os.kill(self.pid, 0)
            except ProcessLookupError:
                return True
            except PermissionError:
                return False
        return False

    def same(self, other: Holder | None) -> bool:
        """The same driver process (a resumed launch keeps its id but is another driver)."""
        return other is not None and (self.host, self.pid, self.started) == (other.host, other.pid, other.started)

    def describe(self, now: float) -> str:
        """`launch L (host h, pid p, started ..., last heartbeat 3s ago)`."""
        started = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(self.started))
        beat = now - self.heartbeat
        return (
            f"launch {self.launch_id} (host {self.host}, pid {self.pid}, started {started}, heartbeat {beat:.0f}s ago)"
        )


def read_holder(mlflow: Any, experiment_id: str, sweep: str, uri: str = "") -> Holder | None:
    """Who holds `sweep`'s lease in the experiment, None when it is free (or unreadable)."""
    tags = retry(lambda: mlflow.get_experiment(experiment_id).tags, "read lease", uri=uri)
    raw = tags.get(LEASE_TAG_PREFIX + sweep, "")
    if not raw:
        return None
    try:
        return Holder(**json.loads(raw))
    except (TypeError, ValueError):
        return None  # unreadable: as good as free


def live_holder(mlflow: Any, experiment_id: str, sweep: str) -> Holder | None:
    """The driver holding `sweep`'s lease in the experiment, None when the lease is free or stale."""
    holder = read_holder(mlflow, experiment_id, sweep)
    return holder if holder is not None and not holder.stale(time.time()) else None


class Lease:
    """The lease of one sweep in one experiment; `acquire()` once, `release()` at the end."""

    def __init__(self, mlflow: Any, experiment_id: str, sweep: str, launch_id: str, uri: str = "") -> None:
        self._mlflow = mlflow
        self._experiment_id = experiment_id
        self._tag = LEASE_TAG_PREFIX + sweep
        self._sweep = sweep
        self._uri = uri
        self._me = Holder(launch_id, socket.gethostname(), os.getpid(), time.time(), time.time())
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.lost_to: Holder | None = None  # set when another driver took the lease over (--force)

    def holder(self) -> Holder | None:
        """The current holder, None when the lease is free."""
        return read_holder(self._mlflow, self._experiment_id, self._sweep, self._uri)

    def _write(self, holder: Holder) -> None:
        value = json.dumps(asdict(holder))
        retry(
            lambda: self._mlflow.set_experiment_tag(self._experiment_id, self._tag, value), "write lease", uri=self._uri
        )

    def _refuse(self, holder: Holder, verb: str) -> UserError:
        return UserError(
            f"{self._sweep}: {verb} {holder.describe(time.time())}; expected no running launch of this sweep "
            "in this store: wait for it, stop it, or pass --force if that driver is gone"
        )

    def acquire(self, force: bool = False) -> Holder | None:
        """Take the lease or raise a one-line UserError naming the running launch; returns the stale (or, with
        `force`, live) holder taken over, if any."""
        previous = self.holder()
        if previous is not None and not force and not previous.stale(time.time()):
            raise self._refuse(previous, "already running as")
        self._write(self._me)
        time.sleep(SETTLE_S)
        now = self.holder()
        if not self._me.same(now):
            raise self._refuse(now or self._me, "started at the same time as")
        self._thread = threading.Thread(target=self._beat, name="fasweep-lease", daemon=True)
        self._thread.start()
        return previous

    def _beat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            try:
                current = self.holder()
                if current is not None and not self._me.same(current):
                    self.lost_to = current
                    log.warning("the lease of %s was taken over by %s", self._sweep, current.describe(time.time()))
                    return
                self._me = Holder(**{**asdict(self._me), "heartbeat": time.time()})
                self._write(self._me)
            except Exception as exc:  # the writer reports store outages; a missed beat only ages the lease
                log.warning("lease heartbeat failed: %s", exc)

    def release(self) -> None:
        """Stop the heartbeat and free the lease if this driver still holds it."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        with contextlib.suppress(Exception):
            current = self.holder()
            if self._me.same(current):
                self._mlflow.delete_experiment_tag(self._experiment_id, self._tag)
