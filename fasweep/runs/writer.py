"""The run record's one writer: a launch's parent and trial runs in MLflow, written in order, idempotently, retried.

The driver is the single writer of a launch. Synchronous calls (`open_parent`, `finish_parent`) are for the
driver's main thread; `trial_*` calls only queue writes applied by one background thread in order (epochs
reported within `HOLD_S` are written together, one batch per trial). Each write is retried with backoff for a
bounded time (a tracking-server restart is survived); past it the launch fails loudly with a `TrackingError`.
Every write is idempotent (runs are looked up by tags before creating, metric steps already logged are skipped,
metric timestamps are fixed when an epoch is reported), so a retried or resumed write never duplicates anything.
"""

from __future__ import annotations

import json
import logging
import math
import os
import tempfile
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from fasweep.runs.conditions import (
    N_METRIC,
    SD_SUFFIX,
    ConditionInfo,
    History,
    ParentInfo,
    aggregate,
    best_condition,
    condition_status,
    merged_params,
    settled_through,
    trial_counts_at,
)
from fasweep.runs.layout import (
    CHECKPOINT_ARTIFACT_DIR,
    CURVES_ARTIFACT,
    HISTORY_FILE,
    MLFLOW_STATUS,
    SPEC_ARTIFACT,
    LaunchStatus,
    Role,
    Tag,
    TrialStatus,
    condition_label,
    parent_run_name,
    trial_run_name,
    trial_status,
)
from fasweep.runs.reader import running_runs
from fasweep.runs.store import RETRY_BUDGET_S, TrackingError, client, quote, retry, search_all

log = logging.getLogger(__name__)
T = TypeVar("T")
HOLD_S = 0.25  # a metrics write waits this long for more epochs to join it (one SQL transaction per trial per batch)

# (history, title, path) -> whether a curves PNG was written to path; an empty history loads what drawing needs
Curves = Callable[[list[dict[str, float]], str, Path], bool]


@dataclass(frozen=True)
class TrialInfo:
    """What the writer needs to open a planned trial's run: identity and its resolved config (the params)."""

    key: str
    stage: str
    condition: str
    seed: int
    config: dict[str, Any]

    @property
    def planned_epochs(self) -> int:
        """`train.epochs` of the trial."""
        return int(self.config["train"]["epochs"])


@dataclass
class _Run:
    run_id: str
    status: str = TrialStatus.RUNNING
    logged: set[int] | None = None  # metric steps (epochs) already in MLflow; None: not read yet


@dataclass
class _Cond:
    """A condition run as the writer thread knows it (see `fasweep.runs.conditions`)."""

    info: ConditionInfo
    keys: list[str]  # its trials: the planned ones, plus any other started or found
    run_id: str = ""
    status: str = ""
    loaded: bool = False  # its trials' statuses and histories and its written epochs read from the store
    statuses: dict[str, str] = field(default_factory=dict)  # trial key -> status (absent: no run yet)
    histories: dict[str, History] = field(default_factory=dict)  # trial key -> the epochs in its run
    written: dict[int, dict[str, float]] = field(default_factory=dict)  # epoch -> the condition's values in its run
    changed: set[int] = field(default_factory=set)  # epochs up to the last written one where a trial counts anew
    obsolete: list[str] = field(default_factory=list)  # replaced runs: trials to re-point from, runs to delete


class _Queue:
    """One background thread applying queued writes in order, each retried; a final failure is kept and re-raised.

    Hurried (`deadline` set: the driver is stopping), a write not started by the deadline is dropped and named in
    `dropped`, and a retry never outlasts the deadline. Abandoned (the driver lost its lease), nothing more is
    written: what is queued is dropped and later writes are refused."""

    def __init__(self, uri: str, budget_s: float) -> None:
        self._uri = uri
        self._budget_s = budget_s
        self._items: deque[tuple[str, Callable[[], None]]] = deque()
        self._cond = threading.Condition()
        self._busy = False
        self._closed = False
        self.error: TrackingError | None = None
        self.deadline: float | None = None  # time.monotonic() by which a hurried write must have started
        self.dropped: list[str] = []  # writes a hurried queue could not start in time
        self.abandoned = False
        self._thread = threading.Thread(target=self._loop, name="fasweep-mlflow-writer", daemon=True)
        self._thread.start()

    def submit(self, what: str, fn: Callable[[], None]) -> None:
        """Queue a write; after a failure writes are not attempted (the failure is raised by flush)."""
        with self._cond:
            if not self.abandoned:
                self._items.append((what, fn))
                self._cond.notify_all()

    def wait(self) -> None:
        """Until every queued write is applied (or dropped); when hurried, at most until the deadline."""
        with self._cond:
            while self._items or self._busy:
                left = None if self.deadline is None else self.deadline - time.monotonic()
                if left is not None and left <= 0:
                    return
                self._cond.wait(min(left, 0.2) if left is not None else 0.2)  # a deadline may come meanwhile

    def flush(self) -> None:
        """`wait`, then raise the writer's failure if any."""
        self.wait()
        if self.error is not None:
            raise self.error

    def abandon(self) -> None:
        """Write nothing more: drop what is queued, refuse what comes (the write under way ends first)."""
        with self._cond:
            self.abandoned = True
            self._items.clear()
            self._cond.notify_all()

    def close(self, timeout: float | None = None) -> None:
        """Apply what is queued (a hurried queue drops what is late), then stop the thread; wait at most
        `timeout` for it."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        self._thread.join(timeout)

    def _loop(self) -> None:
        while True:
            with self._cond:
                while not self._items and not self._closed:
                    self._cond.wait()
                if not self._items:
                    return
                what, fn = self._items.popleft()
                self._busy = True
            try:
                if self.error is None and not self.abandoned:  # after a failure keep draining, never out of order
                    self._apply(what, fn)
            finally:
                with self._cond:
                    self._busy = False
                    self._cond.notify_all()

    def _apply(self, what: str, fn: Callable[[], None]) -> None:
        budget = self._budget_s
        if self.deadline is not None:
            budget = min(budget, self.deadline - time.monotonic())
            if budget <= 0:
                self.dropped.append(what)
                return
        try:
            retry(fn, what, budget, self._uri)
        except TrackingError as exc:
            if self.deadline is not None:  # out of time, not a store gone: left for --resume like a late write
                self.dropped.append(what)
            else:
                self.error = exc
        except Exception as exc:  # a bug in a write: surface it, don't kill the thread silently
            self.error = TrackingError(f"MLflow {what} failed: {type(exc).__name__}: {exc}")
            log.exception("MLflow %s failed", what)


@dataclass
class RunWriter:
    """The writer of one launch of one sweep (see the module docstring). Call `close()` at the end."""

    uri: str
    experiment: str
    sweep: str
    budget_s: float = RETRY_BUDGET_S
    curves: Curves | None = None  # draws a trial's curves.png from its history
    launch_id: str = ""
    parent_id: str = ""
    experiment_id: str = field(init=False)
    _runs: dict[str, _Run] = field(default_factory=dict, init=False)
    _trials: dict[str, TrialInfo] = field(default_factory=dict, init=False)
    _pending: dict[str, list[tuple[dict[str, float], int]]] = field(default_factory=dict, init=False)
    _drain_queued: bool = field(default=False, init=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, init=False)
    _parent: ParentInfo | None = field(default=None, init=False)
    _conds: dict[tuple[str, str], _Cond] = field(default_factory=dict, init=False)
    _tried: set[str] = field(default_factory=set, init=False)  # trials whose run this writer tried to create
    _reopened: bool = field(default=False, init=False)  # a resumed launch: runs of it may exist already
    _deferred: list[Callable[[], None]] = field(default_factory=list, init=False)  # hurried: curves, drawn last
    ended: bool = field(default=False, init=False)  # the parent's final status is written

    def __post_init__(self) -> None:
        # Our retry loop is the policy; MLflow's default (7 retries, 120 s timeouts) would hide outages for minutes.
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "30")
        # With a tracking server MLflow prints two "View run ... at" lines per ended run: 900 for 450 trials.
        os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
        self.client = client(self.uri)
        self._queue = _Queue(self.uri, self.budget_s)
        self.experiment_id = self.sync("get experiment", self._get_or_create_experiment)

    # --- driver-side, synchronous -------------------------------------------------------------------

    def sync(self, what: str, fn: Callable[[], T]) -> T:
        """Run one store call now, retried like the queued writes (no longer than a hurried writer's deadline)."""
        return retry(fn, what, self._budget(), self.uri)

    def _budget(self) -> float:
        """Seconds a call may retry: the budget, or up to a hurried writer's deadline (at least a second)."""
        deadline = self._queue.deadline
        return self.budget_s if deadline is None else max(1.0, min(self.budget_s, deadline - time.monotonic()))

    def _get_or_create_experiment(self) -> str:
        found = self.client.get_experiment_by_name(self.experiment)
        if found is not None:
            if found.lifecycle_stage == "deleted":
                self.client.restore_experiment(found.experiment_id)
            return found.experiment_id
        location = None
        if self.uri.startswith("sqlite:///"):  # keep a local store self-contained: artifacts beside the DB file
            location = (Path(self.uri.removeprefix("sqlite:///")).parent / "mlruns").resolve().as_uri()
        return self.client.create_experiment(self.experiment, artifact_location=location)

    def open_parent(
        self, launch_id: str, tags: dict[str, str], spec_yaml: str, run_id: str = "", parent: ParentInfo | None = None
    ) -> None:
        """Create the parent run of a new launch with `tags` (plus identity and status) and `parent`'s params and
        description, or reopen `run_id`. `parent.conditions` declares the launch's condition runs."""
        self.launch_id = launch_id
        self._parent = parent
        for c in parent.conditions if parent else ():
            self._conds[c.stage, c.condition] = _Cond(c, list(c.keys))
        if run_id:
            self.parent_id, self._reopened = run_id, True
            self.sync("reopen parent run", lambda: self._set_status(run_id, LaunchStatus.RUNNING))
            return
        tags = {
            **tags,
            str(Tag.SWEEP): self.sweep,
            str(Tag.LAUNCH): launch_id,
            str(Tag.ROLE): str(Role.PARENT),
            str(Tag.STATUS): str(LaunchStatus.RUNNING),
        } | ({str(Tag.NOTE): parent.description} if parent else {})
        name = parent_run_name(self.sweep, launch_id)
        run = self.sync(
            "create parent run", lambda: self.client.create_run(self.experiment_id, tags=tags, run_name=name)
        )
        self.parent_id = run.info.run_id
        if parent is not None:
            self.sync("log parent params", lambda: self._log_params(self.parent_id, parent.params))
        self.sync("log spec.yaml", lambda: self.client.log_text(self.parent_id, spec_yaml, SPEC_ARTIFACT))

    def finish_parent(self, status: LaunchStatus) -> None:
        """Log the launch's summary (`_log_summary`; not when hurried), set the parent's status and end its MLflow run
        accordingly."""
        if self.abandoned:
            return
        if not self.hurried:
            self.sync("log launch summary", self._log_summary)
        self.sync("end parent run", lambda: self._set_status(self.parent_id, status))
        self.ended = True

    def interrupt_runs(self, run_ids: list[str]) -> None:
        """Mark trial runs whose driver stopped before they ended `interrupted` (MLflow KILLED), now."""
        if not self.abandoned:
            mark_interrupted(self.client, run_ids, self._budget())

    def hurry(self, deadline: float) -> None:
        """The driver is stopping: writes not started by `deadline` (time.monotonic()) are dropped (`dropped`),
        trials' curves are drawn after every queued write (`flush`), and no call waits past the deadline."""
        self._queue.deadline = deadline

    @property
    def hurried(self) -> bool:
        """Whether the driver is stopping (`hurry`)."""
        return self._queue.deadline is not None

    @property
    def dropped(self) -> list[str]:
        """The writes a hurried writer could not start in time."""
        return self._queue.dropped

    def abandon(self) -> None:
        """Write nothing more to the launch's runs (its lease was taken over): queued writes are dropped, later
        ones refused."""
        self._queue.abandon()

    @property
    def abandoned(self) -> bool:
        """Whether `abandon` was called."""
        return self._queue.abandoned

    def _set_status(self, run_id: str, status: str, extra: dict[str, str] | None = None) -> None:
        from mlflow.entities import RunTag

        tags = {str(Tag.STATUS): str(status), **(extra or {})}
        self.client.log_batch(run_id, tags=[RunTag(str(k), str(v)) for k, v in tags.items()])
        if status == TrialStatus.RUNNING:
            self.client.update_run(run_id, status="RUNNING")
        else:
            self.client.set_terminated(run_id, status=MLFLOW_STATUS[status])

    # --- queued writes (called from the Tune loop) ----------------------------------------------------

    def trial_started(self, trial: TrialInfo) -> None:
        """Queue: find or create the trial's run, log its params, mark it running; after the first trial's, load
        what drawing curves needs (while trials run, rather than when they end)."""
        first = not self._trials
        self._trials[trial.key] = trial
        self._queue.submit(f"start run {trial.key}", lambda: self._ensure_run(trial.key, reopen=True))
        if first and self.curves is not None:
            curves = self.curves
            self._queue.submit("load curves", lambda: curves([], "", Path()))

    def trial_tags(self, key: str, tags: dict[str, str]) -> None:
        """Queue: set tags on a started trial's run."""
        from mlflow.entities import RunTag

        def write() -> None:
            run_id = self._ensure_run(key).run_id
            self.client.log_batch(run_id, tags=[RunTag(str(k), v) for k, v in tags.items()])

        self._queue.submit(f"tag run {key}", write)

    def trial_epoch(self, key: str, metrics: dict[str, float]) -> None:
        """Queue one epoch's metrics (step = epoch, timestamp fixed now). Epochs reported within `HOLD_S` of it (or
        before the writer gets to them) are written together, one log_batch per trial."""
        with self._lock:
            self._pending.setdefault(key, []).append((metrics, int(time.time() * 1000)))
            if self._drain_queued:
                return
            self._drain_queued = True
        taken: dict[str, list[tuple[dict[str, float], int]]] = {}

        def drain() -> None:  # a retry keeps what it took (and takes what came since): nothing is lost
            if not taken:
                time.sleep(HOLD_S)
            with self._lock:
                for k, epochs in self._pending.items():
                    taken.setdefault(k, []).extend(epochs)
                self._pending, self._drain_queued = {}, False
            for k, epochs in taken.items():
                self._log_epochs(k, epochs)

        self._queue.submit("log metrics", drain)

    def trial_ended(
        self,
        key: str,
        *,
        last: dict[str, float] | None = None,
        fetch_checkpoint: Callable[[Path], Path | None] | None = None,
        error: str = "",
        tags: dict[str, str] | None = None,
    ) -> None:
        """Queue: backfill any missing epochs from the final checkpoint's history, upload the checkpoint and
        curves.png, then set the status (last, so a `finished` run always has its artifacts): `error` with an
        error, else read off the complete history (`trial_status`). `tags` are set with the status."""
        stamp = int(time.time() * 1000)
        with self._lock:
            epochs = self._pending.pop(key, [])
        if epochs:
            self._queue.submit(f"log metrics {key}", lambda: self._log_epochs(key, epochs))
        self._queue.submit(f"end run {key}", lambda: self._end(key, last, fetch_checkpoint, error, tags or {}, stamp))

    def status(self, key: str) -> str | None:
        """The status last written for a trial started through this writer (None: not started)."""
        run = self._runs.get(key)
        return run.status if run else None

    def flush(self) -> None:
        """Wait for every queued write (a hurried writer: until its deadline, then the curves it put off); raise
        TrackingError if one could not be written."""
        self._queue.flush()
        while self._deferred and not self.abandoned:
            draws, self._deferred = self._deferred, []
            for draw in draws:
                self._queue.submit("log curves.png", draw)
            self._queue.flush()

    def raise_if_failed(self) -> None:
        """Raise the write that could not be done, if any."""
        if self._queue.error is not None:
            raise self._queue.error

    @property
    def error(self) -> TrackingError | None:
        """The write that could not be done, if any (then nothing after it was written)."""
        return self._queue.error

    def close(self, timeout: float | None = None) -> None:
        """Stop the writer thread (after the writes queued so far), waiting at most `timeout` for it."""
        self._queue.close(timeout)

    # --- the writes themselves (writer thread) ------------------------------------------------------

    def _ensure_run(self, key: str, reopen: bool = False) -> _Run:
        from mlflow.entities import RunTag

        run = self._runs.get(key)
        info = self._trials[key]
        cond = self._condition(key)
        tags = {
            Tag.PARENT_RUN: self._ensure_condition(cond),
            Tag.LAUNCH_RUN: self.parent_id,
            Tag.SWEEP: self.sweep,
            Tag.LAUNCH: self.launch_id,
            Tag.ROLE: Role.TRIAL,
            Tag.STAGE: info.stage,
            Tag.CONDITION: info.condition,
            Tag.SEED: str(info.seed),
            Tag.TRIAL_KEY: key,
            Tag.STATUS: TrialStatus.RUNNING,
        }
        tags = {str(k): str(v) for k, v in tags.items()}
        if run is None:  # look first where a run may exist: a resumed launch's, or one a failed create made
            where = f"tags.`{Tag.LAUNCH}` = {quote(self.launch_id)} AND tags.`{Tag.TRIAL_KEY}` = {quote(key)}"
            maybe = self._reopened or key in self._tried
            found = search_all(self.client, [self.experiment_id], where) if maybe else []
            if found:
                run = _Run(found[0].info.run_id, "")
            else:
                self._tried.add(key)
                name = trial_run_name(cond.info.name, info.seed)
                run = _Run(
                    self.client.create_run(self.experiment_id, tags=tags, run_name=name).info.run_id, logged=set()
                )
            self._runs[key] = run
            self._log_params(run.run_id, merged_params([info.config]))
            if run.status == TrialStatus.RUNNING:  # created now
                self._condition_trial(key, TrialStatus.RUNNING)
        if reopen and run.status != TrialStatus.RUNNING:
            self.client.log_batch(run.run_id, tags=[RunTag(k, v) for k, v in tags.items()])
            self.client.update_run(run.run_id, status="RUNNING")
            run.status = TrialStatus.RUNNING
            self._condition_trial(key, TrialStatus.RUNNING)
        return run

    def _log_params(self, run_id: str, params: dict[str, str]) -> None:
        from mlflow.entities import Param

        batch = [Param(k, v) for k, v in params.items()]
        for i in range(0, len(batch), 100):
            self.client.log_batch(run_id, params=batch[i : i + 100])

    def _log_epochs(self, key: str, epochs: list[tuple[dict[str, float], int]]) -> None:
        """Log (metrics, timestamp) epochs in one batch, skipping the steps already logged."""
        from mlflow.entities import Metric

        run = self._ensure_run(key)
        if run.logged is None:
            run.logged = {m.step for m in self.client.get_metric_history(run.run_id, "epoch")}
        new = {int(m["epoch"]): (m, stamp) for m, stamp in epochs if int(m["epoch"]) not in run.logged}
        metrics = [Metric(k, float(v), stamp, step) for step, (m, stamp) in sorted(new.items()) for k, v in m.items()]
        for i in range(0, len(metrics), 1000):
            self.client.log_batch(run.run_id, metrics=metrics[i : i + 1000])
        run.logged |= set(new)
        self._condition_epochs(key, {step: m for step, (m, _) in new.items()})

    def _end(
        self,
        key: str,
        last: dict[str, float] | None,
        fetch_checkpoint: Callable[[Path], Path | None] | None,
        error: str,
        tags: dict[str, str],
        stamp: int,
    ) -> None:
        run = self._ensure_run(key)
        run.logged = None  # read the logged steps back: backfill exactly what is missing
        with tempfile.TemporaryDirectory(prefix="fasweep-ckpt-") as tmp:
            ckpt = fetch_checkpoint(Path(tmp)) if fetch_checkpoint else None
            saved = ckpt.parent / HISTORY_FILE if ckpt else None
            history = json.loads(saved.read_text()) if saved and saved.is_file() else []
            if last and "epoch" in last:
                history = [m for m in history if m["epoch"] != last["epoch"]] + [last]
            self._log_epochs(key, [(m, stamp) for m in history])
            if ckpt is not None:
                self.client.log_artifact(run.run_id, str(ckpt), CHECKPOINT_ARTIFACT_DIR)
            if self.hurried:  # metrics and statuses first: the curves once every queued write is in
                self._deferred.append(lambda: self._log_curves(run.run_id, history, key))
            else:
                self._log_curves(run.run_id, history, key, Path(tmp))
        status = TrialStatus.ERROR if error else trial_status(history, self._trials[key].planned_epochs)
        if status == TrialStatus.ERROR and not error:
            error = "the trial ended without reporting an epoch"
        extra = {str(k): v for k, v in tags.items()} | ({str(Tag.ERROR): error[:5000]} if error else {})
        self._set_status(run.run_id, status, extra)
        run.status = status
        self._condition_trial(key, status)

    def _log_curves(self, run_id: str, history: list[dict[str, float]], key: str, folder: Path | None = None) -> None:
        """Draw a trial's curves.png (in `folder`, else a temporary one) and log it on its run."""
        if self.curves is None:
            return
        with tempfile.TemporaryDirectory(prefix="fasweep-curves-") as tmp:
            path = (folder or Path(tmp)) / CURVES_ARTIFACT
            if self.curves(history, key, path):
                self.client.log_artifact(run_id, str(path))

    # --- condition runs and the launch summary (writer thread; see fasweep.runs.conditions) --------------

    def _condition(self, key: str) -> _Cond:
        """The condition of a started trial; a condition the plan did not declare has the trials started so far."""
        info = self._trials[key]
        cond = self._conds.get((info.stage, info.condition))
        if cond is None:
            params = {k: v for k, v in merged_params([info.config]).items() if k != "train.seed"}
            declared = ConditionInfo(info.stage, info.condition, info.condition, (), params, info.planned_epochs)
            cond = self._conds[info.stage, info.condition] = _Cond(declared, [])
        if key not in cond.keys:
            cond.keys.append(key)
        return cond

    def _where(self, role: Role, cond: _Cond) -> str:
        """Search filter: this launch's runs of `role` for the condition."""
        return (
            f"tags.`{Tag.LAUNCH}` = {quote(self.launch_id)} AND tags.`{Tag.ROLE}` = '{role}' AND "
            f"tags.`{Tag.STAGE}` = {quote(cond.info.stage)} AND tags.`{Tag.CONDITION}` = {quote(cond.info.condition)}"
        )

    def _ensure_condition(self, cond: _Cond) -> str:
        """The condition's run id: found by its tags (the newest, when a replacement was cut short) or created."""
        if cond.run_id:
            return cond.run_id
        found = [
            r
            for r in search_all(self.client, [self.experiment_id], self._where(Role.CONDITION, cond))
            if r.info.run_id not in cond.obsolete
        ]
        if found:
            *older, newest = sorted(found, key=lambda r: (r.info.start_time, r.info.run_id))
            cond.run_id = newest.info.run_id
            cond.obsolete += [r.info.run_id for r in older]
        else:
            tags = {
                Tag.PARENT_RUN: self.parent_id,
                Tag.LAUNCH_RUN: self.parent_id,
                Tag.SWEEP: self.sweep,
                Tag.LAUNCH: self.launch_id,
                Tag.ROLE: Role.CONDITION,
                Tag.STAGE: cond.info.stage,
                Tag.CONDITION: cond.info.condition,
                Tag.STATUS: TrialStatus.RUNNING,
            } | ({Tag.N_TRIALS: len(cond.info.keys)} if cond.info.keys else {})
            tags = {str(k): str(v) for k, v in tags.items()}
            run = self.client.create_run(self.experiment_id, tags=tags, run_name=cond.info.name)
            cond.run_id, cond.status = run.info.run_id, TrialStatus.RUNNING
            cond.loaded |= not self._reopened  # a new launch's: no trial run of it to read
        self._log_params(cond.run_id, cond.info.params)
        return cond.run_id

    def _history(self, run_id: str, keys: Iterable[str]) -> History:
        """A run's logged metrics `keys` by step."""
        history: History = {}
        for key in keys:
            for m in self.client.get_metric_history(run_id, key):
                history.setdefault(m.step, {})[key] = m.value
        return history

    def _loaded(self, key: str) -> _Cond:
        """The trial's condition with its trials' statuses and histories and its own written epochs read from the
        store (once per writer, and not for a new launch's condition run it made: afterwards the writer keeps them,
        being the only writer)."""
        cond = self._condition(key)
        if not cond.loaded:
            run_id = self._ensure_condition(cond)
            for r in search_all(self.client, [self.experiment_id], self._where(Role.TRIAL, cond)):
                trial = r.data.tags.get(Tag.TRIAL_KEY, "")
                if trial not in cond.keys:
                    cond.keys.append(trial)
                cond.statuses[trial] = r.data.tags.get(Tag.STATUS, TrialStatus.RUNNING)
                cond.histories[trial] = self._history(r.info.run_id, r.data.metrics)
            run = self.client.get_run(run_id)
            cond.written = self._history(run_id, run.data.metrics)
            cond.changed |= set(range(1, max(cond.written, default=0) + 1))  # an earlier driver's: checked once
            cond.status = run.data.tags.get(Tag.STATUS, "")
            cond.loaded = True
        run = self._runs[key]
        if key not in cond.histories:  # a run made after the load: read, unless known to hold no epoch yet
            empty = run.logged is not None and not run.logged
            cond.histories[key] = (
                {} if empty else self._history(run.run_id, self.client.get_run(run.run_id).data.metrics)
            )
        return cond

    def _condition_trial(self, key: str, status: str) -> None:
        """A trial of the condition started or ended (who counts may have changed)."""
        cond = self._loaded(key)
        span = range(1, max(cond.written, default=0) + 1)
        before = _counted(cond, key, span)
        cond.statuses[key] = status
        self._write_condition(cond, key, span, before)

    def _condition_epochs(self, key: str, epochs: dict[int, dict[str, float]]) -> None:
        """Epochs newly logged on a trial: write the condition's epochs they settle."""
        cond = self._loaded(key)
        history = cond.histories[key]
        first = min([*epochs, max(history, default=0) + 1])  # below it, how it counts stays (see trial_counts_at)
        span = range(first, max(cond.written, default=0) + 1)
        before = _counted(cond, key, span)
        history.update(epochs)
        self._write_condition(cond, key, span, before)

    def _write_condition(self, cond: _Cond, key: str, span: range, before: list[dict[str, float] | None]) -> None:
        """Log the condition's newly settled epochs and its status after a change to trial `key`, which counted as
        `before` at the epochs `span` (up to the last written, where it may count differently now). The epochs
        where a trial counts differently are recomputed; if a written one changed, or one is no longer settled (a
        trial errored, or an errored one was resumed), the run is replaced by a new one holding the right values
        (MLflow cannot overwrite a metric's step)."""
        from mlflow.entities import Metric, RunTag

        after = _counted(cond, key, span)
        cond.changed |= {e for e, a, b in zip(span, before, after, strict=True) if a is not b}
        trials = [(cond.statuses.get(k), cond.histories.get(k, {})) for k in cond.keys]
        through = settled_through(trials, cond.info.epochs)
        top = max(cond.written, default=0)
        values = {
            e: row for e in sorted({*cond.changed, *range(top + 1, through + 1)}) if (row := aggregate(trials, e))
        }
        stale = top > through or any(
            not _same(cond.written[e], values.get(e)) for e in cond.changed & cond.written.keys()
        )
        cond.changed.clear()
        if stale:
            cond.obsolete.append(cond.run_id)
            cond.run_id, cond.written, cond.status = "", {}, ""
            self._ensure_condition(cond)
            values = {e: row for e in range(1, through + 1) if (row := aggregate(trials, e))}
        stamp = int(time.time() * 1000)
        new = [Metric(k, v, stamp, e) for e, row in values.items() if e not in cond.written for k, v in row.items()]
        for i in range(0, len(new), 1000):
            self.client.log_batch(cond.run_id, metrics=new[i : i + 1000])
        cond.written |= {e: row for e, row in values.items() if e not in cond.written}
        if cond.obsolete:
            for r in search_all(self.client, [self.experiment_id], self._where(Role.TRIAL, cond)):
                if r.data.tags.get(Tag.PARENT_RUN) != cond.run_id:
                    self.client.log_batch(r.info.run_id, tags=[RunTag(str(Tag.PARENT_RUN), cond.run_id)])
            for run_id in cond.obsolete:
                self.client.delete_run(run_id)
            cond.obsolete.clear()
        status = condition_status(cond.statuses.get(k) for k in cond.keys)
        if status != cond.status:
            self._set_status(cond.run_id, status)
            cond.status = status

    def _log_summary(self) -> None:
        """The launch's summary on the parent: the best condition's final mean of the "best" metric with its sd
        and n (`best_<metric>`, `best_<metric>_sd`, `best_n`), the condition in a tag, both in the description."""
        from mlflow.entities import Metric, RunTag

        if self._parent is None:
            return
        best = self._parent.best
        where = f"tags.`{Tag.LAUNCH}` = {quote(self.launch_id)} AND tags.`{Tag.ROLE}` = '{Role.CONDITION}'"
        runs = {
            condition_label(r.data.tags.get(Tag.STAGE, ""), r.data.tags.get(Tag.CONDITION, "")): r
            for r in search_all(self.client, [self.experiment_id], where)
        }
        chosen = best_condition(((name, r.data.metrics) for name, r in runs.items()), best)
        if chosen is None:
            return
        name, _ = chosen
        run = runs[name]
        history = self._history(run.info.run_id, [best.metric, best.metric + SD_SUFFIX, N_METRIC])
        epoch = max(e for e, row in history.items() if best.metric in row)
        final = history[epoch]
        summary = {f"best_{k}": v for k, v in final.items()}
        known = self.client.get_run(self.parent_id).data.metrics
        stamp = int(time.time() * 1000)
        metrics = [Metric(k, v, stamp, 0) for k, v in summary.items() if known.get(k) != v]
        sd = final.get(best.metric + SD_SUFFIX)
        spread = f" ± {sd:.4f}" if sd is not None else ""
        result = (
            f"\n\n**Best condition:** {run.info.run_name} (`{name}`): {best.metric} {final[best.metric]:.4f}"
            f"{spread} (n = {final.get(N_METRIC, 0):g}) at epoch {epoch}."
        )
        tags = {Tag.BEST_CONDITION: name, Tag.NOTE: self._parent.description + result}
        self.client.log_batch(self.parent_id, metrics=metrics, tags=[RunTag(str(k), v) for k, v in tags.items()])


def _counted(cond: _Cond, key: str, epochs: range) -> list[dict[str, float] | None]:
    """How trial `key` counts in its condition at `epochs` (None: not at all)."""
    status, history = cond.statuses.get(key), cond.histories[key]
    return [trial_counts_at(status, history, e) for e in epochs]


def _same(a: dict[str, float], b: dict[str, float] | None) -> bool:
    """Whether two epochs of a condition hold the same values (as read back from the store)."""
    return b is not None and a.keys() == b.keys() and all(math.isclose(a[k], b[k], rel_tol=1e-9) for k in a)


def mark_interrupted(mlflow: Any, run_ids: list[str], budget_s: float = RETRY_BUDGET_S) -> None:
    """Mark runs (a launch's parent, its trials) whose driver is gone `interrupted` (MLflow KILLED), now, in at
    most `budget_s` (those left then stay as they are): for `fasweep status` and `--resume`, which find a launch
    still marked running after its driver was killed."""
    from mlflow.entities import RunTag

    tag = [RunTag(str(Tag.STATUS), str(TrialStatus.INTERRUPTED))]
    killed = MLFLOW_STATUS[TrialStatus.INTERRUPTED]
    deadline = time.monotonic() + budget_s
    for run_id in run_ids:
        left = deadline - time.monotonic()
        if left <= 0:
            return
        retry(lambda run_id=run_id: mlflow.log_batch(run_id, tags=tag), "mark run interrupted", left)
        retry(lambda run_id=run_id: mlflow.set_terminated(run_id, killed), "end run", left)


def interrupt_launch(mlflow: Any, experiment_id: str, launch_id: str, budget_s: float = RETRY_BUDGET_S) -> None:
    """Mark a launch whose driver is gone `interrupted`: its parent, if still marked running, then its running
    condition and trial runs."""
    where = (
        f"tags.`{Tag.LAUNCH}` = {quote(launch_id)} AND tags.`{Tag.ROLE}` = '{Role.PARENT}' AND "
        f"tags.`{Tag.STATUS}` = '{LaunchStatus.RUNNING}'"
    )
    parents = [r.info.run_id for r in retry(lambda: search_all(mlflow, [experiment_id], where), "find launch")]
    mark_interrupted(mlflow, [*parents, *running_runs(mlflow, experiment_id, launch_id)], budget_s)
