"""Condition runs: what a launch's parent and condition runs carry, and how a condition's trials are averaged.

A condition run holds, per epoch (step = epoch), each metric's mean over the condition's trials under the metric's
own name, its sample sd (n - 1) as `<metric>_sd` (n >= 2) and `n`, the trials counted at that epoch. Which trials
count, as in `fasweep report`: errored trials never; a running trial up to its latest epoch; a stopped (ASHA)
trial up to its last epoch; a diverged trial with the values of its last epoch (the model it ended with, evaluated
before the non-finite step) at that epoch and every later planned epoch. Non-finite values are left out of a
metric's mean. An epoch is written once it is settled: every trial of the condition has ended or reported it, so
the curve grows as its trials run and a written epoch changes only when a trial errors or an errored one is
resumed (then the writer replaces the run).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from fasweep.config import flatten
from fasweep.models import layer_rules, rules_text
from fasweep.runs.layout import (
    COMPLETE,
    LAYERS_PARAM,
    REPORT_ARTIFACT_DIR,
    TEST_PREFIX,
    Best,
    Role,
    Tag,
    TrialStatus,
    condition_run_names,
    layer_param,
)

if TYPE_CHECKING:
    from fasweep.spec.plan import Plan

History = dict[int, dict[str, float]]  # epoch -> that epoch's metrics
N_METRIC = "n"  # on a condition run: the trials counted at each epoch
SD_SUFFIX = "_sd"  # `<metric>_sd`: their sample sd
_NOT_AVERAGED = frozenset({"epoch"})  # the step itself
PARAM_MAX = 6000  # MLflow's longest param value


@dataclass(frozen=True)
class ConditionInfo:
    """One condition of a launch: identity, run name, its planned trial keys, params and planned epochs."""

    stage: str
    condition: str
    name: str
    keys: tuple[str, ...]
    params: dict[str, str]
    epochs: int


@dataclass(frozen=True)
class ParentInfo:
    """What a launch's parent run carries beyond its tags: params, description, conditions, "best"."""

    params: dict[str, str]
    description: str
    conditions: tuple[ConditionInfo, ...]
    best: Best


def param_value(value: Any) -> str:
    """A config value as an MLflow param, as trial runs log it."""
    return "None" if value is None else str(value)


def rule_params(config: dict[str, Any]) -> dict[str, str]:
    """What a trial's layers ran, as params: `feedback.layers` (`dense0:bp dense1:bp dense2:random`) and per weight
    layer its rule with the options the rule read (`feedback.layers.dense2` = `random`): a preset's marked layers
    run their mark's rule, which `feedback.mode` alone does not show."""
    rules = layer_rules(config["model"]["arch"], config["feedback"], config["model"].get("rules"))
    return {LAYERS_PARAM: rules_text(rules)} | {layer_param(r.layer): str(r) for r in rules}


def merged_params(configs: Sequence[dict[str, Any]]) -> dict[str, str]:
    """The flattened configs and their `rule_params` as params: a key's one value, or `[a, b, ...]` (first-seen
    order) where they differ."""
    values: dict[str, dict[str, None]] = {}
    for config in configs:
        for key, value in (flatten(config) | rule_params(config)).items():
            values.setdefault(key, {})[param_value(value)] = None
    out = {k: next(iter(v)) if len(v) == 1 else f"[{', '.join(v)}]" for k, v in values.items()}
    return {k: v if len(v) <= PARAM_MAX else v[: PARAM_MAX - 1] + "…" for k, v in out.items()}


def parent_info(
    plan: Plan, configs: dict[str, dict[str, Any]], best: Best, launch_id: str, slots: Mapping[str, int] | None = None
) -> ParentInfo:
    """The parent run's params (the trials' `configs` merged: the base config, each varied key as its list of
    values), its description (its packs cut to fill `slots`, see `Plan.summary`) and the launch's conditions (each
    with its trials' configs merged as params)."""
    spec = plan.spec
    groups: dict[tuple[str, str], list[str]] = {}
    for t in plan.trials:
        groups.setdefault((t.stage, t.condition), []).append(t.key)
    names = condition_run_names(groups)
    conditions = tuple(
        ConditionInfo(
            stage,
            condition,
            names[stage, condition],
            tuple(keys),
            merged_params([configs[k] for k in keys]),
            max(int(configs[k]["train"]["epochs"]) for k in keys),
        )
        for (stage, condition), keys in groups.items()
    )
    flat = [flatten(config) for config in configs.values()]
    values = {axis: list(dict.fromkeys(param_value(f.get(axis)) for f in flat)) for axis in spec.axes}
    varied = "; ".join(f"`{a}` {' | '.join(v)}" for a, v in values.items() if len(v) > 1) or "nothing"
    fixed = "; ".join(f"`{a}` {v[0]}" for a, v in values.items() if len(v) == 1)
    seeds = ", ".join(str(s) for s in sorted({t.seed for t in plan.trials}))
    what = f"{spec.description.strip()}\n\n" if spec.description.strip() else ""
    direction = "highest" if best.mode == "max" else "lowest"
    description = (
        f"**{spec.name}** @ {launch_id}: {plan.summary(slots)}.\n\n{what}"
        f"Compares {varied}{f' (fixed here: {fixed})' if fixed else ''}; seeds {seeds}. "
        f"Best = the {direction} final `{best.metric}`.\n\n"
        "- **Compare conditions:** one child run per condition holds the mean of its seeds per epoch "
        f"(`<metric>`, sd `<metric>{SD_SUFFIX}`, `{N_METRIC}`); tick them (or filter "
        f"`tags.{Tag.ROLE} = '{Role.CONDITION}'`) and open **Chart view** (`fasweep ui {spec.name}` opens it). "
        "Expand a condition for its seeds.\n"
        f"- **Report:** `fasweep report {spec.name} --launch {launch_id}` prints the tables and logs "
        f"`{REPORT_ARTIFACT_DIR}/report.html` on this run (Artifacts)."
    )
    return ParentInfo(merged_params(list(configs.values())), description, conditions, best)


def trial_counts_at(status: str | None, history: History, epoch: int) -> dict[str, float] | None:
    """A trial's metrics as counted at `epoch` (see the module docstring), None when it does not count there."""
    if status in (None, TrialStatus.ERROR) or not history:
        return None
    if epoch in history:
        return history[epoch]
    last = max(history)
    return history[last] if status == TrialStatus.DIVERGED and epoch > last else None


def settled_through(trials: Iterable[tuple[str | None, History]], epochs: int) -> int:
    """The last epoch (<= `epochs`) no trial of the condition can still change: 0 while one has no run yet."""
    through = epochs
    for status, history in trials:
        if status is None:
            return 0
        if status not in COMPLETE and status != TrialStatus.ERROR:  # running, or interrupted (resumed later)
            through = min(through, max(history, default=0))
    return through


def aggregate(trials: Sequence[tuple[str | None, History]], epoch: int) -> dict[str, float]:
    """A condition's metrics at `epoch`: each metric's mean (and `_sd`) over the trials counted there, and `n`;
    empty when none counts. The test metrics come first (`test_acc`, `test_acc_sd`, `test_loss`, ...), `n` last: a
    run's metrics keep the order of its first epoch, and MLflow's Compare page opens on the first one."""
    rows = [row for status, history in trials if (row := trial_counts_at(status, history, epoch)) is not None]
    if not rows:
        return {}
    out = {}
    keys = {k for row in rows for k in row} - _NOT_AVERAGED
    for key in sorted(keys, key=lambda k: (not k.startswith(TEST_PREFIX), k)):
        values = [row[key] for row in rows if key in row and math.isfinite(row[key])]
        if values:
            mean = out[key] = math.fsum(values) / len(values)
            if len(values) > 1:
                out[key + SD_SUFFIX] = _sd(values, mean)
    out[N_METRIC] = float(len(rows))
    return out


def _sd(values: list[float], mean: float) -> float:
    """The sample sd (n - 1) of `values` around their `mean`: two passes in float (`statistics.stdev` is exact, 50
    times slower, and a writer averages every epoch of every condition); exactly 0 for equal values."""
    if min(values) == max(values):
        return 0.0
    return math.sqrt(math.fsum((v - mean) ** 2 for v in values) / (len(values) - 1))


def condition_status(statuses: Iterable[str | None]) -> TrialStatus:
    """A condition's status from its trials': running until every trial has ended; then error if one errored
    (it is left out of the means; `--resume` reruns it), interrupted if one was, else finished."""
    seen = set(statuses)
    if None in seen or TrialStatus.RUNNING in seen or TrialStatus.PENDING in seen:
        return TrialStatus.RUNNING
    for status in (TrialStatus.INTERRUPTED, TrialStatus.ERROR):
        if status in seen:
            return status
    return TrialStatus.FINISHED


def best_condition(
    conditions: Iterable[tuple[str, dict[str, float]]], best: Best
) -> tuple[str, dict[str, float]] | None:
    """The (label, latest metrics) of the condition with the best final mean of `best.metric` (ties: the smaller
    label), None when none has a finite one."""
    scored = [(m[best.metric], label, m) for label, m in conditions if math.isfinite(m.get(best.metric, math.nan))]
    if not scored:
        return None
    sign = -1.0 if best.mode == "max" else 1.0
    _, label, metrics = min(scored, key=lambda s: (sign * s[0], s[1]))
    return label, metrics
