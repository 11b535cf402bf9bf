"""The launch lease: one running launch per (sweep, MLflow experiment), held in an experiment tag.

`fasweep launch` (and `--resume`) takes the lease before any compute and keeps it fresh with a heartbeat; a second
driver finds it held and stops with one line naming the holder. A holder is stale when its heartbeat is older
than `STALE_S`, or when it ran on this host and its process is gone (a SIGKILLed driver); a stale lease is
taken over, and `--force` takes over a live one. MLflow has no compare-and-swap, so taking the lease is write,
settle, read back: of two drivers starting together the one whose write landed last keeps it.

The lease is exclusive: a driver whose heartbeat finds the lease taken calls its `on_lost` (the launch stops its
trials and writes nothing more), and when it has stopped it says so in the tag `fasweep.lease.<sweep>.released`.
The taking driver waits for that (or for the old holder to turn stale) before `acquire` returns: until then it
writes nothing but the lease.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

from fasweep.errors import UserError
from fasweep.runs.layout import LEASE_RELEASED_SUFFIX, LEASE_TAG_PREFIX
from fasweep.runs.store import retry

log = logging.getLogger(__name__)
HEARTBEAT_S = float(os.environ.get("FASWEEP_LEASE_HEARTBEAT_S", "10"))
STALE_S = float(os.environ.get("FASWEEP_LEASE_STALE_S", "60"))
SETTLE_S = 0.3  # between writing the lease and reading it back (two drivers' read-then-write gap is ms)
POLL_S = 0.5  # how often a taking driver looks whether the old holder has let go


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


def read_holder(mlflow: Any, experiment_id: str, sweep: str, uri: str = "", suffix: str = "") -> Holder | None:
    """Who holds `sweep`'s lease in the experiment, None when it is free (or unreadable); with `suffix`
    `LEASE_RELEASED_SUFFIX`, who last let it go."""
    tags = retry(lambda: mlflow.get_experiment(experiment_id).tags, "read lease", uri=uri)
    raw = tags.get(LEASE_TAG_PREFIX + sweep + suffix, "")
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


class LeaseLost(Exception):
    """This driver's lease was taken over by another driver: it stopped its trials and wrote nothing more."""

    def __init__(self, sweep: str, holder: Holder) -> None:
        super().__init__(
            f"{sweep}: the lease was taken over by {holder.describe(time.time())}; this driver stopped its trials "
            "(their checkpoints kept) and wrote nothing more: that launch carries the sweep on"
        )
        self.holder = holder


class Lease:
    """The lease of one sweep in one experiment; `acquire()` once, `release()` at the end. `on_lost(holder)` is
    called from the heartbeat's thread when another driver has taken the lease over."""

    def __init__(
        self,
        mlflow: Any,
        experiment_id: str,
        sweep: str,
        launch_id: str,
        uri: str = "",
        on_lost: Callable[[Holder], None] | None = None,
    ) -> None:
        self._mlflow = mlflow
        self._experiment_id = experiment_id
        self._tag = LEASE_TAG_PREFIX + sweep
        self._sweep = sweep
        self._uri = uri
        self._me = Holder(launch_id, socket.gethostname(), os.getpid(), time.time(), time.time())
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._on_lost = on_lost
        self.lost_to: Holder | None = None  # set when another driver took the lease over (--force)

    def holder(self) -> Holder | None:
        """The current holder, None when the lease is free."""
        return read_holder(self._mlflow, self._experiment_id, self._sweep, self._uri)

    def _write(self, holder: Holder, suffix: str = "") -> None:
        value = json.dumps(asdict(holder))
        tag = self._tag + suffix
        retry(lambda: self._mlflow.set_experiment_tag(self._experiment_id, tag, value), "write lease", uri=self._uri)

    def _refuse(self, holder: Holder, verb: str) -> UserError:
        return UserError(
            f"{self._sweep}: {verb} {holder.describe(time.time())}; expected no running launch of this sweep "
            "in this store: wait for it, stop it, or pass --force if that driver is gone"
        )

    def acquire(self, force: bool = False, say: Callable[[str], None] | None = None) -> Holder | None:
        """Take the lease or raise a one-line UserError naming the running launch; returns the stale (or, with
        `force`, live) holder taken over, if any, once it has let go (`say` is told while this waits for it)."""
        previous = self.holder()
        if previous is not None and not force and not previous.stale(time.time()):
            raise self._refuse(previous, "already running as")
        self._write(self._me)
        time.sleep(SETTLE_S)
        now = self.holder()
        if not self._me.same(now) and not (previous is not None and previous.same(now)):
            raise self._refuse(now or self._me, "started at the same time as")
        if previous is not None and not previous.stale(time.time()):
            if say is not None:
                wait = previous.heartbeat + STALE_S - time.time()
                say(
                    f"taking the lease of {self._sweep} from {previous.describe(time.time())}: waiting for its "
                    f"driver to stop (at most {wait:.0f}s)"
                )
            self._wait_for(previous)
        self._thread = threading.Thread(target=self._beat, name="fasweep-lease", daemon=True)
        self._thread.start()
        return previous

    def _wait_for(self, previous: Holder) -> None:
        """Until `previous` has let go of the lease (or turned stale), keeping it written as this driver's: the old
        driver's heartbeat may have overwritten it between reading and writing."""
        while not previous.stale(time.time()):
            if previous.same(
                read_holder(self._mlflow, self._experiment_id, self._sweep, self._uri, LEASE_RELEASED_SUFFIX)
            ):
                return
            current = self.holder()
            if previous.same(current):
                self._write(self._me)
            elif not self._me.same(current):
                raise self._refuse(current or self._me, "taken at the same time by")
            time.sleep(POLL_S)

    def _beat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            try:
                current = self.holder()
                if current is not None and not self._me.same(current):
                    self.lost_to = current
                    if self._on_lost is not None:
                        self._on_lost(current)
                    return
                self._me = Holder(**{**asdict(self._me), "heartbeat": time.time()})
                self._write(self._me)
            except Exception as exc:  # the writer reports store outages; a missed beat only ages the lease
                log.warning("lease heartbeat failed: %s", exc)

    def release(self) -> None:
        """Stop the heartbeat; free the lease if this driver still holds it, or, if it was taken over, say that
        this driver has let go (the taking driver waits for that)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        with contextlib.suppress(Exception):
            if self.lost_to is not None:
                self._write(self._me, LEASE_RELEASED_SUFFIX)
                return
            current = self.holder()
            if self._me.same(current):
                self._mlflow.delete_experiment_tag(self._experiment_id, self._tag)
