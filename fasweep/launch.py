"""The driver: take the launch lease, fan a Plan's trials out on Ray Tune, record them through the run writer.

One Tune trial per planned trial, or per pack of trials (`pack:` in the spec, grouped by `Plan.packs`): the param
space is only the trial (or pack) key, the configs travel with `tune.with_parameters` to
`fasweep.worker.run_trial`. A pack's members are trials everywhere else: each its own run, status and progress
count, logged from the pack's per-epoch results and ended with its own checkpoint.

Stages run in order, each as its own Tune experiment under `<storage>/<sweep>/<launch_id>/<stage>`, trial folders
named by the run-record layout; the trials write their checkpoints themselves, into their own folders under
`<storage>/<sweep>/<launch_id>/_checkpoints/` (`fasweep.checkpoints`; Tune receives metrics only), and a trial's
newest one is uploaded to its run when it ends. A stage's `init_from` is resolved through the run reader after the
earlier stage ends, and the checkpoint's bytes reach the workers through the Ray object store (no shared
filesystem).

`--resume` reads what is complete from MLflow and runs only the rest, as a new Tune experiment of the stage
(`<stage>.resume-xxxx` beside the first), each trial continuing from the newest readable checkpoint in its own
folder, as a retried one does. Tune's `Tuner.restore` is not used: restarting a SIGKILLed driver's trials from its
experiment snapshot stalls its grid generator under max_concurrent.

One driver per sweep: the lease (`fasweep.runs.lease`) is taken before any compute and, taken over by another
driver, stops this one's trials and its writes (`LeaseLost`, exit 3); whatever a taken launch left running is
marked interrupted. A signal stops the trials and spends the grace period writing first (`_Signals`,
`RunWriter.hurry`); every address is probed before (`_check_address`, `check_reachable`).

Tune pickles its callbacks with the experiment, so the callback here is stateless: it forwards every hook to the
driver of the launch running in this process (`_ACTIVE`).
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import shutil
import signal
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ray import tune
from ray.tune.result import AUTO_RESULT_KEYS
from rich.console import Console

from fasweep.checkpoints import find_checkpoints, newest_checkpoint
from fasweep.config import set_path
from fasweep.errors import UserError
from fasweep.faults import describe_fault, describe_fault_text, free_space, human_bytes, unreachable
from fasweep.progress import Progress, progress_line
from fasweep.runs.layout import (
    CHECKPOINT_ARTIFACT,
    COMPLETE,
    SPEC_ARTIFACT,
    Best,
    LaunchStatus,
    Tag,
    TrialStatus,
    trial_checkpoints,
    trial_dirname,
    trial_status,
)
from fasweep.runs.lease import Lease, LeaseLost
from fasweep.runs.reader import LaunchRecord, TrialRecord, best_trial, find_launches, running_runs, trials_of
from fasweep.runs.store import TrackingError, check_reachable, client, reason_of, resolve_tracking_uri
from fasweep.runs.writer import RunWriter, TrialInfo, interrupt_launch, mark_interrupted
from fasweep.spec.plan import Plan, PlannedTrial, dump_spec, load_spec, plan_difference
from fasweep.worker import (
    ERROR_KEY,
    FAULT_KEY,
    MEMBERS_KEY,
    RESUMED_KEY,
    pack_id,
    run_trial,
)

if TYPE_CHECKING:
    from fasweep.trial import Footprint

log = logging.getLogger(__name__)
_TUNE_KEYS = {*AUTO_RESULT_KEYS, "done", "trial_id", "experiment_tag", "should_checkpoint", "__duplicate__"}
GRACE_S = 20.0  # after SIGTERM/SIGINT/SIGHUP the driver is gone within this (Kubernetes kills after 30 s)
RESERVE_S = 6.0  # of the grace period, kept after the last write for the parent, the marks, Ray and the last lines
ERRORS_LOG = "errors.log"  # under the launch's storage: every trial error's full text
ROOMY_BYTES = 50e9  # storage with this much free space is not checked against the plan's checkpoint sizes


@dataclass
class LaunchResult:
    """How a launch ended: its id, the parent run, trial counts by status, the best trial."""

    sweep: str
    launch_id: str
    status: str  # a LaunchStatus, or nothing-to-resume
    parent_run_id: str
    experiment: str
    tracking_uri: str
    counts: dict[str, int] = field(default_factory=dict)
    best: tuple[str, float] | None = None
    storage: str = ""
    signal: int | None = None  # the signal that interrupted the launch
    errors: list[str] = field(default_factory=list)  # digest lines: one per distinct trial error
    retry_helps: bool = False  # some trial failed for a reason a --resume may not meet again
    report: str = ""  # where the launch's main report was logged, or why it was not


# --- the driver ----------------------------------------------------------------------------------------


class _Hooks(tune.Callback):
    """Tune callback that forwards to the active driver (stateless: Tune pickles and restores callbacks)."""

    def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        _driver().trial_started(trial.config["key"])

    def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict, **info: Any) -> None:
        _driver().trial_result(trial.config["key"], result)

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        _driver().trial_ended(trial, error="")

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        _driver().trial_ended(trial, error=_error_text(trial.get_error()))

    def on_trial_recover(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        _driver().trial_retried(trial.config["key"], _error_text(trial.get_error()))

    def on_step_end(self, iteration: int, trials: list, **info: Any) -> None:
        _driver().step()

    def on_experiment_end(self, trials: list, **info: Any) -> None:
        _driver().step(final=True)


_ACTIVE: _Driver | None = None


def _driver() -> _Driver:
    if _ACTIVE is None:
        raise RuntimeError("fasweep Tune callback called outside a launch")
    return _ACTIVE


_NO_TEXT = "its worker failed without an error text (a killed process or a lost node)"


def _error_text(error: Any) -> str:
    return str(error or "").strip() or _NO_TEXT


def _trials_n(n: int) -> str:
    """`1 trial`, `2 trials`."""
    return f"{n} trial{'s' * (n != 1)}"


def _listed(keys: list[str]) -> str:
    """The first four keys, and how many more."""
    return ", ".join(keys[:4]) + (f" and {len(keys) - 4} more" if len(keys) > 4 else "")


def _error_line(text: str) -> str:
    """The last non-empty line of an error's text (where a traceback says what went wrong)."""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[-1][:500] if lines else _NO_TEXT


def _metrics(result: dict[str, Any]) -> dict[str, float]:
    """The trial's own metrics in a Tune result (Tune's bookkeeping and the worker's info keys dropped)."""
    return {
        k: float(v)
        for k, v in result.items()
        if k not in _TUNE_KEYS and k != RESUMED_KEY and isinstance(v, int | float) and not isinstance(v, bool)
    }


def _fetcher(root: str, key: str) -> Callable[[Path], Path | None]:
    """A function giving a trial's newest checkpoint file from its folder under the launch's storage `root` (local,
    or copied under the given dir from a URI); None when it has none."""

    def fetch(dst: Path) -> Path | None:
        try:
            return newest_checkpoint(trial_checkpoints(root, key), dst)
        except Exception as exc:  # e.g. storage the driver cannot reach
            log.warning("checkpoint of %s not readable on the driver (%s); use shared storage", key, exc)
            return None

    return fetch


class _Driver:
    """A launch's state on the driver: the writer, each trial's status and latest metrics, errors, the progress."""

    def __init__(self, writer: RunWriter, plan: Plan, configs: dict[str, dict[str, Any]], best: Best, console: Console):
        self.writer = writer
        self.best = best
        self.progress = Progress(console)
        self.configs = configs
        self.infos = {t.key: TrialInfo(t.key, t.stage, t.condition, t.seed, configs[t.key]) for t in plan.trials}
        self.stage = ""
        self.stage_started, self.stage_epochs = time.monotonic(), 0
        self.statuses: dict[str, str] = {}  # this stage's trials -> status
        self.latest: dict[str, dict[str, float]] = {}  # every trial's latest metrics seen by this driver
        self.resumed: dict[str, int] = {}  # trial -> epoch it continued from (a --resume or a retry)
        self.epochs_run: Counter[str] = Counter()  # epochs reported by workers under this driver
        self.errors: dict[str, str] = {}  # trial -> the full text of the error it ended with
        self.retried: dict[str, str] = {}  # trial -> the full text of an error Tune retried it after
        self.user_errors: dict[str, str] = {}  # trial -> a user error it reported (not retried)
        self.fault = ""  # an environment fault a trial hit: the launch stops
        self.signal: int | None = None  # a signal that asks the launch to stop
        self.storage = ""  # the launch's storage root
        self.resuming_keys: set[str] = set()  # this stage's --resume trials, until its one line is said
        self.checkpointed: set[str] = set()  # those whose folders hold checkpoints
        self.packs: dict[str, list[str]] = {}  # pack key -> its members' trial keys
        self.lease: Lease | None = None  # the launch's lease: taken over, the driver stops
        self.ended: set[str] = set()  # trials whose end this driver queued for the writer
        self.stopping = False  # Tune was told to stop because the lease was taken over

    def start_stage(self, stage: str, statuses: dict[str, str]) -> None:
        """Begin showing `stage`, whose trials have these statuses now."""
        self.stage, self.statuses = stage, dict(statuses)
        self.stage_started, self.stage_epochs = time.monotonic(), sum(self.epochs_run.values())

    def eta_s(self) -> float | None:
        """Seconds until the stage's trials have run all their epochs, at the pace of the epochs run so far."""
        done = sum(self.epochs_run.values()) - self.stage_epochs
        if done <= 0:
            return None
        left = sum(
            self.infos[k].planned_epochs - int(self.latest.get(k, {}).get("epoch", 0))
            for k, status in self.statuses.items()
            if status in (TrialStatus.PENDING, TrialStatus.RUNNING)
        )
        return left * (time.monotonic() - self.stage_started) / done

    def interrupt(self) -> None:
        """Stop the running Tune experiment as Ctrl+C does: trials stop, their checkpoints stay."""
        handler = signal.getsignal(signal.SIGUSR1)
        if callable(handler):  # Tune's interrupt handler is installed while an experiment runs
            signal.raise_signal(signal.SIGUSR1)

    def resuming(self, keys: list[str], checkpointed: set[str]) -> None:
        """This stage's `--resume` runs `keys`, those in `checkpointed` with checkpoints in their folders."""
        self.resuming_keys, self.checkpointed = set(keys), checkpointed & set(keys)

    def say_resumed(self) -> None:
        """One line for the stage's `--resume` (once its trials have said where they continue, or at its end): how
        many continue and after which epochs, how many start over and which."""
        continued = {k: self.resumed[k] for k in self.resuming_keys if k in self.resumed}
        epochs = sorted(e for e in continued.values() if e)
        over = sorted(k for k, e in continued.items() if not e and k in self.checkpointed)
        self.resuming_keys = set()
        parts = []
        if epochs:
            span = f"epoch {epochs[0]}" if epochs[0] == epochs[-1] else f"epochs {epochs[0]}-{epochs[-1]}"
            parts.append(f"{_trials_n(len(epochs))} continue{'s' * (len(epochs) == 1)} after {span}")
        if over:
            verb = "starts" if len(over) == 1 else "start"
            parts.append(f"{len(over)} {verb} over (no readable checkpoint: {_listed(over)})")
        if parts:
            self.progress.say(f"[{self.stage}] " + "; ".join(parts))

    # Tune hooks (a pack's key stands for its members)
    def trial_started(self, key: str) -> None:
        for member in self.packs.get(key, [key]):
            self.statuses[member] = TrialStatus.RUNNING
            self.writer.trial_started(self.infos[member])

    def trial_result(self, key: str, result: dict[str, Any]) -> None:
        members = self.packs.get(key)
        if members is None:
            self._result(key, result)
            return
        shared = {k: result[k] for k in (ERROR_KEY, FAULT_KEY) if k in result}
        each = json.loads(result.get(MEMBERS_KEY, "{}"))
        for member in members:
            if member in each or shared:
                self._result(member, {**each.get(member, {}), **shared})

    def _result(self, key: str, result: dict[str, Any]) -> None:
        """One trial's result (of its own Tune trial, or its part of its pack's)."""
        if RESUMED_KEY in result and key not in self.resumed:
            epoch = self.resumed[key] = int(result[RESUMED_KEY])
            self.writer.trial_tags(key, {Tag.RESUMED_FROM: str(epoch)})
            if key in self.resuming_keys and self.resuming_keys <= self.resumed.keys():
                self.say_resumed()
        if ERROR_KEY in result:
            self.user_errors[key] = self.errors[key] = str(result[ERROR_KEY])
        if FAULT_KEY in result and not self.fault:
            self.fault = str(result[FAULT_KEY])
            self.interrupt()
        metrics = _metrics(result)
        if "epoch" in metrics:
            if metrics["epoch"] > self.resumed.get(key, 0):  # not the checkpoint's own epoch, reported again
                self.epochs_run[key] += 1
            self.latest[key] = metrics
            self.writer.trial_epoch(key, metrics)

    def trial_retried(self, key: str, error: str) -> None:
        """A trial failed and Tune retries it from its checkpoint (unless the failure is the environment's)."""
        for member in self.packs.get(key, [key]):
            self.retried[member] = error
        fault = describe_fault_text(_error_line(error), self.storage)
        if fault and not self.fault:
            self.fault = fault
            self.interrupt()

    def trial_ended(self, trial: Any, error: str) -> None:
        """Queue a trial's (or each pack member's) completion (Tune calls no hook for trials it stops at the end of
        an experiment)."""
        key = trial.config["key"]
        members = self.packs.get(key)
        if members is None:
            self._ended(key, _metrics(trial.last_result or {}), _fetcher(self.storage, key), error)
            return
        for member in members:  # a member's last metrics: from the last result that carried it
            self._ended(member, self.latest.get(member, {}), _fetcher(self.storage, member), error)

    def _ended(self, key: str, last: dict[str, float], fetch: Any, error: str) -> None:
        if key in self.user_errors:
            error = self.user_errors[key]
        elif error:
            self.errors[key] = error
        if self.fault and not error and not last.get("epoch"):
            return  # it ended on the fault without an epoch: left for --resume, marked interrupted
        if last:
            self.latest[key] = last
        planned = self.infos[key].planned_epochs
        self.statuses[key] = TrialStatus.ERROR if error else trial_status([last] if last else [], planned)
        tags = {Tag.EPOCHS_RUN: str(self.epochs_run[key])}
        line = _error_line(error) if error else ""
        self.writer.trial_ended(key, last=last or None, fetch_checkpoint=fetch, error=line, tags=tags)
        self.ended.add(key)

    def step(self, final: bool = False) -> None:
        if self.writer.abandoned and not self.stopping:  # the lease was taken over: stop the trials, once
            self.stopping = True
            self.interrupt()
        if not final:  # at the end (also after an error) the failure is raised by the flush that follows
            self.writer.raise_if_failed()
        epochs = self.progress.console.is_terminal  # in a log, one line per change of counts, not per epoch
        line = progress_line(self.stage, self.statuses, self.latest, self.best, epochs=epochs, eta_s=self.eta_s())
        self.progress.show(line)

    def unrecorded(self) -> list[str]:
        """A line for the trials this driver saw end whose end a hurried writer (a signal's grace period) could not
        write: MLflow does not count them yet; their checkpoints hold them for `--resume`."""
        late = Counter(s for k, s in self.statuses.items() if k in self.ended and self.writer.status(k) != s)
        if not late:
            return []
        counts = ", ".join(f"{n} {status}" for status, n in sorted(late.items()))
        return [
            f"{_trials_n(late.total())} that ended ({counts}) could not be recorded in MLflow within the "
            f"{GRACE_S:.0f}s grace period: their checkpoints hold them and `--resume` records them"
        ]

    def digest(self, log_file: Path | None) -> list[str]:
        """One line per distinct error (how many trials, which), the full texts written to `log_file`."""
        if log_file is not None and (self.errors or self.retried):
            with log_file.open("a") as fh:
                for key, text in sorted(self.retried.items()):
                    fh.write(f"=== {key} (retried)\n{text}\n")
                for key, text in sorted(self.errors.items()):
                    fh.write(f"=== {key}\n{text}\n")
        lines = []
        for what, errors in (("retried from a checkpoint after", self.retried), ("failed", self.errors)):
            by_line: dict[str, list[str]] = {}
            for key, text in sorted(errors.items()):
                by_line.setdefault(_error_line(text), []).append(key)
            for line, keys in by_line.items():
                lines.append(f"{_trials_n(len(keys))} {what}: {line} ({_listed(keys)})")
        return lines


# --- launching ---------------------------------------------------------------------------------------------


def new_launch_id() -> str:
    """A sortable unique launch id, e.g. 20261126-153012-ab12 (UTC)."""
    return time.strftime("%Y%m%d-%H%M%S", time.gmtime()) + "-" + secrets.token_hex(2)


def storage_root(plan: Plan, launch_id: str) -> str:
    """`<storage>/<sweep>/<launch_id>`; a local storage path is made absolute (Tune needs that)."""
    storage = plan.spec.storage
    base = storage if "://" in storage else str(Path(storage).expanduser().resolve())
    return f"{base.rstrip('/')}/{plan.spec.name}/{launch_id}"


def best_rule(plan: Plan) -> Best:
    """What "best" means for a launch: the scheduler's metric and mode, else test_acc, max."""
    scheduler = plan.spec.scheduler
    return Best(scheduler.asha.metric, scheduler.asha.mode) if scheduler else Best()


def _init_ray(address: str | None, num_cpus: int | None, code: list[str]) -> bool:
    """Connect to `address` or start a local Ray, shipping the user's `code` folders to its workers (runtime_env
    `py_modules`); False when Ray was already up in this process."""
    import ray

    if ray.is_initialized():
        return False
    options: dict[str, Any] = {"include_dashboard": False, "log_to_driver": False, "logging_level": logging.ERROR}
    if code:
        options["runtime_env"] = {"py_modules": code}
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


def _check_address(address: str | None) -> None:
    """A Ray `--address` (HOST:PORT; `auto` finds a local cluster itself) where nothing answers fails in seconds,
    in one line: Ray would wait for its GCS for many minutes."""
    if not address or address == "auto":
        return
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise UserError.field("--address", address, "HOST:PORT of a Ray cluster's GCS (e.g. head:6379) or auto")
    reason = unreachable(host.strip("[]"), int(port))
    if reason:
        raise UserError.field(
            "--address",
            address,
            f"the GCS address of a running Ray cluster ({reason}); start one (`ray start --head`) or leave out "
            "--address for a local Ray",
        )


def _check_fits(trials: tuple[PlannedTrial, ...], *, local: bool) -> None:
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


def _slots(plan: Plan) -> dict[str, int]:
    """How many packs of each stage the Ray cluster runs at once: its CPUs and GPUs over a pack's (the stage's
    `resources`), at most `max_concurrent`; at least 1."""
    import ray

    total = ray.cluster_resources()
    slots = {}
    for stage in plan.stages:
        need = plan.stage_trials(stage)[0].resources
        fits = [total.get(kind.upper(), 0.0) / need[kind] for kind in ("cpu", "gpu") if need[kind] > 0]
        slots[stage] = max(1, min(int(f + 1e-6) for f in fits))  # Ray counts resources in 1e-4 units
        slots[stage] = min(slots[stage], plan.spec.max_concurrent or slots[stage])
    return slots


def _resume_target(writer: RunWriter, plan: Plan, console: Console) -> LaunchRecord | None:
    """The launch `--resume` continues: this sweep's latest in the experiment (None: start a new one)."""
    spec = plan.spec
    launches = writer.sync("find launches", lambda: find_launches(writer.client, spec.name, [writer.experiment_id]))
    if not launches:  # a first try (e.g. a RayJob's first attempt) starts fresh
        console.print(f"no earlier launch of {spec.name} in {writer.uri}: starting a new one", soft_wrap=True)
        return None
    latest = launches[0]
    if latest.plan_hash != plan.hash:
        try:
            with tempfile.TemporaryDirectory() as tmp:
                path = writer.client.download_artifacts(latest.run_id, SPEC_ARTIFACT, tmp)
                differs = plan_difference(Path(path).read_text(), plan)
        except Exception as exc:  # no spec.yaml on the parent: say so instead
            differs = f"its {SPEC_ARTIFACT} is unreadable ({type(exc).__name__})"
        raise UserError.field(
            "--resume",
            spec.name,
            f"the same spec and --set values as launch {latest.launch_id}; they differ: {differs}",
        )
    return latest


class _Signals:
    """SIGINT, SIGTERM and SIGHUP stop a launch alike: the running trials stop and keep their checkpoints, the
    writer spends the grace period writing what it holds (`RunWriter.hurry`: trials' ends first), the parent and
    the unfinished runs are marked interrupted, the resume line is printed, all within `GRACE_S`; a second signal
    (or the grace running out) marks the parent if it is not yet, says how to continue and exits at once with
    128 + the signal."""

    def __init__(self) -> None:
        self.received: int | None = None
        self.deadline: float | None = None  # time.monotonic() by which the driver is gone, once signalled
        self.writer: RunWriter | None = None  # the launch's writer, for the last word
        self.resume_hint = ""  # the command that continues the launch
        self._saved: dict[int, Any] = {}

    def __enter__(self) -> _Signals:
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
        driver = _ACTIVE
        if driver is not None:
            driver.signal = signum
            driver.writer.hurry(self.deadline - RESERVE_S)
        if driver is not None and callable(signal.getsignal(signal.SIGUSR1)):
            driver.interrupt()
        else:
            raise KeyboardInterrupt

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


def _preflight(plan: Plan, console: Console) -> dict[str, dict[str, Any]]:
    """Before any trial: every distinct data set found (or downloaded), the storage writable; the trials' configs
    with a relative `data.root` made absolute (against the directory `fasweep launch` runs in)."""
    from fasweep.config import DataConfig
    from fasweep.datasets import source as data_source

    configs: dict[str, dict[str, Any]] = {}
    datasets: dict[str, dict[str, Any]] = {}
    for trial in plan.trials:
        config, root = trial.config, trial.config["data"].get("root")
        if root and "://" not in root and not Path(root).expanduser().is_absolute():
            config = set_path(config, "data.root", str(Path(root).expanduser().resolve()))
        configs[trial.key] = config
        datasets.setdefault(json.dumps(config["data"], sort_keys=True), config["data"])
    for data in datasets.values():
        source = data_source(data["name"])  # a generated, bundled or user's set needs no look (nor torch, here)
        if source == "files":
            from fasweep.data import locate

            source = locate(DataConfig.model_validate(data))
        console.print(f"data {data['name']}: {source}", markup=False, highlight=False, soft_wrap=True)
    storage = plan.spec.storage
    if "://" not in storage:
        folder = Path(storage).expanduser().resolve()
        try:
            folder.mkdir(parents=True, exist_ok=True)
            probe = folder / f".fasweep-probe-{os.getpid()}"
            probe.write_bytes(b"0" * 4096)
            probe.unlink()
        except OSError as exc:
            fault = describe_fault(exc, str(folder))
            raise UserError(f"storage {fault}" if fault else f"storage {folder}: not writable ({exc})") from None
        free = shutil.disk_usage(folder).free
        need = _checkpoint_bytes(plan) if free < ROOMY_BYTES else 0  # the estimate builds models (imports torch)
        if need and free < need:
            console.print(
                f"warning: storage {folder} has {free_space(folder)}; the plan's checkpoints may need "
                f"{human_bytes(need)} ({plan.spec.checkpoint.keep} per trial)",
                markup=False,
                soft_wrap=True,
            )
    return configs


def _footprints(plan: Plan) -> dict[str, Footprint | None]:
    """Each trial's `fasweep.trial.footprint` (measured once per distinct net, optimizer and data set)."""
    from fasweep.config import TrialConfig
    from fasweep.trial import footprint

    measured: dict[str, Footprint | None] = {}
    out = {}
    for t in plan.trials:
        train, data = t.config["train"], t.config["data"]["name"]
        sized = {"optimizer": train["optimizer"], "momentum": train["momentum"], "data": data}
        what = json.dumps({"model": t.config["model"], "feedback": t.config["feedback"], **sized}, sort_keys=True)
        if what not in measured:
            measured[what] = footprint(TrialConfig.model_validate(t.config))
        out[t.key] = measured[what]
    return out


def _checkpoint_bytes(plan: Plan) -> int:
    """The plan's checkpoints in storage: `keep` per trial, each its net's state and optimizer moments."""
    sizes = [f.checkpoint for f in _footprints(plan).values() if f is not None]
    return sum(sizes) * plan.spec.checkpoint.keep


def _check_memory(plan: Plan, slots: dict[str, int]) -> None:
    """Refuse, before any compute, a trial (or pack) whose nets' state, gradients and optimizer moments exceed the
    memory of the largest Ray node: it would grow until the node kills it."""
    import ray

    nodes = [n["Resources"] for n in ray.nodes() if n.get("Alive")]
    memory = max((r.get("memory", 0.0) + r.get("object_store_memory", 0.0) for r in nodes), default=0.0)
    if not memory:
        return
    sizes = _footprints(plan)
    for stage in plan.stages:
        for members in plan.packs(stage, slots=slots[stage]):
            need = [sizes[t.key] for t in members]
            total = sum(f.memory for f in need if f is not None)
            if total > memory:
                t, f = members[0], need[0]
                who = t.key if len(members) == 1 else f"the pack of {t.key} ({len(members)} trials)"
                per = " per trial" if len(members) > 1 else ""
                parts = f"state {human_bytes(f.state)}, gradients {human_bytes(f.gradients)}" if f else ""
                parts = f" ({parts}, optimizer moments {human_bytes(f.moments)}{per})" if f else ""
                raise UserError.field(
                    "model.arch",
                    t.config["model"]["arch"],
                    f"a net whose training state fits a worker's memory: {who} needs {human_bytes(total)}{parts}, "
                    f"more than the {human_bytes(memory)} of the largest Ray node",
                )


def launch(
    spec_path: str | Path,
    *,
    sets: dict[str, Any] | None = None,
    address: str | None = None,
    tracking_uri: str | None = None,
    resume: bool = False,
    force: bool = False,
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
    plan = load_spec(spec_path, sets)
    spec = plan.spec
    _check_address(address)  # every address before any compute
    uri = resolve_tracking_uri(tracking_uri)
    check_reachable(uri)
    configs = _preflight(plan, console)
    from fasweep.trial_curves import trial_curves

    writer = RunWriter(uri, spec.experiment, spec.name, curves=trial_curves)
    lease: Lease | None = None
    started_ray = False
    signals = _Signals()
    signals.writer = writer
    try:
        with signals:
            target = _resume_target(writer, plan, console) if resume else None
            if target is not None and target.status == LaunchStatus.FINISHED:
                console.print(
                    f"nothing to resume: launch {target.launch_id} of {spec.name} finished all its trials",
                    soft_wrap=True,
                )
                return LaunchResult(
                    spec.name, target.launch_id, "nothing-to-resume", target.run_id, spec.experiment, uri
                )
            launch_id = target.launch_id if target is not None else new_launch_id()
            lease = Lease(  # taken over, the writer writes nothing more and Tune stops at its next step
                writer.client, writer.experiment_id, spec.name, launch_id, uri, on_lost=lambda _: writer.abandon()
            )
            taken = lease.acquire(force=force, say=lambda line: console.print(line, soft_wrap=True))
            if taken is not None:  # it has let go (or is gone): its runs are interrupted, whoever continues them
                console.print(f"took over the lease of {spec.name} from {taken.describe(time.time())}", soft_wrap=True)
                if taken.launch_id != launch_id:
                    interrupt_launch(writer.client, writer.experiment_id, taken.launch_id, writer.budget_s)
            if target is not None:  # its driver is gone: what it left running is interrupted until restarted
                writer.interrupt_runs(running_runs(writer.client, writer.experiment_id, launch_id))
            try:
                started_ray = _init_ray(address, num_cpus, spec.code)
            except Exception as exc:
                raise UserError.field(
                    "--address", address, f"a reachable Ray cluster, e.g. HOST:6379 ({reason_of(exc)})"
                ) from None
            signals.install()
            signals.resume_hint = f"fasweep launch {spec_path} --resume (same --set values)"
            _check_fits(plan.trials, local=address is None)
            _check_memory(plan, _slots(plan))
            result = _run(plan, configs, writer, target, launch_id, console, address, signals, lease)
    finally:
        writer.close(_left(signals.deadline) if signals.deadline else None)
        if started_ray:  # before the lease goes: a driver taking it over finds these trials stopped
            import ray

            ray.shutdown()
        if lease is not None:
            lease.release()
    return result


def _left(deadline: float) -> float:
    """Seconds until a time.monotonic() deadline (at least 0.1)."""
    return max(0.1, deadline - time.monotonic())


def _run(
    plan: Plan,
    configs: dict[str, dict[str, Any]],
    writer: RunWriter,
    target: LaunchRecord | None,
    launch_id: str,
    console: Console,
    address: str | None,
    signals: _Signals,
    lease: Lease,
) -> LaunchResult:
    """Open (or reopen) the parent run, run the stages, close the parent; the launch's result. A driver whose
    `lease` is taken over meanwhile stops its trials, writes nothing more and raises `LeaseLost`."""
    spec = plan.spec
    if lease.lost_to is not None:
        raise LeaseLost(spec.name, lease.lost_to)
    best = best_rule(plan)
    tags = {
        Tag.AXES: json.dumps(spec.axes),
        Tag.N_TRIALS: str(len(plan.trials)),
        Tag.PLAN_HASH: plan.hash,
        Tag.BEST_METRIC: best.metric,
        Tag.BEST_MODE: best.mode,
    }
    from fasweep.runs.conditions import parent_info

    slots = _slots(plan)
    described = parent_info(plan, configs, best, launch_id, slots)  # params, description, condition runs
    writer.open_parent(
        launch_id, {str(k): v for k, v in tags.items()}, dump_spec(spec), target.run_id if target else "", described
    )
    root = storage_root(plan, launch_id)
    driver = _Driver(writer, plan, configs, best, console)
    driver.storage, driver.lease = root, lease
    verb = "resuming" if target else "launching"
    driver.progress.say(f"{verb} {spec.name} @ {launch_id}: {plan.summary(slots)}; MLflow {writer.uri}; storage {root}")
    for warning in plan.warnings():
        driver.progress.say(f"warning: {warning}")
    if address and "://" not in spec.storage:
        driver.progress.say(f"note: storage {root} must be a path shared by every Ray node (or s3://) for checkpoints")
    status = LaunchStatus.FAILED
    global _ACTIVE
    unsaved: TrackingError | None = None
    try:
        _ACTIVE = driver
        status = _run_stages(plan, driver, root, target is not None, slots)
    except KeyboardInterrupt:
        status = LaunchStatus.INTERRUPTED
    except Exception:
        if writer.error is not None:  # the writer gave up: that is why Tune stopped; say so in one line
            raise writer.error from None
        raise
    finally:
        _ACTIVE = None
        try:
            writer.flush()
            writer.finish_parent(status)  # the parent first: never left running, however little time is left
            if status != LaunchStatus.FINISHED:  # no run is left "running" once this driver ends
                writer.interrupt_runs(running_runs(writer.client, writer.experiment_id, launch_id))
        except TrackingError as exc:
            unsaved = exc
    if lease.lost_to is not None:
        raise LeaseLost(spec.name, lease.lost_to)
    if unsaved is not None:
        raise unsaved
    log_file = Path(root) / ERRORS_LOG if "://" not in root else None
    digest = driver.digest(log_file)
    for line in [*digest, *driver.unrecorded()]:
        driver.progress.say(line)
    if digest and log_file is not None:
        driver.progress.say(f"full error texts: {log_file}")
    if driver.fault:
        raise UserError(f"{driver.fault}; then continue with `fasweep launch SPEC --resume`")
    trials = _trials(writer, launch_id)
    counts = dict(Counter(t.status for t in trials))
    chosen = best_trial(trials, best)
    best_pair = (chosen.key, chosen.metrics[best.metric]) if chosen else None
    result = LaunchResult(
        spec.name, launch_id, status, writer.parent_id, spec.experiment, writer.uri, counts, best_pair
    )
    result.storage, result.errors = root, digest
    result.signal = driver.signal or signals.received
    result.retry_helps = any(k not in driver.user_errors for k in driver.errors)
    if status in (LaunchStatus.FINISHED, LaunchStatus.FAILED):
        result.report = _main_report(spec.name, writer.uri, launch_id)
    return result


def _main_report(sweep: str, uri: str, launch_id: str) -> str:
    """Log the tables of the launch's main report on its parent run (`fasweep report SWEEP` adds the plots, which
    take minutes for hundreds of conditions); one line saying where, or why not (the results stand either way)."""
    from fasweep.report import make_report

    try:
        logged = make_report(sweep, tracking_uri=uri, launch=launch_id, figures=False).logged
    except Exception as exc:  # e.g. no trial logged an epoch: nothing to tabulate
        return f"main report not logged: {reason_of(exc)}"
    return f"{logged} (tables; `fasweep report {sweep}` adds the plots)"


def _trials(writer: RunWriter, launch_id: str) -> list[TrialRecord]:
    """This launch's trial runs as the store has them now."""
    return writer.sync(
        "read trial runs", lambda: trials_of(writer.client, writer.experiment_id, launch_id, writer.parent_id)
    )


def _run_stages(plan: Plan, driver: _Driver, root: str, resume: bool, slots: dict[str, int]) -> LaunchStatus:
    """Run the stages in order (each stage's packs cut to fill its `slots`); the launch status (finished | failed |
    interrupted)."""
    # Tune's own console output off (the legacy engine honours verbose=0); Tune's result files off.
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    os.environ.setdefault("TUNE_DISABLE_AUTO_CALLBACK_LOGGERS", "1")  # MLflow is the log (saves the driver ~30% CPU)
    writer = driver.writer
    stages = plan.stages
    for stage in stages:
        if driver.lease is not None and driver.lease.lost_to is not None:
            return LaunchStatus.INTERRUPTED
        mine = plan.stage_trials(stage)
        writer.flush()
        stored = {t.key: t.status for t in _trials(writer, writer.launch_id)}
        todo = [t for t in mine if stored.get(t.key) not in COMPLETE]
        if not todo:
            driver.progress.say(f"[{stage}] all {len(mine)} trials already complete")
            continue
        driver.start_stage(stage, {t.key: TrialStatus.PENDING if t in todo else stored[t.key] for t in mine})
        init = _resolve_init(mine, driver)
        name = f"{stage}.resume-{secrets.token_hex(2)}" if resume else stage
        if resume:
            keys = [t.key for t in todo]
            driver.resuming(keys, set(find_checkpoints(root, keys)))
        outcome = _run_stage(plan, todo, driver, root, name, resume, init, slots[stage])
        driver.say_resumed()  # what trials that never reported left unsaid
        if outcome != LaunchStatus.FINISHED:
            if stage != stages[-1]:
                driver.progress.say(f"[{stage}] ended {outcome}; later stages not started (`--resume` continues)")
            return outcome
    return LaunchStatus.FINISHED


def _resolve_init(trials: list[PlannedTrial], driver: _Driver) -> Any:
    """A stage's init_from: the earlier stage's best (or last) finished run's checkpoint, as an object-store ref."""
    init = trials[0].init_from
    if init is None:
        return None
    import ray

    writer = driver.writer
    candidates = [
        t
        for t in _trials(writer, writer.launch_id)
        if t.stage == init["stage"] and t.condition == init["condition"] and t.status == TrialStatus.FINISHED
    ]
    if not candidates:
        raise UserError.field(
            "init_from", f"{init['stage']}/{init['condition']}", "a finished run of that stage and condition"
        )
    if init["select"] == "last":
        run = max(candidates, key=lambda t: t.end_time)
    else:
        run = best_trial(candidates, Best(init["metric"], init["mode"]))
        if run is None:
            raise UserError.field(
                "init_from.metric",
                init["metric"],
                f"a metric logged by the runs of {init['stage']}/{init['condition']}",
            )
    uri = f"runs:/{run.run_id}/{CHECKPOINT_ARTIFACT}"
    with tempfile.TemporaryDirectory(prefix="fasweep-init-") as tmp:
        path = writer.sync(
            "download checkpoint", lambda: writer.client.download_artifacts(run.run_id, CHECKPOINT_ARTIFACT, tmp)
        )
        data = Path(path).read_bytes()
    for t in trials:
        info = driver.infos[t.key]
        config = set_path(info.config, "model.init_from.checkpoint", uri)
        driver.infos[t.key] = TrialInfo(info.key, info.stage, info.condition, info.seed, config)
    driver.progress.say(f"[{trials[0].stage}] init_from {init['stage']}/{init['condition']} ({init['select']}): {uri}")
    return ray.put(data)


def _run_stage(
    plan: Plan,
    trials: list[PlannedTrial],
    driver: _Driver,
    root: str,
    name: str,
    resumed: bool,
    init: Any,
    slots: int,
) -> LaunchStatus:
    """One Tune experiment `<root>/<name>` running `trials` (`resumed`: of a --resume; packs cut to fill `slots`);
    finished | failed | interrupted."""
    spec = plan.spec
    keys = [t.key for t in trials]
    configs = {t.key: driver.infos[t.key].config for t in trials}
    groups = [[t.key for t in g] for g in plan.packs(trials[0].stage, set(keys), slots)]
    units = {pack_id(g) if len(g) > 1 else g[0]: g for g in groups}  # Tune trial key -> trial keys
    driver.packs = {unit: members for unit, members in units.items() if len(members) > 1}
    planned = {t.key: t for t in trials}
    trainable = tune.with_parameters(
        run_trial,
        configs=configs,
        init=init,
        resumed=resumed,
        storage=root,
        checkpointing=spec.checkpoint,
        packs=driver.packs,
    )
    resources = {  # a pack's: its stage's (every member's)
        unit: {"cpu": planned[m[0]].resources["cpu"], "gpu": planned[m[0]].resources["gpu"]}
        for unit, m in units.items()
    }
    same = len({json.dumps(r, sort_keys=True) for r in resources.values()}) == 1
    one = next(iter(resources.values()))
    trainable = tune.with_resources(trainable, one if same else lambda c: resources[c["key"]])
    tuner = tune.Tuner(
        trainable,
        param_space={"key": tune.grid_search(list(units))},
        tune_config=tune.TuneConfig(
            num_samples=1,
            max_concurrent_trials=spec.max_concurrent,
            scheduler=_scheduler(plan, trials),
            reuse_actors=same,
            trial_name_creator=lambda trial: str(trial.config["key"]).replace("/", ":"),
            trial_dirname_creator=lambda trial: trial_dirname(trial.config["key"]),
        ),
        run_config=tune.RunConfig(
            name=name,
            storage_path=root,
            failure_config=tune.FailureConfig(max_failures=spec.max_retries),
            verbose=0,
            callbacks=[_Hooks()],
        ),
    )
    tune_log = logging.getLogger("ray.tune")
    level, tune_log.level = tune_log.level, logging.CRITICAL  # trial errors are digested by the driver instead
    try:
        with driver.progress.live():
            tuner.fit()
    finally:
        tune_log.setLevel(level)
    driver.writer.flush()
    if driver.signal is not None or driver.fault or driver.writer.abandoned:
        return LaunchStatus.INTERRUPTED
    statuses = {t.key: t.status for t in _trials(driver.writer, driver.writer.launch_id)}
    if any(statuses.get(k) in (None, TrialStatus.RUNNING) for k in keys):
        return LaunchStatus.INTERRUPTED
    return LaunchStatus.FINISHED if all(statuses.get(k) in COMPLETE for k in keys) else LaunchStatus.FAILED


def _scheduler(plan: Plan, trials: list[PlannedTrial]) -> Any:
    """ASHA on the trials' epochs when the spec asks for it."""
    if plan.spec.scheduler is None:
        return None
    from ray.tune.schedulers import ASHAScheduler

    asha = plan.spec.scheduler.asha
    max_t = asha.max_t or max(int(t.config["train"]["epochs"]) for t in trials)
    return ASHAScheduler(
        time_attr="epoch",
        metric=asha.metric,
        mode=asha.mode,
        max_t=max_t,
        grace_period=min(asha.grace_period, max_t),
        reduction_factor=asha.reduction_factor,
    )
