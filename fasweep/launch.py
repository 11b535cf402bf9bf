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
marked interrupted. A signal stops the trials and spends the grace period writing first (`fasweep.signals`,
`RunWriter.hurry`); every address is probed before (`fasweep.cluster.check_address`, `check_reachable`), what a
plan needs is checked before any trial (`fasweep.preflight`, `fasweep.cluster`). The launch's state on the driver
and the Tune callback feeding it are `fasweep.driver`; this module is the stage loop.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from ray import tune
from rich.console import Console

from fasweep.checkpoints import find_checkpoints
from fasweep.cluster import check_address, check_fits, check_memory, init_ray, slots_of
from fasweep.config import set_path
from fasweep.driver import Driver, Hooks
from fasweep.errors import UserError
from fasweep.preflight import preflight
from fasweep.runs.layout import (
    CHECKPOINT_ARTIFACT,
    COMPLETE,
    SPEC_ARTIFACT,
    Best,
    LaunchStatus,
    Tag,
    TrialStatus,
    trial_dirname,
)
from fasweep.runs.lease import Lease, LeaseLost
from fasweep.runs.reader import LaunchRecord, TrialRecord, best_trial, find_launches, running_runs, trials_of
from fasweep.runs.store import TrackingError, check_reachable, reason_of, resolve_tracking_uri
from fasweep.runs.writer import RunWriter, interrupt_launch
from fasweep.signals import GRACE_S, Signals
from fasweep.spec.plan import Plan, PlannedTrial, dump_spec, load_spec, plan_difference
from fasweep.worker import pack_id, run_trial

ERRORS_LOG = "errors.log"  # under the launch's storage: every trial error's full text


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
    check_address(address)  # every address before any compute
    uri = resolve_tracking_uri(tracking_uri)
    check_reachable(uri)
    configs = preflight(plan, console)
    from fasweep.trial_curves import trial_curves

    writer = RunWriter(uri, spec.experiment, spec.name, curves=trial_curves)
    lease: Lease | None = None
    started_ray = False
    signals = Signals()
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
                started_ray = init_ray(address, num_cpus, spec.code)
            except Exception as exc:
                raise UserError.field(
                    "--address", address, f"a reachable Ray cluster, e.g. HOST:6379 ({reason_of(exc)})"
                ) from None
            signals.install()
            signals.resume_hint = f"fasweep launch {spec_path} --resume (same --set values)"
            check_fits(plan.trials, local=address is None)
            check_memory(plan, slots_of(plan))
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
    signals: Signals,
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

    slots = slots_of(plan)
    described = parent_info(plan, configs, best, launch_id, slots)  # params, description, condition runs
    writer.open_parent(
        launch_id, {str(k): v for k, v in tags.items()}, dump_spec(spec), target.run_id if target else "", described
    )
    root = storage_root(plan, launch_id)
    driver = Driver(writer, plan, configs, best, console)
    driver.storage, driver.lease = root, lease
    verb = "resuming" if target else "launching"
    driver.progress.say(f"{verb} {spec.name} @ {launch_id}: {plan.summary(slots)}; MLflow {writer.uri}; storage {root}")
    for warning in plan.warnings():
        driver.progress.say(f"warning: {warning}")
    if address and "://" not in spec.storage:
        driver.progress.say(f"note: storage {root} must be a path shared by every Ray node (or s3://) for checkpoints")
    status = LaunchStatus.FAILED
    unsaved: TrackingError | None = None
    try:
        signals.driver = driver
        status = _run_stages(plan, driver, root, target is not None, slots)
    except KeyboardInterrupt:
        status = LaunchStatus.INTERRUPTED
    except Exception:
        if writer.error is not None:  # the writer gave up: that is why Tune stopped; say so in one line
            raise writer.error from None
        raise
    finally:
        signals.driver = None
        try:
            writer.flush()
            writer.finish_parent(status)  # the parent first: never left running, however little time is left
            if status != LaunchStatus.FINISHED:  # no run is left "running" once this driver ends
                running = running_runs(writer.client, writer.experiment_id, launch_id)
                writer.interrupt_runs(running, signals.marks_until())
        except TrackingError as exc:
            unsaved = exc
    if lease.lost_to is not None:
        raise LeaseLost(spec.name, lease.lost_to)
    if unsaved is not None:
        raise unsaved
    log_file = Path(root) / ERRORS_LOG if "://" not in root else None
    digest = driver.digest(log_file)
    for line in [*digest, *driver.unrecorded(GRACE_S)]:
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


def _run_stages(plan: Plan, driver: Driver, root: str, resume: bool, slots: dict[str, int]) -> LaunchStatus:
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


def _resolve_init(trials: list[PlannedTrial], driver: Driver) -> Any:
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
        planned = driver.trials[t.key]
        driver.trials[t.key] = replace(planned, config=set_path(planned.config, "model.init_from.checkpoint", uri))
    driver.progress.say(f"[{trials[0].stage}] init_from {init['stage']}/{init['condition']} ({init['select']}): {uri}")
    return ray.put(data)


def _run_stage(
    plan: Plan,
    trials: list[PlannedTrial],
    driver: Driver,
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
    configs = {t.key: driver.trials[t.key].config for t in trials}
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
            callbacks=[Hooks(driver)],
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
    max_t = asha.max_t or max(t.epochs for t in trials)
    return ASHAScheduler(
        time_attr="epoch",
        metric=asha.metric,
        mode=asha.mode,
        max_t=max_t,
        grace_period=min(asha.grace_period, max_t),
        reduction_factor=asha.reduction_factor,
    )
