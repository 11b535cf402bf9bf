"""A launch's condition runs in MLflow, kept by the writer thread of its one writer (`fasweep.runs.writer`): each found
by its tags or created, its trials' statuses and histories read from the store once, its settled epochs written as
its trials report them (what they hold and how trials count: `fasweep.runs.conditions`), replaced by a new run when
a written epoch changes; and the launch's summary on its parent (the best condition).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

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
from fasweep.runs.layout import Role, Tag, TrialStatus, condition_label
from fasweep.runs.store import log_params, metric_history, quote, search_all, set_status

if TYPE_CHECKING:
    from fasweep.spec.plan import PlannedTrial


@dataclass
class Condition:
    """A condition run as the writer thread knows it."""

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


@dataclass
class ConditionRuns:
    """The condition runs of the launch `launch_id` (parent run `parent_id`; `reopened`: a resumed launch, runs of
    it may exist already), declared by `parent.conditions`; a trial's run is `(run_id, logged)`, `logged` the
    metric steps already in it (None: not read yet)."""

    client: Any
    experiment_id: str
    sweep: str
    launch_id: str
    parent_id: str
    reopened: bool
    parent: ParentInfo | None
    _conds: dict[tuple[str, str], Condition] = field(init=False)

    def __post_init__(self) -> None:
        declared = self.parent.conditions if self.parent else ()
        self._conds = {(c.stage, c.condition): Condition(c, list(c.keys)) for c in declared}

    def of(self, trial: PlannedTrial) -> Condition:
        """The condition of a started trial; a condition the plan did not declare has the trials started so far."""
        cond = self._conds.get((trial.stage, trial.condition))
        if cond is None:
            params = {k: v for k, v in merged_params([trial.config]).items() if k != "train.seed"}
            declared = ConditionInfo(trial.stage, trial.condition, trial.condition, (), params, trial.epochs)
            cond = self._conds[trial.stage, trial.condition] = Condition(declared, [])
        if trial.key not in cond.keys:
            cond.keys.append(trial.key)
        return cond

    def _where(self, role: Role, cond: Condition) -> str:
        """Search filter: this launch's runs of `role` for the condition."""
        return (
            f"tags.`{Tag.LAUNCH}` = {quote(self.launch_id)} AND tags.`{Tag.ROLE}` = '{role}' AND "
            f"tags.`{Tag.STAGE}` = {quote(cond.info.stage)} AND tags.`{Tag.CONDITION}` = {quote(cond.info.condition)}"
        )

    def run_id(self, cond: Condition) -> str:
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
            cond.loaded |= not self.reopened  # a new launch's: no trial run of it to read
        log_params(self.client, cond.run_id, cond.info.params)
        return cond.run_id

    def _loaded(self, trial: PlannedTrial, run_id: str, logged: set[int] | None) -> Condition:
        """The trial's condition with its trials' statuses and histories and its own written epochs read from the
        store (once per writer, and not for a new launch's condition run it made: afterwards the writer keeps them,
        being the only writer)."""
        cond = self.of(trial)
        if not cond.loaded:
            cond_id = self.run_id(cond)
            for r in search_all(self.client, [self.experiment_id], self._where(Role.TRIAL, cond)):
                key = r.data.tags.get(Tag.TRIAL_KEY, "")
                if key not in cond.keys:
                    cond.keys.append(key)
                cond.statuses[key] = r.data.tags.get(Tag.STATUS, TrialStatus.RUNNING)
                cond.histories[key] = metric_history(self.client, r.info.run_id, r.data.metrics)
            run = self.client.get_run(cond_id)
            cond.written = metric_history(self.client, cond_id, run.data.metrics)
            cond.changed |= set(range(1, max(cond.written, default=0) + 1))  # an earlier driver's: checked once
            cond.status = run.data.tags.get(Tag.STATUS, "")
            cond.loaded = True
        if trial.key not in cond.histories:  # a run made after the load: read, unless known to hold no epoch yet
            empty = logged is not None and not logged
            cond.histories[trial.key] = (
                {} if empty else metric_history(self.client, run_id, self.client.get_run(run_id).data.metrics)
            )
        return cond

    def trial_status(self, trial: PlannedTrial, run_id: str, logged: set[int] | None, status: str) -> None:
        """A trial of the condition (its run `run_id`) started or ended (who counts may have changed)."""
        cond = self._loaded(trial, run_id, logged)
        span = range(1, max(cond.written, default=0) + 1)
        before = _counted(cond, trial.key, span)
        cond.statuses[trial.key] = status
        self._write(cond, trial.key, span, before)

    def trial_epochs(
        self, trial: PlannedTrial, run_id: str, logged: set[int] | None, epochs: dict[int, dict[str, float]]
    ) -> None:
        """Epochs newly logged on a trial's run `run_id`: write the condition's epochs they settle."""
        cond = self._loaded(trial, run_id, logged)
        history = cond.histories[trial.key]
        first = min([*epochs, max(history, default=0) + 1])  # below it, how it counts stays (see trial_counts_at)
        span = range(first, max(cond.written, default=0) + 1)
        before = _counted(cond, trial.key, span)
        history.update(epochs)
        self._write(cond, trial.key, span, before)

    def _write(self, cond: Condition, key: str, span: range, before: list[dict[str, float] | None]) -> None:
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
            self.run_id(cond)
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
            set_status(self.client, cond.run_id, status)
            cond.status = status

    def summarize(self) -> None:
        """The launch's summary on the parent: the best condition's final mean of the "best" metric with its sd
        and n (`best_<metric>`, `best_<metric>_sd`, `best_n`), the condition in a tag, both in the description."""
        from mlflow.entities import Metric, RunTag

        if self.parent is None:
            return
        best = self.parent.best
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
        history = metric_history(self.client, run.info.run_id, [best.metric, best.metric + SD_SUFFIX, N_METRIC])
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
        tags = {Tag.BEST_CONDITION: name, Tag.NOTE: self.parent.description + result}
        self.client.log_batch(self.parent_id, metrics=metrics, tags=[RunTag(str(k), v) for k, v in tags.items()])


def _counted(cond: Condition, key: str, epochs: range) -> list[dict[str, float] | None]:
    """How trial `key` counts in its condition at `epochs` (None: not at all)."""
    status, history = cond.statuses.get(key), cond.histories[key]
    return [trial_counts_at(status, history, e) for e in epochs]


def _same(a: dict[str, float], b: dict[str, float] | None) -> bool:
    """Whether two epochs of a condition hold the same values (as read back from the store)."""
    return b is not None and a.keys() == b.keys() and all(math.isclose(a[k], b[k], rel_tol=1e-9) for k in a)
