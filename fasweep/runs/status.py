"""A store's launches as `fasweep status` shows them: each with its trials' states and best trial, read by the one
reader; a launch still marked running whose driver is gone is marked interrupted first (the writer's
`interrupt_launch`), so the store tells the truth."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

from fasweep.runs.layout import LaunchStatus, TrialStatus
from fasweep.runs.lease import live_holder
from fasweep.runs.reader import (
    LaunchRecord,
    TrialRecord,
    best_trial,
    find_launches,
    launch_record,
    launch_trials,
)
from fasweep.runs.store import client
from fasweep.runs.writer import interrupt_launch


@dataclass
class LaunchSummary:
    """One launch with its trials' states, for `fasweep status`."""

    launch: LaunchRecord
    trials: list[TrialRecord]
    counts: dict[str, int]
    best: TrialRecord | None


def sweep_summaries(uri: str, sweep: str | None = None) -> list[LaunchSummary]:
    """Every launch in the store (of `sweep`, when given), newest first, with trial counts and the best trial.
    A launch still marked running whose driver is gone (its lease free or stale) is first marked interrupted,
    with its running condition and trial runs (also those a driver stopped by a signal had no time to mark): the
    store then tells the truth."""
    mlflow = client(uri)
    out = []
    for launch in find_launches(mlflow, sweep):
        trials = launch_trials(mlflow, launch)
        stopped = launch.status == LaunchStatus.INTERRUPTED and any(t.status == TrialStatus.RUNNING for t in trials)
        if launch.status == LaunchStatus.RUNNING or stopped:  # its driver may be gone: then nothing still runs
            holder = live_holder(mlflow, launch.experiment_id, launch.sweep)
            if holder is None or holder.launch_id != launch.launch_id:
                interrupt_launch(mlflow, launch.experiment_id, launch.launch_id)
                launch = launch_record(mlflow.get_run(launch.run_id))
                trials = launch_trials(mlflow, launch)
        counts = Counter(t.status for t in trials)
        out.append(LaunchSummary(launch, trials, dict(counts), best_trial(trials, launch.best)))
    return out
