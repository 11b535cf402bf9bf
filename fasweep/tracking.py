"""MLflow tracking of sweeps: the driver is the single writer of one parent run per launch and a child run per trial.

Layout (read by `fasweep.report`): a parent run `<sweep>@<launch_id>` tagged `fasweep.role=parent`, and one
child run `<condition>-s<seed>` per trial tagged `fasweep.role=trial` and `mlflow.parentRunId`, with the
flattened TrialConfig as params, per-epoch metrics (step = epoch) and `checkpoint/checkpoint.pt` + `curves.png`.

Writes go through one background thread in order (epochs reported within `HOLD_S` are written together); each
write is retried with backoff for a bounded time (a tracking-server restart is survived), after which the launch
fails loudly with a `TrackingError`. Every write is idempotent (runs are looked up by tags before creating, metric
steps already logged are skipped, metric timestamps are fixed when an epoch is reported), so a retried or resumed
write never duplicates anything.
"""

from __future__ import annotations

import json
import logging
import os
import queue
import tempfile
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from fasweep.config import flatten
from fasweep.errors import UserError

log = logging.getLogger(__name__)
T = TypeVar("T")

TAG = "fasweep."
PARENT_STATUSES = ("running", "finished", "failed", "interrupted")
TRIAL_STATUSES = ("running", "finished", "diverged", "stopped", "error")
COMPLETE = frozenset({"finished", "diverged", "stopped"})  # trial statuses that need no more work
CURVE_KEYS = ("train_loss", "val_loss", "test_loss", "train_acc", "val_acc", "test_acc")
CHECKPOINT_ARTIFACT = "checkpoint/checkpoint.pt"
HISTORY_NAME = "history.json"  # beside checkpoint.pt in each Tune checkpoint: the trial's metrics so far
RETRY_BUDGET_S = float(os.environ.get("FASWEEP_TRACKING_RETRY_S", "600"))
HOLD_S = 0.25  # a metrics write waits this long for more epochs to join it (one SQL transaction per trial per batch)
_PERMANENT_CODES = {"INVALID_PARAMETER_VALUE", "RESOURCE_ALREADY_EXISTS", "RESOURCE_DOES_NOT_EXIST", "BAD_REQUEST"}
_PERMANENT_CODES |= {"PERMISSION_DENIED", "UNAUTHENTICATED"}


class TrackingError(UserError):
    """The tracking store stayed unreachable past the retry budget; nothing was dropped silently."""


def resolve_tracking_uri(flag: str | None = None) -> str:
    """Tracking URI precedence: `--tracking-uri` > `$MLFLOW_TRACKING_URI` > `sqlite:///<cwd>/mlflow.db`."""
    return flag or os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path.cwd() / 'mlflow.db'}"


def check_reachable(uri: str, timeout_s: float = 5.0) -> None:
    """Raise a one-line UserError unless the tracking store at `uri` answers within about `timeout_s`."""
    fix = "start the store or pass a reachable --tracking-uri (or set MLFLOW_TRACKING_URI)"
    scheme = urllib.parse.urlparse(uri).scheme
    try:
        if scheme in ("http", "https"):
            import requests

            response = requests.get(uri.rstrip("/") + "/health", timeout=timeout_s)
            if response.status_code >= 500:
                raise ConnectionError(f"HTTP {response.status_code}")
        elif scheme == "sqlite":
            db = Path(uri.removeprefix("sqlite:///") if uri.startswith("sqlite:///") else uri.removeprefix("sqlite://"))
            if not db.parent.is_dir() or not os.access(db.parent, os.W_OK):
                raise ConnectionError(f"directory {db.parent} does not exist or is not writable")
        elif scheme.split("+")[0] in ("postgresql", "mysql"):
            _check_database(uri, timeout_s)
        elif scheme in ("", "file"):
            root = Path(urllib.parse.urlparse(uri).path if scheme else uri)
            if not root.parent.is_dir():
                raise ConnectionError(f"directory {root.parent} does not exist")
        _with_few_http_retries(lambda: _client(uri).search_experiments(max_results=1))
    except UserError:
        raise
    except Exception as exc:
        reason = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
        raise UserError.field("tracking URI", uri, f"a reachable MLflow store ({reason}); {fix}") from None


def _check_database(uri: str, timeout_s: float) -> None:
    """Open one connection to a SQL backend store with a connect timeout (MLflow itself retries for minutes)."""
    import sqlalchemy

    engine = sqlalchemy.create_engine(uri, connect_args={"connect_timeout": max(1, int(timeout_s))})
    try:
        with engine.connect():
            pass
    finally:
        engine.dispose()


def _with_few_http_retries(fn: Callable[[], T]) -> T:
    """Run `fn` with MLflow's own HTTP retries turned down (our retry loop is the policy)."""
    saved = {k: os.environ.get(k) for k in ("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "MLFLOW_HTTP_REQUEST_TIMEOUT")}
    os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] = "0"
    os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"] = "10"
    try:
        return fn()
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def _client(uri: str) -> Any:
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri)


def _permanent(exc: BaseException) -> bool:
    """True for errors a retry cannot fix (bad request, conflicting param), False for outages."""
    from mlflow.exceptions import MlflowException

    return isinstance(exc, MlflowException) and exc.error_code in _PERMANENT_CODES


def retry(fn: Callable[[], T], what: str, budget_s: float = RETRY_BUDGET_S, uri: str = "") -> T:
    """Call `fn` until it succeeds, backing off 0.5 s .. 30 s for at most `budget_s`; then raise TrackingError."""
    deadline = time.monotonic() + budget_s
    delay = 0.5
    while True:
        try:
            return fn()
        except Exception as exc:
            if _permanent(exc) or time.monotonic() + delay > deadline:
                reason = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
                raise TrackingError(
                    f"MLflow store {uri or '?'}: {what} failed for {budget_s:.0f}s ({reason}); results are kept in "
                    "the Ray Tune storage: bring the store back and run `fasweep launch SPEC --resume`"
                ) from exc
            log.warning("MLflow %s failed (%s); retrying in %.1fs", what, type(exc).__name__, delay)
            time.sleep(delay)
            delay = min(delay * 2, 30.0)


def _quote(value: str) -> str:
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


def search_all(client: Any, experiment_ids: list[str], filter_string: str, order_by: list[str] | None = None) -> list:
    """All runs matching `filter_string` (pages through results)."""
    runs: list = []
    token = None
    while True:
        page = client.search_runs(experiment_ids, filter_string, max_results=1000, order_by=order_by, page_token=token)
        runs.extend(page)
        token = page.token
        if not token:
            return runs


@dataclass
class TrialInfo:
    """What the tracker needs to know about one planned trial (its config already resolved)."""

    key: str
    stage: str
    condition: str
    seed: int
    config: dict[str, Any]


@dataclass
class _Child:
    run_id: str
    status: str = "running"
    logged: set[int] | None = None  # metric steps (epochs) already in MLflow; None: not read yet


class _Writer:
    """One background thread applying queued writes in order, each retried; a final failure is kept and re-raised."""

    def __init__(self, uri: str, budget_s: float) -> None:
        self._uri = uri
        self._budget_s = budget_s
        self._queue: queue.Queue[tuple[str, Callable[[], None]] | None] = queue.Queue()
        self.error: TrackingError | None = None
        self._thread = threading.Thread(target=self._loop, name="fasweep-mlflow-writer", daemon=True)
        self._thread.start()

    def submit(self, what: str, fn: Callable[[], None]) -> None:
        """Queue a write; after a failure writes are not attempted (the failure is raised by flush/raise_if_failed)."""
        self._queue.put((what, fn))

    def raise_if_failed(self) -> None:
        if self.error is not None:
            raise self.error

    def flush(self) -> None:
        """Wait until every queued write is applied (or the writer has failed), then raise its failure if any."""
        self._queue.join()
        self.raise_if_failed()

    def close(self) -> None:
        self._queue.put(None)
        self._thread.join()

    def _loop(self) -> None:
        while True:
            item = self._queue.get()
            try:
                if item is None:
                    return
                what, fn = item
                if self.error is None:  # after a failure keep draining, never write out of order
                    try:
                        retry(fn, what, self._budget_s, self._uri)
                    except TrackingError as exc:
                        self.error = exc
                    except Exception as exc:  # a bug in a write: surface it, don't kill the thread silently
                        self.error = TrackingError(f"MLflow {what} failed: {type(exc).__name__}: {exc}")
                        log.exception("MLflow %s failed", what)
            finally:
                self._queue.task_done()


@dataclass
class SweepTracker:
    """The driver-side writer for one launch of one sweep.

    Synchronous calls (`open_parent`, `load_children`, `finish_parent`, `best_run`) are for the driver's main
    thread; `trial_*` calls only queue writes (the Tune loop never blocks on MLflow). Call `flush()` before
    reading what was written and `close()` at the end.
    """

    uri: str
    experiment: str
    sweep: str
    budget_s: float = RETRY_BUDGET_S
    launch_id: str = ""
    parent_id: str = ""
    experiment_id: str = field(init=False)
    _trials: dict[str, TrialInfo] = field(default_factory=dict, init=False)
    _children: dict[str, _Child] = field(default_factory=dict, init=False)
    _pending: dict[str, list[tuple[dict[str, float], int]]] = field(default_factory=dict, init=False)
    _drain_queued: bool = field(default=False, init=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, init=False)

    def __post_init__(self) -> None:
        # Our retry loop is the policy; MLflow's default (7 retries, 120 s timeouts) would hide outages for minutes.
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "30")
        self.client = _client(self.uri)
        self._writer = _Writer(self.uri, self.budget_s)
        self.experiment_id = self._sync("get experiment", self._get_or_create_experiment)

    # --- driver-side, synchronous -------------------------------------------------------------------

    def _sync(self, what: str, fn: Callable[[], T]) -> T:
        return retry(fn, what, self.budget_s, self.uri)

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

    def latest_parent(self) -> Any | None:
        """The most recent parent run of this sweep in the experiment, or None."""
        runs = self._sync(
            "search parent runs",
            lambda: self.client.search_runs(
                [self.experiment_id],
                f"tags.`{TAG}role` = 'parent' AND tags.`{TAG}sweep` = {_quote(self.sweep)}",
                max_results=1,
                order_by=["attributes.start_time DESC"],
            ),
        )
        return runs[0] if runs else None

    def open_parent(
        self, launch_id: str, *, axes: list[str], n_trials: int, spec_yaml: str, plan_hash: str, run_id: str = ""
    ) -> None:
        """Create the parent run for a new launch, or reopen `run_id` (status back to running) on --resume."""
        self.launch_id = launch_id
        tags = {
            f"{TAG}sweep": self.sweep,
            f"{TAG}launch": launch_id,
            f"{TAG}role": "parent",
            f"{TAG}status": "running",
            f"{TAG}axes": json.dumps(axes),
            f"{TAG}n_trials": str(n_trials),
            f"{TAG}plan_hash": plan_hash,
        }
        if run_id:
            self.parent_id = run_id
            self._sync("reopen parent run", lambda: self._set_tags(run_id, {f"{TAG}status": "running"}, "RUNNING"))
            return
        run = self._sync(
            "create parent run",
            lambda: self.client.create_run(self.experiment_id, tags=tags, run_name=f"{self.sweep}@{launch_id}"),
        )
        self.parent_id = run.info.run_id
        self._sync("log spec.yaml", lambda: self.client.log_text(self.parent_id, spec_yaml, "spec.yaml"))

    def finish_parent(self, status: str) -> None:
        """Set the parent's `fasweep.status` (finished|failed|interrupted) and end the MLflow run accordingly."""
        mlflow_status = {"finished": "FINISHED", "failed": "FAILED", "interrupted": "KILLED"}[status]
        self._sync("end parent run", lambda: self._set_tags(self.parent_id, {f"{TAG}status": status}, mlflow_status))

    def _set_tags(self, run_id: str, tags: dict[str, str], mlflow_status: str) -> None:
        from mlflow.entities import RunTag

        self.client.log_batch(run_id, tags=[RunTag(k, v) for k, v in tags.items()])
        if mlflow_status == "RUNNING":
            self.client.update_run(run_id, status="RUNNING")
        else:
            self.client.set_terminated(run_id, status=mlflow_status)

    def children(self) -> list[Any]:
        """All child runs of this launch (MLflow Run objects)."""
        return self._sync(
            "search child runs",
            lambda: search_all(
                self.client,
                [self.experiment_id],
                f"tags.`{TAG}launch` = {_quote(self.launch_id)} AND tags.`{TAG}role` = 'trial'",
            ),
        )

    def load_children(self) -> dict[str, str]:
        """Read this launch's child runs into the tracker's cache; return trial key -> status."""
        for run in self.children():
            key = run.data.tags.get(f"{TAG}trial_key", "")
            self._children[key] = _Child(run.info.run_id, run.data.tags.get(f"{TAG}status", ""))
        return {key: child.status for key, child in self._children.items()}

    def register(self, trials: Iterable[TrialInfo]) -> None:
        """Make trials known (their resolved configs become the child runs' params)."""
        for trial in trials:
            self._trials[trial.key] = trial

    def planned_epochs(self, key: str) -> int:
        """`train.epochs` of a registered trial."""
        return int(self._trials[key].config["train"]["epochs"])

    def best_run(self, stage: str, condition: str, metric: str, select: str, mode: str) -> Any:
        """The finished child run of `stage`/`condition` with the best final `metric` (`select: last`: the latest)."""
        self.flush()
        runs = [
            r
            for r in self.children()
            if r.data.tags.get(f"{TAG}stage") == stage
            and r.data.tags.get(f"{TAG}condition") == condition
            and r.data.tags.get(f"{TAG}status") == "finished"
        ]
        if not runs:
            raise UserError.field(
                "init_from", f"{stage}/{condition}", "a finished run of that stage and condition in this launch"
            )
        if select == "last":
            return max(runs, key=lambda r: r.info.end_time or 0)
        scored = [r for r in runs if metric in r.data.metrics]
        if not scored:
            raise UserError.field("init_from.metric", metric, f"a metric logged by the runs of {stage}/{condition}")
        best = min if mode == "min" else max
        return best(scored, key=lambda r: r.data.metrics[metric])

    def download_checkpoint(self, run_id: str, dst: Path) -> Path:
        """Download a child run's final checkpoint artifact into `dst`; return the local file."""
        return Path(
            self._sync(
                "download checkpoint",
                lambda: self.client.download_artifacts(run_id, CHECKPOINT_ARTIFACT, str(dst)),
            )
        )

    # --- queued writes (called from the Tune loop) ----------------------------------------------------

    def trial_started(self, key: str) -> None:
        """Queue: find or create the trial's child run, log its params, tag it running."""
        self._writer.submit(f"start run {key}", lambda: self._ensure_child(key, reopen=True))

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

        self._writer.submit("log metrics", drain)

    def trial_ended(
        self,
        key: str,
        *,
        last: dict[str, float] | None = None,
        fetch_checkpoint: Callable[[Path], Path | None] | None = None,
        error: str = "",
    ) -> None:
        """Queue: backfill any missing epochs from the final checkpoint's history, upload the checkpoint and
        curves.png, then set the status tag (last, so a `finished` run always has its artifacts). The status is
        `error` with an error, else read off the complete history (see `trial_status`)."""
        stamp = int(time.time() * 1000)
        with self._lock:
            epochs = self._pending.pop(key, [])
        if epochs:
            self._writer.submit(f"log metrics {key}", lambda: self._log_epochs(key, epochs))
        self._writer.submit(f"end run {key}", lambda: self._end(key, last, fetch_checkpoint, error, stamp))

    def flush(self) -> None:
        """Wait for every queued write; raise TrackingError if one could not be written."""
        self._writer.flush()

    def raise_if_failed(self) -> None:
        self._writer.raise_if_failed()

    @property
    def error(self) -> TrackingError | None:
        """The write that could not be done, if any (then nothing after it was written)."""
        return self._writer.error

    def close(self) -> None:
        self._writer.close()

    # --- the writes themselves (writer thread) ------------------------------------------------------

    def _ensure_child(self, key: str, reopen: bool = False) -> _Child:
        from mlflow.entities import Param, RunTag

        child = self._children.get(key)
        info = self._trials[key]
        tags = {
            "mlflow.parentRunId": self.parent_id,
            f"{TAG}sweep": self.sweep,
            f"{TAG}launch": self.launch_id,
            f"{TAG}role": "trial",
            f"{TAG}stage": info.stage,
            f"{TAG}condition": info.condition,
            f"{TAG}seed": str(info.seed),
            f"{TAG}trial_key": key,
            f"{TAG}status": "running",
        }
        if child is None:  # a retried create may have succeeded server-side: look it up first
            found = search_all(
                self.client,
                [self.experiment_id],
                f"tags.`{TAG}launch` = {_quote(self.launch_id)} AND tags.`{TAG}trial_key` = {_quote(key)}",
            )
            if found:
                child = _Child(found[0].info.run_id, "")
            else:
                run = self.client.create_run(self.experiment_id, tags=tags, run_name=f"{info.condition}-s{info.seed}")
                child = _Child(run.info.run_id, logged=set())
            self._children[key] = child
            params = [Param(k, "None" if v is None else str(v)) for k, v in flatten(info.config).items()]
            for i in range(0, len(params), 100):
                self.client.log_batch(child.run_id, params=params[i : i + 100])
        if reopen and child.status != "running":
            self.client.log_batch(child.run_id, tags=[RunTag(k, v) for k, v in tags.items()])
            self.client.update_run(child.run_id, status="RUNNING")
            child.status = "running"
        return child

    def _log_epochs(self, key: str, epochs: list[tuple[dict[str, float], int]]) -> None:
        """Log (metrics, timestamp) epochs in one batch, skipping the steps already logged."""
        from mlflow.entities import Metric

        child = self._ensure_child(key)
        if child.logged is None:
            child.logged = {m.step for m in self.client.get_metric_history(child.run_id, "epoch")}
        new = {int(m["epoch"]): (m, stamp) for m, stamp in epochs if int(m["epoch"]) not in child.logged}
        metrics = [Metric(k, float(v), stamp, step) for step, (m, stamp) in sorted(new.items()) for k, v in m.items()]
        for i in range(0, len(metrics), 1000):
            self.client.log_batch(child.run_id, metrics=metrics[i : i + 1000])
        child.logged |= set(new)

    def _end(
        self,
        key: str,
        last: dict[str, float] | None,
        fetch_checkpoint: Callable[[Path], Path | None] | None,
        error: str,
        stamp: int,
    ) -> None:
        from mlflow.entities import RunTag

        child = self._ensure_child(key)
        child.logged = None  # read the logged steps back: backfill exactly what is missing
        with tempfile.TemporaryDirectory(prefix="fasweep-ckpt-") as tmp:
            ckpt = fetch_checkpoint(Path(tmp)) if fetch_checkpoint else None
            saved = ckpt.parent / HISTORY_NAME if ckpt else None
            history = json.loads(saved.read_text()) if saved and saved.is_file() else []
            if last and "epoch" in last:
                history = [m for m in history if m["epoch"] != last["epoch"]] + [last]
            self._log_epochs(key, [(m, stamp) for m in history])
            if ckpt is not None:
                self.client.log_artifact(child.run_id, str(ckpt), "checkpoint")
        status = "error" if error else trial_status(history, self.planned_epochs(key))
        if status == "error" and not error:
            error = "the trial ended without reporting an epoch"
        figure = _curves(history, key)
        if figure is not None:
            self.client.log_figure(child.run_id, figure, "curves.png")
        tags = {f"{TAG}status": status}
        if error:
            tags[f"{TAG}error"] = error[:5000]
        self.client.log_batch(child.run_id, tags=[RunTag(k, v) for k, v in tags.items()])
        self.client.set_terminated(child.run_id, status="FAILED" if status == "error" else "FINISHED")
        child.status = status


def trial_status(history: list[dict[str, float]], planned_epochs: int) -> str:
    """diverged (last epoch non-finite), stopped (ended early: ASHA), finished, or error (no epoch at all)."""
    if not history:
        return "error"
    last = max(history, key=lambda m: m["epoch"])
    if last.get("diverged"):
        return "diverged"
    return "stopped" if last["epoch"] < planned_epochs else "finished"


def _curves(history: list[dict[str, float]], title: str) -> Any | None:
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


# --- reading sweeps back (`fasweep status`) ----------------------------------------------------------


@dataclass
class LaunchSummary:
    """One parent run with its trials' states, for `fasweep status`."""

    sweep: str
    launch_id: str
    status: str
    started: str
    n_trials: int
    counts: dict[str, int]
    best: tuple[str, float] | None  # (condition-seed, test_acc)
    trials: list[dict[str, Any]]


def sweep_summaries(uri: str, sweep: str | None = None, metric: str = "test_acc") -> list[LaunchSummary]:
    """All launches (parent runs) in the store, newest first; only those of `sweep` when given."""
    client = _client(uri)
    experiments = [e.experiment_id for e in client.search_experiments()]
    if not experiments:
        return []
    where = f"tags.`{TAG}role` = 'parent'"
    if sweep:
        where += f" AND tags.`{TAG}sweep` = {_quote(sweep)}"
    out = []
    for i in range(0, len(experiments), 100):
        batch = experiments[i : i + 100]
        for parent in search_all(client, batch, where, order_by=["attributes.start_time DESC"]):
            tags = parent.data.tags
            children = search_all(
                client,
                [parent.info.experiment_id],
                f"tags.`{TAG}launch` = {_quote(tags.get(f'{TAG}launch', ''))} AND tags.`{TAG}role` = 'trial'",
            )
            trials = sorted(
                (
                    {
                        "key": c.data.tags.get(f"{TAG}trial_key", ""),
                        "status": c.data.tags.get(f"{TAG}status", ""),
                        "epoch": int(c.data.metrics.get("epoch", 0)),
                        metric: c.data.metrics.get(metric),
                        "name": c.info.run_name,
                    }
                    for c in children
                ),
                key=lambda t: t["key"],
            )
            counts: dict[str, int] = {}
            for t in trials:
                counts[t["status"]] = counts.get(t["status"], 0) + 1
            scored = [t for t in trials if t[metric] is not None and t["status"] in COMPLETE | {"running"}]
            best = max(scored, key=lambda t: t[metric]) if scored else None
            out.append(
                LaunchSummary(
                    sweep=tags.get(f"{TAG}sweep", ""),
                    launch_id=tags.get(f"{TAG}launch", ""),
                    status=tags.get(f"{TAG}status", ""),
                    started=time.strftime("%Y-%m-%d %H:%M", time.gmtime(parent.info.start_time / 1000)),
                    n_trials=int(tags.get(f"{TAG}n_trials", len(trials))),
                    counts=counts,
                    best=(best["name"], best[metric]) if best else None,
                    trials=trials,
                )
            )
    return sorted(out, key=lambda s: s.launch_id, reverse=True)
