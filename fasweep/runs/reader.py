"""The run record's one reader: launches and their trial runs out of MLflow (every page), for `fasweep status`,
`fasweep report`, `--resume` and a stage's `init_from`. It only reads (`fasweep.runs.status` marks a launch whose
driver is gone)."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import Any

from fasweep.errors import UserError
from fasweep.runs.layout import Best, Role, Tag, TrialId, TrialStatus
from fasweep.runs.store import all_experiment_ids, quote, search_all


@dataclass(frozen=True)
class LaunchRecord:
    """One launch: its parent run and the facts tagged on it."""

    run_id: str
    experiment_id: str
    sweep: str
    launch_id: str
    status: str
    start_time: int
    n_trials: int
    plan_hash: str
    axes: list[str]
    best: Best
    tags: dict[str, str] = field(repr=False)

    @property
    def started(self) -> str:
        """The start time, `YYYY-MM-DD HH:MM` UTC."""
        return time.strftime("%Y-%m-%d %H:%M", time.gmtime(self.start_time / 1000))


@dataclass(frozen=True)
class TrialRecord(TrialId):
    """One trial run: its identity (as its tags say), status, latest metrics and params (the flattened TrialConfig,
    as str)."""

    run_id: str
    status: str
    name: str
    start_time: int
    end_time: int
    metrics: dict[str, float]
    params: dict[str, str]
    tags: dict[str, str] = field(repr=False)

    @property
    def epoch(self) -> int:
        """The latest epoch logged (0: none)."""
        return int(self.metrics.get("epoch", 0))


def launch_record(run: Any) -> LaunchRecord:
    """A launch as its parent run `run` records it."""
    tags = run.data.tags
    return LaunchRecord(
        run_id=run.info.run_id,
        experiment_id=run.info.experiment_id,
        sweep=tags.get(Tag.SWEEP, ""),
        launch_id=tags.get(Tag.LAUNCH, ""),
        status=tags.get(Tag.STATUS, ""),
        start_time=run.info.start_time or 0,
        n_trials=int(tags.get(Tag.N_TRIALS, 0) or 0),
        plan_hash=tags.get(Tag.PLAN_HASH, ""),
        axes=json.loads(tags.get(Tag.AXES) or "[]"),
        best=Best(tags.get(Tag.BEST_METRIC, "test_acc"), "min" if tags.get(Tag.BEST_MODE) == "min" else "max"),
        tags=dict(tags),
    )


def _trial(run: Any) -> TrialRecord:
    tags = run.data.tags
    status = tags.get(Tag.STATUS) or (TrialStatus.RUNNING if run.info.status == "RUNNING" else run.info.status.lower())
    seed = tags.get(Tag.SEED, "")
    return TrialRecord(
        run_id=run.info.run_id,
        key=tags.get(Tag.TRIAL_KEY, ""),
        stage=tags.get(Tag.STAGE, "main"),
        condition=tags.get(Tag.CONDITION, run.info.run_name or run.info.run_id),
        seed=int(seed) if seed.lstrip("-").isdigit() else 0,
        status=status,
        name=run.info.run_name or run.info.run_id,
        start_time=run.info.start_time or 0,
        end_time=run.info.end_time or 0,
        metrics=dict(run.data.metrics),
        params=dict(run.data.params),
        tags=dict(tags),
    )


def find_launches(mlflow: Any, sweep: str | None = None, experiment_ids: list[str] | None = None) -> list[LaunchRecord]:
    """Every launch (of `sweep`, when given) in the experiments (all, when None), newest first."""
    ids = all_experiment_ids(mlflow) if experiment_ids is None else experiment_ids
    where = f"tags.`{Tag.ROLE}` = '{Role.PARENT}'"
    if sweep:
        where += f" AND tags.`{Tag.SWEEP}` = {quote(sweep)}"
    runs = [run for i in range(0, len(ids), 100) for run in search_all(mlflow, ids[i : i + 100], where)]
    return sorted((launch_record(r) for r in runs), key=lambda p: (p.start_time, p.launch_id), reverse=True)


def unknown_sweep(uri: str, sweep: str, launches: list[LaunchRecord]) -> UserError:
    """The one error for a sweep name the store does not hold, naming the sweeps of `launches` (every launch there)."""
    known = ", ".join(sorted({launch.sweep for launch in launches})) or "none yet (fasweep launch SPEC)"
    return UserError.field("sweep", sweep, f"a sweep in {uri}: {known}")


def trials_of(mlflow: Any, experiment_id: str, launch_id: str, parent_run_id: str = "") -> list[TrialRecord]:
    """The trial runs of one launch (of the launch whose parent run is `parent_run_id`, when given), by trial key.
    A trial names its launch's parent run in `fasweep.launch_run` (it is nested under its condition run); a
    trial written before condition runs existed is nested directly under the parent."""
    where = f"tags.`{Tag.LAUNCH}` = {quote(launch_id)} AND tags.`{Tag.ROLE}` = '{Role.TRIAL}'"
    runs = search_all(mlflow, [experiment_id], where)
    mine = [
        r
        for r in runs
        if not parent_run_id or r.data.tags.get(Tag.LAUNCH_RUN, r.data.tags.get(Tag.PARENT_RUN)) == parent_run_id
    ]
    return sorted((_trial(r) for r in mine), key=lambda t: t.key)


def running_runs(mlflow: Any, experiment_id: str, launch_id: str) -> list[str]:
    """The ids of a launch's condition and trial runs still marked running (to mark interrupted when its driver
    has stopped)."""
    where = (
        f"tags.`{Tag.LAUNCH}` = {quote(launch_id)} AND tags.`{Tag.STATUS}` = '{TrialStatus.RUNNING}' AND "
        f"tags.`{Tag.ROLE}` != '{Role.PARENT}'"
    )
    return [r.info.run_id for r in search_all(mlflow, [experiment_id], where)]


def launch_trials(mlflow: Any, launch: LaunchRecord) -> list[TrialRecord]:
    """The trial runs of one launch, by trial key."""
    return trials_of(mlflow, launch.experiment_id, launch.launch_id, launch.run_id)


def best_trial(trials: list[TrialRecord], best: Best) -> TrialRecord | None:
    """The best of `trials` by the one definition (`Best`)."""
    chosen = best.choose((t.key, t.status, t.metrics) for t in trials)
    return next(t for t in trials if t.key == chosen[0]) if chosen else None
