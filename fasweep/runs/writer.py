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
import os
import tempfile
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from fasweep.runs.condition_runs import ConditionRuns
from fasweep.runs.conditions import ParentInfo, merged_params
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
    parent_run_name,
    trial_run_name,
    trial_status,
)
from fasweep.runs.reader import running_runs
from fasweep.runs.store import RETRY_BUDGET_S, TrackingError, client, log_params, quote, retry, search_all, set_status

if TYPE_CHECKING:
    from fasweep.spec.plan import PlannedTrial

log = logging.getLogger(__name__)
T = TypeVar("T")
HOLD_S = 0.25  # a metrics write waits this long for more epochs to join it (one SQL transaction per trial per batch)

# (history, title, path) -> whether a curves PNG was written to path; an empty history loads what drawing needs
Curves = Callable[[list[dict[str, float]], str, Path], bool]


@dataclass
class _Run:
    run_id: str
    status: str = TrialStatus.RUNNING
    logged: set[int] | None = None  # metric steps (epochs) already in MLflow; None: not read yet


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
    _trials: dict[str, PlannedTrial] = field(default_factory=dict, init=False)  # started trials, configs resolved
    _pending: dict[str, list[tuple[dict[str, float], int]]] = field(default_factory=dict, init=False)
    _drain_queued: bool = field(default=False, init=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, init=False)
    _conditions: ConditionRuns | None = field(default=None, init=False)  # the launch's, once its parent is open
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
        if run_id:
            self.parent_id, self._reopened = run_id, True
            self._conditions = self._condition_runs(parent)
            self.sync("reopen parent run", lambda: set_status(self.client, run_id, LaunchStatus.RUNNING))
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
        self._conditions = self._condition_runs(parent)
        if parent is not None:
            self.sync("log parent params", lambda: log_params(self.client, self.parent_id, parent.params))
        self.sync("log spec.yaml", lambda: self.client.log_text(self.parent_id, spec_yaml, SPEC_ARTIFACT))

    def _condition_runs(self, parent: ParentInfo | None) -> ConditionRuns:
        return ConditionRuns(
            self.client, self.experiment_id, self.sweep, self.launch_id, self.parent_id, self._reopened, parent
        )

    def finish_parent(self, status: LaunchStatus) -> None:
        """Log the launch's summary (`ConditionRuns.summarize`; not when hurried), set the parent's status and end
        its MLflow run accordingly."""
        if self.abandoned:
            return
        if not self.hurried and self._conditions is not None:
            self.sync("log launch summary", self._conditions.summarize)
        self.sync("end parent run", lambda: set_status(self.client, self.parent_id, status))
        self.ended = True

    def interrupt_runs(self, run_ids: list[str], until: float | None = None) -> None:
        """Mark trial runs whose driver stopped before they ended `interrupted` (MLflow KILLED), now: within the
        writer's budget, or up to `until` (time.monotonic(): a grace period's own end, later than its writes')."""
        if not self.abandoned:
            budget = self._budget() if until is None else max(self._budget(), until - time.monotonic())
            mark_interrupted(self.client, run_ids, budget)

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

    # --- queued writes (called from the Tune loop) ----------------------------------------------------

    def trial_started(self, trial: PlannedTrial) -> None:
        """Queue: find or create the trial's run, log its params (its `config`, as resolved for the run), mark it
        running; after the first trial's, load what drawing curves needs (while trials run, rather than when they
        end)."""
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
        conditions = self._opened()
        cond = conditions.of(info)
        tags = {
            Tag.PARENT_RUN: conditions.run_id(cond),
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
            log_params(self.client, run.run_id, merged_params([info.config]))
            if run.status == TrialStatus.RUNNING:  # created now
                conditions.trial_status(info, run.run_id, run.logged, TrialStatus.RUNNING)
        if reopen and run.status != TrialStatus.RUNNING:
            self.client.log_batch(run.run_id, tags=[RunTag(k, v) for k, v in tags.items()])
            self.client.update_run(run.run_id, status="RUNNING")
            run.status = TrialStatus.RUNNING
            conditions.trial_status(info, run.run_id, run.logged, TrialStatus.RUNNING)
        return run

    def _opened(self) -> ConditionRuns:
        """The launch's condition runs (its parent is open before any trial starts)."""
        if self._conditions is None:
            raise RuntimeError("a trial started before the launch's parent run was opened")
        return self._conditions

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
        self._opened().trial_epochs(
            self._trials[key], run.run_id, run.logged, {step: m for step, (m, _) in new.items()}
        )

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
        status = TrialStatus.ERROR if error else trial_status(history, self._trials[key].epochs)
        if status == TrialStatus.ERROR and not error:
            error = "the trial ended without reporting an epoch"
        extra = {str(k): v for k, v in tags.items()} | ({str(Tag.ERROR): error[:5000]} if error else {})
        set_status(self.client, run.run_id, status, extra)
        run.status = status
        self._opened().trial_status(self._trials[key], run.run_id, run.logged, status)

    def _log_curves(self, run_id: str, history: list[dict[str, float]], key: str, folder: Path | None = None) -> None:
        """Draw a trial's curves.png (in `folder`, else a temporary one) and log it on its run."""
        if self.curves is None:
            return
        with tempfile.TemporaryDirectory(prefix="fasweep-curves-") as tmp:
            path = (folder or Path(tmp)) / CURVES_ARTIFACT
            if self.curves(history, key, path):
                self.client.log_artifact(run_id, str(path))


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
