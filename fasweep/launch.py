"""Run a sweep on Ray Tune, tracked in MLflow by the driver; resume an interrupted launch.

One Tune trial per planned trial: the param space is only the trial key, the configs travel with
`tune.with_parameters`. Each trial reports every epoch with its checkpoint, so Tune's retries continue
mid-trial. Stages run in order, each as its own Tune experiment under `<storage>/<sweep>/<launch_id>/<stage>`;
a stage's `init_from` is resolved through MLflow after the earlier stage ends, and the checkpoint's bytes
reach the workers through the Ray object store (no shared filesystem).

`--resume` reads what is done from MLflow and runs only the rest, as a new Tune experiment of the stage
(`<stage>.resume-xxxx` beside the first), each trial continuing from its newest checkpoint anywhere under the
launch's storage (every checkpoint carries an `epoch-NNNNNN` marker). Tune's `Tuner.restore` is not used: the
experiment snapshot a SIGKILLed driver leaves can name checkpoints `num_to_keep` already deleted (the trial
then fails to restore), and restarting its trials instead stalls its grid generator under max_concurrent.

Tune pickles its callbacks with the experiment and brings the old ones back on restore, so the callback
here is stateless: it forwards every hook to the driver of the launch running in this process (`_ACTIVE`).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import secrets
import tempfile
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ray import tune
from ray.tune.result import AUTO_RESULT_KEYS
from rich.console import Console
from rich.live import Live
from rich.text import Text

from fasweep.config import set_path
from fasweep.errors import UserError
from fasweep.spec import PlannedTrial, SweepSpec, dump_spec, expand, load_spec, summarize
from fasweep.tracking import (
    COMPLETE,
    HISTORY_NAME,
    SweepTracker,
    TrackingError,
    TrialInfo,
    check_reachable,
    resolve_tracking_uri,
    trial_status,
)

log = logging.getLogger(__name__)
_TUNE_KEYS = {*AUTO_RESULT_KEYS, "done", "trial_id", "experiment_tag", "should_checkpoint", "__duplicate__"}
CHECKPOINT_NAME = "checkpoint.pt"


@dataclass
class LaunchResult:
    """How a launch ended: its id, the parent run, trial counts by status, the best trial."""

    sweep: str
    launch_id: str
    status: str  # finished | failed | interrupted | nothing-to-resume
    parent_run_id: str
    experiment: str
    tracking_uri: str
    counts: dict[str, int] = field(default_factory=dict)
    best: tuple[str, float] | None = None
    storage: str = ""


# --- the trainable (runs on Ray workers) -------------------------------------------------------------


def run_trial(
    config: dict[str, Any], *, configs: dict[str, dict[str, Any]], init: Any, resume: dict[str, list[str]]
) -> None:
    """Tune trainable: train the planned trial `config['key']`, reporting each epoch with its checkpoint.

    Continues from Tune's checkpoint on a retry, else from the first readable of `resume[key]` (checkpoint
    dirs on the storage, newest first) on `--resume`. `init` is the stage's init_from checkpoint as bytes.
    """
    import ray
    import torch

    from fasweep.config import TrialConfig
    from fasweep.train import train

    key = config["key"]
    trial_config = configs[key]
    if init is not None:
        trial_config = set_path(trial_config, "model.init_from.checkpoint", str(_init_file(init)))
    torch.set_num_threads(max(1, int(ray.get_runtime_context().get_assigned_resources().get("CPU", 1))))
    with tempfile.TemporaryDirectory(prefix="fasweep-trial-") as tmp:
        work = Path(tmp)
        checkpoint = tune.get_checkpoint()
        candidates = [checkpoint] if checkpoint is not None else [tune.Checkpoint(p) for p in resume.get(key, [])]
        resume_from, history = _first_readable(candidates, work / "resume")
        reported: list[float] = []

        def on_epoch(metrics: dict[str, float], path: Path | None) -> None:
            reported.append(metrics["epoch"])
            history.append(metrics)
            tune.report(metrics, checkpoint=_marked(path, history) if path else None)

        result = train(
            TrialConfig.model_validate(trial_config),
            checkpoint_dir=work / "checkpoint",
            resume_from=resume_from,
            on_epoch=on_epoch,
        )
        if not reported and result.final and resume_from is not None:  # resumed at its end: report it once more
            tune.report(result.final, checkpoint=_marked(resume_from, history))


def _marked(path: Path, history: list[dict[str, float]]) -> Any:
    """The checkpoint dir of `path` as a Tune checkpoint, plus `history.json` (every epoch's metrics, read by
    the driver without torch) and an `epoch-NNNNNN` marker file (found by `latest_checkpoints`)."""
    for old in path.parent.glob("epoch-*"):
        old.unlink()
    (path.parent / f"epoch-{int(history[-1]['epoch']):06d}").touch()
    (path.parent / HISTORY_NAME).write_text(json.dumps(history))
    return tune.Checkpoint.from_directory(str(path.parent))


def _first_readable(checkpoints: list[Any], dst: Path) -> tuple[Path | None, list[dict[str, float]]]:
    """Download the first checkpoint whose file loads (a killed upload can leave a partial one): its path and
    the history stored in it; (None, []) when there is none."""
    import torch

    for i, checkpoint in enumerate(checkpoints):
        try:
            path = Path(checkpoint.to_directory(str(dst / str(i)))) / CHECKPOINT_NAME
            return path, list(torch.load(path, map_location="cpu", weights_only=True)["history"])
        except Exception as exc:
            log.warning("checkpoint %s unreadable (%s); trying an older one", checkpoint.path, exc)
    return None, []


def latest_checkpoints(path: str) -> dict[str, list[str]]:
    """Checkpoint dirs under a stage's Tune experiment `path` (local or URI) by trial-key digest, newest first."""
    import pyarrow.fs

    try:
        fs, base = pyarrow.fs.FileSystem.from_uri(path)
        infos = fs.get_file_info(pyarrow.fs.FileSelector(base, recursive=True, allow_not_found=True))
    except (OSError, ValueError):
        return {}
    found: dict[str, list[tuple[int, str]]] = {}
    prefix = path[: len(path) - len(base)] if path.endswith(base) else ""
    for info in infos:
        parts = info.path.rsplit("/", 3)
        if len(parts) == 4 and parts[3].startswith("epoch-") and parts[2].startswith("checkpoint_"):
            digest = parts[1].rsplit("_", 1)[0].rsplit("-", 1)[-1]
            found.setdefault(digest, []).append((int(parts[3][6:]), prefix + info.path.rsplit("/", 1)[0]))
    return {d: [p for _, p in sorted(v, reverse=True)] for d, v in found.items()}


def key_digest(key: str) -> str:
    """A short digest of a trial key, part of its Tune trial dir name (found again by `latest_checkpoints`)."""
    return hashlib.sha1(key.encode()).hexdigest()[:10]


def _init_file(data: bytes) -> Path:
    """Write an init_from checkpoint to a path named by its content, so a retried trial sees the same config."""
    path = Path(tempfile.gettempdir()) / "fasweep-init" / f"{hashlib.sha256(data).hexdigest()[:20]}.pt"
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{secrets.token_hex(4)}.tmp")
        tmp.write_bytes(data)
        tmp.replace(path)
    return path


def _trial_name(trial: Any) -> str:
    return str(trial.config["key"]).replace("/", ":")


def _trial_dirname(trial: Any) -> str:
    safe = "".join(c if c.isalnum() or c in "-.=," else "_" for c in _trial_name(trial))
    return f"{safe[:60]}-{key_digest(trial.config['key'])}_{trial.trial_id}"


# --- the driver ----------------------------------------------------------------------------------------


class _Hooks(tune.Callback):
    """Tune callback that forwards to the active driver (stateless: Tune pickles and restores callbacks)."""

    def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        _driver().trial_started(trial)

    def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict, **info: Any) -> None:
        _driver().trial_result(trial, result)

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        _driver().trial_ended(trial, result_error="")

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        _driver().trial_ended(trial, result_error=_error_line(trial.get_error()))

    def on_step_end(self, iteration: int, trials: list, **info: Any) -> None:
        _driver().step(trials)

    def on_experiment_end(self, trials: list, **info: Any) -> None:
        _driver().step(trials, final=True)


_ACTIVE: _Driver | None = None


def _driver() -> _Driver:
    if _ACTIVE is None:
        raise RuntimeError("fasweep Tune callback called outside a launch")
    return _ACTIVE


def _error_line(error: Any) -> str:
    lines = [line for line in str(error or "trial failed").strip().splitlines() if line.strip()]
    return lines[-1][:500] if lines else "trial failed"


def _metrics(result: dict[str, Any]) -> dict[str, float]:
    """The trial's own metrics in a Tune result (Tune's bookkeeping keys dropped)."""
    return {
        k: float(v)
        for k, v in result.items()
        if k not in _TUNE_KEYS and isinstance(v, int | float) and not isinstance(v, bool)
    }


def _fetcher(checkpoint: Any) -> Any:
    """A function copying a Tune checkpoint (local or s3://) to a local dir; returns the checkpoint file."""
    if checkpoint is None:
        return None

    def fetch(dst: Path) -> Path | None:
        try:
            local = Path(checkpoint.to_directory(str(dst / "tune"))) / CHECKPOINT_NAME
        except Exception as exc:  # e.g. a node-local storage path on a multi-node cluster
            log.warning("checkpoint %s not readable on the driver (%s); use shared storage", checkpoint.path, exc)
            return None
        return local if local.is_file() else None

    return fetch


class _Driver:
    """The launch's state on the driver: tracker, trial bookkeeping and the live progress line."""

    def __init__(self, tracker: SweepTracker, console: Console, metric: str, mode: str) -> None:
        self.tracker = tracker
        self.console = console
        self.metric, self.mode = metric, mode
        self.stage = ""
        self.done_before = 0  # trials of the stage complete before this run (--resume)
        self.ended: set[str] = set()
        self.last: dict[str, dict[str, float]] = {}
        self.peak: dict[str, float] = {}  # best value of `metric` each trial reached so far (diverged ones aside)
        self._line = ""
        self._live: Live | None = None

    # Tune hooks
    def trial_started(self, trial: Any) -> None:
        self.tracker.trial_started(trial.config["key"])

    def trial_result(self, trial: Any, result: dict[str, Any]) -> None:
        metrics = _metrics(result)
        if "epoch" in metrics:
            self.last[trial.config["key"]] = metrics
            self._note_peak(trial.config["key"], metrics)
            self.tracker.trial_epoch(trial.config["key"], metrics)

    def trial_ended(self, trial: Any, result_error: str) -> None:
        """Queue a trial's completion (Tune calls no hook for trials it stops at the end of an experiment)."""
        key = trial.config["key"]
        last = _metrics(trial.last_result or {})
        self.ended.add(key)
        if last:
            self.last[key] = last
            self._note_peak(key, last)
        fetch = _fetcher(trial.checkpoint)
        self.tracker.trial_ended(key, last=last or None, fetch_checkpoint=fetch, error=result_error)

    def step(self, trials: list[Any], final: bool = False) -> None:
        if not final:  # at the end (also after an error) the failure is raised by the flush that follows
            self.tracker.raise_if_failed()
        self.show(self.summary(trials))

    # progress
    def summary(self, trials: list[Any]) -> str:
        counts = dict.fromkeys(("pending", "running", "done", "diverged", "stopped", "error"), 0)
        counts["done"] = self.done_before
        for trial in trials:
            key = trial.config["key"]
            if trial.status in ("PENDING", "PAUSED"):
                counts["pending"] += 1
            elif trial.status == "RUNNING":
                counts["running"] += 1
            elif trial.status == "ERROR":
                counts["error"] += 1
            elif key not in self.ended:  # stopped by the end of the experiment (Ctrl+C, an error)
                counts["pending"] += 1
            else:
                last = [self.last[key]] if key in self.last else []
                kind = trial_status(last, self.tracker.planned_epochs(key))
                counts["done" if kind == "finished" else kind] += 1
        text = f"[{self.stage}] " + " · ".join(f"{n} {name}" for name, n in counts.items() if n or name != "stopped")
        best = self.best({trial.config["key"] for trial in trials})
        if best:
            text += f" · best {self.metric} {best[1]:.4f} ({best[0]})"
        return text

    def _note_peak(self, key: str, metrics: dict[str, float]) -> None:
        value = metrics.get(self.metric)
        if value is None or metrics.get("diverged") or not math.isfinite(value):
            return
        old = self.peak.get(key)
        self.peak[key] = value if old is None else (min if self.mode == "min" else max)(old, value)

    def best(self, keys: set[str] | None = None) -> tuple[str, float] | None:
        """(trial key, value) of the best `metric` reached so far among `keys` (all: None), diverged ones aside."""
        scored = [(v, k) for k, v in self.peak.items() if keys is None or k in keys]
        if not scored:
            return None
        value, key = (min if self.mode == "min" else max)(scored)
        return key, value

    def show(self, line: str) -> None:
        """Live line on a terminal; in a log, one line per change."""
        if line == self._line:
            return
        self._line = line
        if self._live is not None:
            self._live.update(Text(line))
        else:
            self.say(line)

    def say(self, text: str) -> None:
        """Print one plain line (no rich markup: stage names are in brackets)."""
        self.console.print(text, markup=False, highlight=False, soft_wrap=True)

    @contextlib.contextmanager
    def progress(self) -> Iterator[None]:
        """Show the progress line while the block runs (a rich Live line on a terminal)."""
        self._line = ""
        if not self.console.is_terminal:
            yield
            return
        with Live(Text(""), console=self.console, refresh_per_second=4, transient=False) as live:
            self._live = live
            try:
                yield
            finally:
                self._live = None


# --- launching ---------------------------------------------------------------------------------------------


def new_launch_id() -> str:
    """A sortable unique launch id, e.g. 20261126-153012-ab12 (UTC)."""
    return time.strftime("%Y%m%d-%H%M%S", time.gmtime()) + "-" + secrets.token_hex(2)


def plan_hash(trials: Iterable[PlannedTrial]) -> str:
    """A digest of the planned trials (keys and configs): --resume refuses a spec that plans differently."""
    data = json.dumps([[t.key, t.config, t.resources] for t in trials], sort_keys=True, default=str)
    return hashlib.sha256(data.encode()).hexdigest()[:16]


def storage_root(spec: SweepSpec, launch_id: str) -> str:
    """`<storage>/<sweep>/<launch_id>`; a local storage path is made absolute (Tune needs that)."""
    base = spec.storage if "://" in spec.storage else str(Path(spec.storage).expanduser().resolve())
    return f"{base.rstrip('/')}/{spec.name}/{launch_id}"


def _init_ray(address: str | None, num_cpus: int | None) -> bool:
    """Connect to `address` or start a local Ray; False when Ray was already up in this process."""
    import ray

    if ray.is_initialized():
        return False
    options: dict[str, Any] = {"include_dashboard": False, "log_to_driver": False, "logging_level": logging.ERROR}
    if address:
        ray.init(address=address, **options)
    else:
        # A local Ray talks over loopback only (Ray otherwise swaps 127.0.0.1 for the host's IP address). The
        # switch is read while the node starts; restored after, so a later ray.init(address=...) is unaffected.
        from ray._private import ray_constants

        saved, ray_constants.ENABLE_RAY_CLUSTER = ray_constants.ENABLE_RAY_CLUSTER, False
        try:
            ray.init(num_cpus=num_cpus, **options)
        finally:
            ray_constants.ENABLE_RAY_CLUSTER = saved
    return True


def _check_fits(trials: list[PlannedTrial], *, local: bool) -> None:
    """Refuse, before any compute, a trial that asks for more CPUs/GPUs than a local Ray has (it would wait
    forever); a remote cluster may autoscale, so there the trials simply queue."""
    import ray

    if not local:
        return
    total = ray.cluster_resources()
    for kind in ("cpu", "gpu"):
        need = max(t.resources[kind] for t in trials)
        have = total.get(kind.upper(), 0.0)
        if need > have:
            raise UserError.field(
                f"resources.{kind}", need, f"at most {have:g} on this machine's Ray (--set resources.{kind}={have:g})"
            )


def launch(
    spec_path: str | Path,
    *,
    sets: dict[str, Any] | None = None,
    address: str | None = None,
    tracking_uri: str | None = None,
    resume: bool = False,
    num_cpus: int | None = None,
    console: Console | None = None,
) -> LaunchResult:
    """Validate, plan and run a sweep (or `resume` its latest unfinished launch); see the module docstring."""
    console = console or Console()
    if address and address.startswith("ray://"):
        raise UserError.field(
            "--address",
            address,
            "a Ray GCS address (HOST:6379 or auto) from a node of the cluster; Ray Client (ray://) runs Tune's loop "
            "on the head, away from this driver's MLflow writer (or submit: ray job submit -- fasweep launch ...)",
        )
    spec = load_spec(spec_path, sets)
    trials = expand(spec)
    uri = resolve_tracking_uri(tracking_uri)
    check_reachable(uri)  # before any compute
    tracker = SweepTracker(uri, spec.experiment, spec.name)
    digest = plan_hash(trials)
    parent = tracker.latest_parent() if resume else None
    if resume and parent is None:  # a first try (e.g. a RayJob's first attempt) starts fresh
        console.print(f"no earlier launch of {spec.name} in {uri}: starting a new one", soft_wrap=True)
        resume = False
    if resume:
        tags = parent.data.tags
        launch_id = tags["fasweep.launch"]
        if tags.get("fasweep.status") == "finished":
            tracker.close()
            console.print(
                f"nothing to resume: launch {launch_id} of {spec.name} finished all its trials", soft_wrap=True
            )
            return LaunchResult(spec.name, launch_id, "nothing-to-resume", parent.info.run_id, spec.experiment, uri)
        if tags.get("fasweep.plan_hash") != digest:
            tracker.close()
            raise UserError.field(
                "--resume", spec.name, f"the same spec and --set values as launch {launch_id} (its plan differs)"
            )
    else:
        launch_id = new_launch_id()
    root = storage_root(spec, launch_id)
    try:
        started_ray = _init_ray(address, num_cpus)
    except Exception as exc:
        tracker.close()
        reason = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
        raise UserError.field("--address", address, f"a reachable Ray cluster, e.g. HOST:6379 ({reason})") from None
    try:
        _check_fits(trials, local=address is None)
    except UserError:
        tracker.close()
        if started_ray:
            import ray

            ray.shutdown()
        raise
    tracker.open_parent(
        launch_id,
        axes=spec.axes,
        n_trials=len(trials),
        spec_yaml=dump_spec(spec),
        plan_hash=digest,
        run_id=parent.info.run_id if parent is not None else "",
    )
    tracker.register(TrialInfo(t.key, t.stage, t.condition, t.seed, t.config) for t in trials)
    metric, mode = (spec.scheduler.asha.metric, spec.scheduler.asha.mode) if spec.scheduler else ("test_acc", "max")
    driver = _Driver(tracker, console, metric, mode)
    verb = "resuming" if resume else "launching"
    driver.say(f"{verb} {spec.name} @ {launch_id}: {summarize(spec, trials)}; MLflow {uri}; storage {root}")
    if address and "://" not in spec.storage:
        driver.say(f"note: storage {root} must be a path shared by every Ray node (or s3://) for checkpoints")
    status = "failed"
    global _ACTIVE
    unsaved: TrackingError | None = None
    try:
        _ACTIVE = driver
        status = _run_stages(spec, trials, driver, root, resume)
    except KeyboardInterrupt:
        status = "interrupted"
        raise
    except Exception:
        if tracker.error is not None:  # the writer gave up: that is why Tune stopped; say so in one line
            raise tracker.error from None
        raise
    finally:
        _ACTIVE = None
        try:
            tracker.flush()
            tracker.finish_parent(status)
        except TrackingError as exc:
            unsaved = exc
        tracker.close()
        if started_ray:
            import ray

            ray.shutdown()
    if unsaved is not None:
        raise unsaved
    by_status: dict[str, int] = {}
    for s in tracker.load_children().values():
        by_status[s] = by_status.get(s, 0) + 1
    best = driver.best()
    return LaunchResult(spec.name, launch_id, status, tracker.parent_id, spec.experiment, uri, by_status, best, root)


def _run_stages(spec: SweepSpec, trials: list[PlannedTrial], driver: _Driver, root: str, resume: bool) -> str:
    """Run the stages in order; the launch status (finished | failed | interrupted)."""
    # Tune's own console output off (the legacy engine honours verbose=0); checkpoints force snapshots of the
    # experiment state by design, so its "snapshotting often" warning is noise here; Tune's result files off.
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    os.environ.setdefault("TUNE_DISABLE_AUTO_CALLBACK_LOGGERS", "1")  # MLflow is the log (saves the driver ~30% CPU)
    tracker = driver.tracker
    stages = list(dict.fromkeys(t.stage for t in trials))
    for stage in stages:
        mine = [t for t in trials if t.stage == stage]
        tracker.flush()
        done = {k for k, s in tracker.load_children().items() if s in COMPLETE}
        todo = [t for t in mine if t.key not in done]
        if not todo:
            driver.say(f"[{stage}] all {len(mine)} trials already complete")
            continue
        driver.stage, driver.done_before = stage, len(mine) - len(todo)
        init = _resolve_init(mine, driver)
        name = f"{stage}.resume-{secrets.token_hex(2)}" if resume else stage
        outcome = _run_stage(spec, todo, driver, root, name, latest_checkpoints(root) if resume else {}, init)
        if outcome != "finished":
            if stage != stages[-1]:
                driver.say(f"[{stage}] ended {outcome}; later stages not started (`--resume` continues)")
            return outcome
    return "finished"


def _resolve_init(trials: list[PlannedTrial], driver: _Driver) -> Any:
    """A stage's init_from: the earlier stage's best (or last) run's checkpoint, as an object-store ref."""
    init = trials[0].init_from
    if init is None:
        return None
    import ray

    tracker = driver.tracker
    run = tracker.best_run(init["stage"], init["condition"], init["metric"], init["select"], init["mode"])
    uri = f"runs:/{run.info.run_id}/checkpoint/{CHECKPOINT_NAME}"
    with tempfile.TemporaryDirectory(prefix="fasweep-init-") as tmp:
        data = tracker.download_checkpoint(run.info.run_id, Path(tmp)).read_bytes()
    tracker.register(
        TrialInfo(t.key, t.stage, t.condition, t.seed, set_path(t.config, "model.init_from.checkpoint", uri))
        for t in trials
    )
    driver.say(f"[{trials[0].stage}] init_from {init['stage']}/{init['condition']} ({init['select']}): {uri}")
    return ray.put(data)


def _run_stage(
    spec: SweepSpec,
    trials: list[PlannedTrial],
    driver: _Driver,
    root: str,
    name: str,
    found: dict[str, list[str]],
    init: Any,
) -> str:
    """One Tune experiment `<root>/<name>` running `trials`; finished | failed | interrupted."""
    keys = [t.key for t in trials]
    trainable = tune.with_parameters(
        run_trial,
        configs={t.key: t.config for t in trials},
        init=init,
        resume={k: found[key_digest(k)] for k in keys if key_digest(k) in found},
    )
    resources = {t.key: {"cpu": t.resources["cpu"], "gpu": t.resources["gpu"]} for t in trials}
    same = len({json.dumps(r, sort_keys=True) for r in resources.values()}) == 1
    trainable = tune.with_resources(trainable, resources[keys[0]] if same else lambda c: resources[c["key"]])
    tuner = tune.Tuner(
        trainable,
        param_space={"key": tune.grid_search(keys)},
        tune_config=tune.TuneConfig(
            num_samples=1,
            max_concurrent_trials=spec.max_concurrent,
            scheduler=_scheduler(spec, trials),
            reuse_actors=same,
            trial_name_creator=_trial_name,
            trial_dirname_creator=_trial_dirname,
        ),
        run_config=tune.RunConfig(
            name=name,
            storage_path=root,
            failure_config=tune.FailureConfig(max_failures=spec.max_retries),
            checkpoint_config=tune.CheckpointConfig(num_to_keep=4),
            verbose=0,
            callbacks=[_Hooks()],
        ),
    )
    with driver.progress():
        tuner.fit()
    driver.tracker.flush()
    statuses = driver.tracker.load_children()
    if any(k not in driver.ended for k in keys):
        return "interrupted"
    return "finished" if all(statuses.get(k) in COMPLETE for k in keys) else "failed"


def _scheduler(spec: SweepSpec, trials: list[PlannedTrial]) -> Any:
    """ASHA on the trials' epochs when the spec asks for it."""
    if spec.scheduler is None:
        return None
    from ray.tune.schedulers import ASHAScheduler

    asha = spec.scheduler.asha
    max_t = asha.max_t or max(int(t.config["train"]["epochs"]) for t in trials)
    return ASHAScheduler(
        time_attr="epoch",
        metric=asha.metric,
        mode=asha.mode,
        max_t=max_t,
        grace_period=min(asha.grace_period, max_t),
        reduction_factor=asha.reduction_factor,
    )
