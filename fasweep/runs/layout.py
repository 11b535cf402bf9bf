"""The run record's layout: every name a sweep leaves in MLflow and in storage, and what "best" means.

MLflow: one parent run per launch (`<sweep>@<launch_id>`, role `parent`) and one trial run per planned trial
(`<condition>-s<seed>`, role `trial`, nested under the parent), each tagged with the `Tag` names below; per-epoch
metrics use step = epoch. Storage: `<storage>/<sweep>/<launch_id>/<tune experiment>/<trial dir>/checkpoint_*/`,
each checkpoint folder holding `CHECKPOINT_FILE`, `HISTORY_FILE` and an epoch marker. Everything that writes or
reads any of this imports the names from here; nothing else spells them.
"""

from __future__ import annotations

import hashlib
import math
import re
from collections.abc import Iterable
from dataclasses import dataclass
from enum import StrEnum
from typing import Literal


class Tag(StrEnum):
    """MLflow tag names of fasweep runs (parent and trial runs)."""

    SWEEP = "fasweep.sweep"
    LAUNCH = "fasweep.launch"
    ROLE = "fasweep.role"
    STATUS = "fasweep.status"
    AXES = "fasweep.axes"
    N_TRIALS = "fasweep.n_trials"
    PLAN_HASH = "fasweep.plan_hash"
    BEST_METRIC = "fasweep.best_metric"
    BEST_MODE = "fasweep.best_mode"
    STAGE = "fasweep.stage"
    CONDITION = "fasweep.condition"
    SEED = "fasweep.seed"
    TRIAL_KEY = "fasweep.trial_key"
    ERROR = "fasweep.error"
    RESUMED_FROM = "fasweep.resumed_from"
    EPOCHS_RUN = "fasweep.epochs_run"
    PARENT_RUN = "mlflow.parentRunId"


LEASE_TAG_PREFIX = "fasweep.lease."  # experiment tag `fasweep.lease.<sweep>`: the running launch's lease


class Role(StrEnum):
    """What a fasweep run is."""

    PARENT = "parent"
    TRIAL = "trial"


class LaunchStatus(StrEnum):
    """A launch's (parent run's) status."""

    RUNNING = "running"
    FINISHED = "finished"
    FAILED = "failed"
    INTERRUPTED = "interrupted"


class TrialStatus(StrEnum):
    """A trial's status: the same words in the store, the progress line, `fasweep status` and the report."""

    PENDING = "pending"  # planned, no run yet (never written to the store)
    RUNNING = "running"
    FINISHED = "finished"
    DIVERGED = "diverged"
    STOPPED = "stopped"  # ended early by the scheduler (ASHA)
    ERROR = "error"


COMPLETE = frozenset({TrialStatus.FINISHED, TrialStatus.DIVERGED, TrialStatus.STOPPED})  # need no more work
MLFLOW_STATUS = {  # fasweep status -> MLflow run status
    LaunchStatus.RUNNING: "RUNNING",
    LaunchStatus.FINISHED: "FINISHED",
    LaunchStatus.FAILED: "FAILED",
    LaunchStatus.INTERRUPTED: "KILLED",
    TrialStatus.FINISHED: "FINISHED",
    TrialStatus.DIVERGED: "FINISHED",
    TrialStatus.STOPPED: "FINISHED",
    TrialStatus.ERROR: "FAILED",
}


def trial_status(history: list[dict[str, float]], planned_epochs: int) -> TrialStatus:
    """A trial's status read off its per-epoch history: diverged (last epoch non-finite), stopped (ended before
    `planned_epochs`: ASHA), finished, or error (no epoch at all)."""
    if not history:
        return TrialStatus.ERROR
    last = max(history, key=lambda m: m["epoch"])
    if last.get("diverged"):
        return TrialStatus.DIVERGED
    return TrialStatus.STOPPED if last["epoch"] < planned_epochs else TrialStatus.FINISHED


# --- names ---------------------------------------------------------------------------------------------------


def parent_run_name(sweep: str, launch_id: str) -> str:
    """The parent run's name: `<sweep>@<launch_id>`."""
    return f"{sweep}@{launch_id}"


def trial_key(stage: str, condition: str, seed: int) -> str:
    """A trial's key, unique and stable across launches of the same plan: `<stage>/<condition>/s<seed>`."""
    return f"{stage}/{condition}/s{seed}"


def trial_run_name(condition: str, seed: int) -> str:
    """A trial run's name: `<condition>-s<seed>`."""
    return f"{condition}-s{seed}"


def trial_dirname(key: str) -> str:
    """A trial's folder in a Tune experiment: a readable prefix and a digest of its key (one folder per key)."""
    safe = "".join(c if c.isalnum() or c in "-.=," else "_" for c in key.replace("/", ":"))
    return f"{safe[:60]}-{hashlib.sha1(key.encode()).hexdigest()[:10]}"


CHECKPOINT_FILE = "checkpoint.pt"  # train()'s checkpoint (torch)
HISTORY_FILE = "history.json"  # beside it: every epoch's metrics so far, written by train() (no torch to read)
CHECKPOINT_ARTIFACT_DIR = "checkpoint"  # a trial run's final checkpoint in MLflow: checkpoint/checkpoint.pt
CHECKPOINT_ARTIFACT = f"{CHECKPOINT_ARTIFACT_DIR}/{CHECKPOINT_FILE}"
CURVES_ARTIFACT = "curves.png"
SPEC_ARTIFACT = "spec.yaml"  # the resolved spec on the parent run
KEEP_CHECKPOINTS = 2  # per trial in storage: the newest and one to fall back to if the newest is unreadable
_MARKER = re.compile(r"epoch-(\d{6,})")


def epoch_marker(epoch: int) -> str:
    """The empty file in a checkpoint folder that names the epoch it holds (found without reading the folder)."""
    return f"epoch-{epoch:06d}"


def marked_epoch(name: str) -> int | None:
    """The epoch of an `epoch_marker` file name, None for any other name."""
    match = _MARKER.fullmatch(name)
    return int(match.group(1)) if match else None


# --- what "best" means --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Best:
    """The one definition of the best trial: the best *final* (latest epoch's) value of `metric`, `mode` max or
    min, among trials that have not diverged or errored; ties go to the smaller trial key. Progress, `fasweep
    status`, the launch's closing line and a stage's `init_from` all choose with it."""

    metric: str = "test_acc"
    mode: Literal["max", "min"] = "max"

    def eligible(self, status: str, metrics: dict[str, float]) -> bool:
        """Whether a trial with this status and latest metrics competes."""
        value = metrics.get(self.metric)
        bad = status in (TrialStatus.DIVERGED, TrialStatus.ERROR) or metrics.get("diverged")
        return not bad and value is not None and math.isfinite(value)

    def choose(self, candidates: Iterable[tuple[str, str, dict[str, float]]]) -> tuple[str, float] | None:
        """(key, value) of the best of (key, status, latest metrics) candidates, None when none is eligible."""
        scored = [(metrics[self.metric], key) for key, status, metrics in candidates if self.eligible(status, metrics)]
        if not scored:
            return None
        sign = -1.0 if self.mode == "max" else 1.0
        value, key = min(scored, key=lambda vk: (sign * vk[0], vk[1]))
        return key, value
