"""The run record's layout: every name a sweep leaves in MLflow and in storage, and what "best" means.

MLflow: one parent run per launch (`<sweep>@<launch_id>`, role `parent`), under it one condition run per
(stage, condition) (role `condition`: per-epoch mean and sd of its trials), under each its trial runs (role
`trial`, one per seed), each tagged with the `Tag` names below and named by `condition_run_names`; per-epoch
metrics use step = epoch. Storage: `<storage>/<sweep>/<launch_id>/` holds one Tune experiment per stage (and per
`--resume` of it) and `CHECKPOINTS_DIR/<trial dir>/epoch-NNNNNN/` per checkpoint of a trial (`trial_checkpoints`),
each holding `CHECKPOINT_FILE` and `HISTORY_FILE`. Files fasweep caches per machine (decoded data sets, the MKL preload
library of `fasweep.torch_env`) go under `cache_dir()`. Everything that writes or reads any of this imports the names
from here; nothing else spells them.
"""

from __future__ import annotations

import hashlib
import math
import os
import re
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Literal


class Tag(StrEnum):
    """MLflow tag names of fasweep runs (parent, condition and trial runs)."""

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
    LAUNCH_RUN = "fasweep.launch_run"  # on condition and trial runs: the run id of their launch's parent run
    BEST_CONDITION = "fasweep.best_condition"  # on the parent: the condition with the best final mean
    NOTE = "mlflow.note.content"  # a run's description (markdown) in the MLflow UI


# Params beside the flattened TrialConfig on trial, condition and parent runs: the rule each weight layer ran (its
# mark in the layer string, else feedback.mode) and the options that rule read (`fasweep.runs.conditions.rule_params`)
LAYERS_PARAM = "feedback.layers"  # `dense0:bp dense1:bp dense2:random`


def layer_param(layer: str) -> str:
    """The param holding one weight layer's rule and options: `feedback.layers.<module>` (`feedback.layers.dense2` =
    `random_updated(decay=0.0)`)."""
    return f"{LAYERS_PARAM}.{layer}"


LEASE_TAG_PREFIX = "fasweep.lease."  # experiment tag `fasweep.lease.<sweep>`: the running launch's lease
LEASE_RELEASED_SUFFIX = ".released"  # `fasweep.lease.<sweep>.released`: the driver that last let a taken lease go
# experiment tag `<prefix><id>`: a saved view of the runs page (MLflow's name; one per launch, `fasweep.runs.links`)
SHARED_VIEW_TAG_PREFIX = "mlflow.sharedViewState."


class Role(StrEnum):
    """What a fasweep run is."""

    PARENT = "parent"
    CONDITION = "condition"
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
    INTERRUPTED = "interrupted"  # its driver stopped (a signal, a fault, a kill) before it ended: --resume continues


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
    TrialStatus.INTERRUPTED: "KILLED",
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


def condition_label(stage: str, condition: str) -> str:
    """A condition as reports and summaries show it: `stage/condition`, or the condition alone in stage `main`."""
    return condition if stage == "main" else f"{stage}/{condition}"


@dataclass(frozen=True)
class TrialId:
    """A trial's identity, declared once: the plan's trial (`fasweep.spec.plan.PlannedTrial`) and its run as read
    back (`fasweep.runs.reader.TrialRecord`, from the tags `Tag.TRIAL_KEY`, `STAGE`, `CONDITION`, `SEED`) extend it."""

    key: str  # `trial_key(stage, condition, seed)`
    stage: str
    condition: str
    seed: int

    @property
    def label(self) -> str:
        """Its condition as reports show it (`condition_label`)."""
        return condition_label(self.stage, self.condition)


def trial_run_name(condition_run: str, seed: int) -> str:
    """A trial run's name: its condition run's name and the seed, `<name> s<seed>`."""
    return f"{condition_run} s{seed}"


def condition_run_names(conditions: Iterable[tuple[str, str]]) -> dict[tuple[str, str], str]:
    """Short, unique run names for a launch's (stage, condition) pairs.

    Per stage, a name keeps only the parts of the condition name (the named condition, `axis=value`) that vary
    across the stage's conditions, with numbers written shortest (`1.0` -> `1`) and other values cut to their
    shortest unambiguous word prefix (`batch_random` -> `batch` beside `uniform`), joined by spaces; a stage
    with one condition keeps its full name. Several stages prefix `<stage>/`. Names that would still clash keep
    the full condition name. The full condition stays in the tag `fasweep.condition` and in the params.
    """
    pairs = list(dict.fromkeys(conditions))
    stages = list(dict.fromkeys(stage for stage, _ in pairs))
    prefix = {stage: f"{stage}/" if len(stages) > 1 else "" for stage in stages}
    names: dict[tuple[str, str], str] = {}
    for stage in stages:
        parts = {c: dict(_parts(c)) for s, c in pairs if s == stage}
        axes = dict.fromkeys(a for p in parts.values() for a in p)
        varying = [a for a in axes if len({p.get(a) for p in parts.values()}) > 1]
        short = {a: _short_values([p[a] for p in parts.values() if a in p], named=not a) for a in varying}
        for c, p in parts.items():
            kept = [f"{a}={short[a][p[a]]}" if a else short[a][p[a]] for a in varying if a in p]
            names[stage, c] = prefix[stage] + (" ".join(kept) or c)
    clashes = Counter(names.values())
    return {(s, c): name if clashes[name] == 1 else prefix[s] + c for (s, c), name in names.items()}


def _parts(condition: str) -> list[tuple[str, str]]:
    """A condition name's parts as (axis, value): the named condition first (axis ''), then `axis=value` parts; a
    comma inside a value (a rendered list) stays in it."""
    parts: list[tuple[str, str]] = []
    for token in condition.split(","):
        axis, eq, value = token.partition("=")
        if eq and axis:
            parts.append((axis, value))
        elif parts and parts[-1][0]:
            parts[-1] = (parts[-1][0], f"{parts[-1][1]},{token}")
        else:
            parts.append(("", token))
    return parts


def _short_values(values: list[str], named: bool) -> dict[str, str]:
    """Each distinct value -> its shortest unambiguous rendering (named conditions are kept whole)."""
    distinct = list(dict.fromkeys(values))
    if named:
        return {v: v for v in distinct}
    try:
        numbers = {v: f"{float(v):g}" for v in distinct if v.lower() not in ("true", "false", "nan", "inf", "-inf")}
    except ValueError:
        numbers = {}
    if len(numbers) == len(distinct) and len(set(numbers.values())) == len(distinct):
        return numbers
    words = {v: re.split(r"(?<=[_-])", v) for v in distinct}
    out = {}
    for v in distinct:
        prefixes = ("".join(words[v][:k]).rstrip("_-") for k in range(1, len(words[v]) + 1))
        out[v] = next((p for p in prefixes if not any(o != v and o.startswith(p) for o in distinct)), v)
    return out


def trial_dirname(key: str) -> str:
    """A trial's folder (in a Tune experiment, and of its checkpoints): a readable prefix and a digest of its key."""
    safe = "".join(c if c.isalnum() or c in "-.=," else "_" for c in key.replace("/", ":"))
    return f"{safe[:60]}-{hashlib.sha1(key.encode()).hexdigest()[:10]}"


CHECKPOINTS_DIR = "_checkpoints"  # under a launch's storage root; `_`: never the name of a stage's Tune experiment
CHECKPOINT_FILE = "checkpoint.pt"  # train()'s checkpoint (torch)
HISTORY_FILE = "history.json"  # beside it: every epoch's metrics so far, written by train() (no torch to read)
CHECKPOINT_ARTIFACT_DIR = "checkpoint"  # a trial run's final checkpoint in MLflow: checkpoint/checkpoint.pt
CHECKPOINT_ARTIFACT = f"{CHECKPOINT_ARTIFACT_DIR}/{CHECKPOINT_FILE}"
CURVES_ARTIFACT = "curves.png"
SPEC_ARTIFACT = "spec.yaml"  # the resolved spec on the parent run
REPORT_ARTIFACT_DIR = "report"  # the launch's main report on the parent run (`fasweep report`)
_MARKER = re.compile(r"epoch-(\d{6,})")


def trial_checkpoints(root: str, key: str) -> str:
    """A trial's checkpoint folder under a launch's storage `root` (a path or URI): the same for every stage
    experiment and `--resume` of the launch, and for a pack's member as for the trial alone."""
    return f"{root.rstrip('/')}/{CHECKPOINTS_DIR}/{trial_dirname(key)}"


def epoch_marker(epoch: int) -> str:
    """The name of a trial's checkpoint folder after `epoch` (its epoch is read off the name)."""
    return f"epoch-{epoch:06d}"


def marked_epoch(name: str) -> int | None:
    """The epoch of an `epoch_marker` folder name, None for any other name."""
    match = _MARKER.fullmatch(name)
    return int(match.group(1)) if match else None


# --- what "best" means --------------------------------------------------------------------------------------

VAL_PREFIX = "val_"  # the validation split's metrics (`val_acc`, `val_loss`), logged when a trial holds one out
TEST_PREFIX = "test_"  # the test set's metrics (`test_acc`, `test_loss`)


def lower_is_better(metric: str) -> bool:
    """Losses, angles and times are minimised; everything else (accuracies) is maximised."""
    return any(word in metric for word in ("loss", "angle", "time"))


def selection_metric(metric: str, validation: bool) -> str:
    """The metric that chooses the best epoch (or run) for `metric`: where the trials hold out a validation
    split (`validation`), a test metric's validation counterpart (`test_acc` -> `val_acc`, `test_loss` ->
    `val_loss`), so test data never selects; else `metric` itself. `fasweep report --at best`, its best epoch
    and a stage's `init_from` all choose with it; the value reported stays `metric`'s at the chosen epoch."""
    if validation and metric.startswith(TEST_PREFIX):
        return VAL_PREFIX + metric.removeprefix(TEST_PREFIX)
    return metric


def on_test_data(metric: str) -> bool:
    """Whether choosing on `metric` chooses on the test set (then say so: `chosen_on_test`)."""
    return metric.startswith(TEST_PREFIX)


def chosen_on_test(what: str) -> str:
    """The warning every place that chooses on test data prints: `<what> chosen on test data (no validation
    split): optimistic`."""
    return f"{what} chosen on test data (no validation split): optimistic"


TEST_SELECTION_NOTE = chosen_on_test("best epoch")  # the report's note when no validation split selects


def best_epoch(history: Iterable[tuple[int, float]], metric: str) -> int | None:
    """The epoch of the best finite value of `metric` in (epoch, value) pairs (min where `lower_is_better`,
    else max); ties go to the earliest epoch; None when no value is finite."""
    finite = sorted((epoch, value) for epoch, value in history if math.isfinite(value))
    if not finite:
        return None
    sign = 1.0 if lower_is_better(metric) else -1.0
    return min(finite, key=lambda ev: (sign * ev[1], ev[0]))[0]


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


def home_cache() -> Path:
    """`~/.cache/fasweep`: fasweep's folder on this machine (downloaded data sets go to its `data` folder)."""
    return Path.home() / ".cache" / "fasweep"


def cache_dir() -> Path:
    """Where fasweep caches files it makes (decoded data sets, libraries): `$FASWEEP_CACHE_DIR`, else `home_cache()`."""
    return Path(os.environ.get("FASWEEP_CACHE_DIR") or home_cache())
