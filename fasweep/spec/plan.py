"""A spec planned: read (`fasweep.spec.reading`), validated (`fasweep.spec.model`), checked and expanded
(`fasweep.spec.checks`, `fasweep.spec.contrasts`) into every trial it runs, `Plan`: the one value `launch`,
`validate`, `plan` and `report` take. Never imports torch: validating and planning a sweep is instant.

A spec is a base TrialConfig plus axes: named `conditions` (override sets), a `grid` (cross product) and
`sample` (random axes drawn here with a seeded RNG, so the plan is exact and stable), repeated over
`seeds`, optionally in `stages` where a later stage starts from an earlier stage's best run.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from fasweep import plugins
from fasweep.config import DataConfig, Loc, TrialConfig, explain, set_path
from fasweep.errors import UserError
from fasweep.packing import not_packable, packable
from fasweep.runs.layout import VAL_PREFIX, TrialId, chosen_on_test, on_test_data, selection_metric, trial_key
from fasweep.spec.checks import check_effect, check_spec, validate_cell
from fasweep.spec.contrasts import Contrast, declared_contrasts
from fasweep.spec.model import Stage, SweepSpec, stage_locs
from fasweep.spec.reading import Source, apply_sets, read_spec_file, read_yaml


@dataclass(frozen=True)
class PlannedTrial(TrialId):
    """One trial of the plan: its identity (`key`, `<stage>/<condition>/s<seed>`, is unique and stable across runs),
    the overrides of its condition, its validated config, resources and a stage's init_from."""

    overrides: dict[str, Any]
    config: dict[str, Any]
    resources: dict[str, float]
    init_from: dict[str, Any] | None = field(default=None)

    @property
    def epochs(self) -> int:
        """The epochs it is planned to run (`train.epochs` of its config)."""
        return int(self.config["train"]["epochs"])


def expand(spec: SweepSpec, source: Source | None = None) -> tuple[list[PlannedTrial], tuple[Contrast, ...]]:
    """Every trial of the spec in a stable order (stage, condition (conditions × grid × samples), seed) and the
    comparisons it declares; errors point at `source` (the spec's text and --set flags, where known)."""
    source = source or Source(f"<spec {spec.name}>")
    cells = check_spec(spec, source)
    configs = {
        stage.name: {cell.name: validate_cell(spec, stage, cell, source) for cell in cells[stage.name]}
        for stage, _ in stage_locs(spec)
    }
    check_effect(spec, cells, configs, source)
    trials: list[PlannedTrial] = []
    for stage, sloc in stage_locs(spec):
        seeds = stage.seeds or spec.seeds
        resources = (stage.resources or spec.resources).model_dump()
        if stage.init_from is not None:
            _check_selection(stage, sloc, trials, source)
        init = stage.init_from.model_dump() if stage.init_from else None
        for cell in cells[stage.name]:
            config = configs[stage.name][cell.name]
            for seed in seeds:
                trials.append(
                    PlannedTrial(
                        key=trial_key(stage.name, cell.name, seed),
                        stage=stage.name,
                        condition=cell.name,
                        seed=seed,
                        overrides=dict(cell.overrides),
                        config=set_path(config, "train.seed", seed),
                        resources=resources,
                        init_from=init,
                    )
                )
    keys: set[str] = set()
    for trial in trials:  # only names with commas inside values can collide, e.g. a condition "a,x=1"
        if trial.key in keys:
            raise UserError(
                f"{source.name}: two trials are both keyed {trial.key!r}; expected distinct condition names"
            )
        keys.add(trial.key)
    return trials, declared_contrasts(spec, configs, cells, source)


def _check_selection(stage: Stage, sloc: Loc, earlier: list[PlannedTrial], source: Source) -> None:
    """A stage's `init_from` with `select: best` chooses on validation data where its source condition holds out a
    validation split: an unset `metric` becomes the validation one (`selection_metric`: `val_acc`); a test metric
    set there is refused (choosing on test data while a validation split exists is a mistake)."""
    init = stage.init_from
    assert init is not None
    sources = [t for t in earlier if t.stage == init.stage and t.condition == init.condition]
    if init.select != "best":
        return
    if not any(DataConfig.model_validate(t.config["data"]).validation for t in sources):
        if init.metric.startswith(VAL_PREFIX):  # it would only fail once the source stage has run
            expected = f"a metric its runs log: {init.stage}/{init.condition} holds out no validation split"
            raise source.bad((*sloc, "init_from", "metric"), init.metric, f"{expected} (set data.val_fraction > 0)")
        return
    wanted = selection_metric(init.metric, validation=True)
    if wanted == init.metric:
        return
    if "metric" not in init.model_fields_set:
        init.metric = wanted
        return
    why = f"{init.stage}/{init.condition} holds out a validation split (data.val_fraction): choose on it, not on test"
    raise source.bad((*sloc, "init_from", "metric"), init.metric, f"{wanted}; {why} data")


def parse_spec(
    text: str, sets: dict[str, Any] | None = None, *, name: str = "<spec>", folder: Path | None = None
) -> Plan:
    """Validate a spec from YAML text (plus --set overrides) and plan it; errors are one-line UserErrors with
    the YAML line or --set flag. The spec's `code` folders (relative to `folder`) are made importable first."""
    source = Source(name)
    data = read_yaml(text, source)
    apply_sets(data, sets or {}, source)
    code = data.get("code") if isinstance(data, dict) else None
    for i, entry in enumerate(code if isinstance(code, list) else []):
        found = plugins.code_folder(entry, folder) if isinstance(entry, str) else None
        if found is None:
            raise source.bad(("code", i), entry, "a folder of your Python package, relative to the spec's folder")
        code[i] = str(found)  # type: ignore[index]
    if isinstance(code, list):
        plugins.importable(code)
    try:
        spec = SweepSpec.model_validate(data)
    except ValidationError as exc:
        raise source.fail(*explain(exc, data, SweepSpec)) from None
    trials, contrasts = expand(spec, source)  # every trial config validated now, errors pointing at their line
    return Plan(spec, tuple(trials), contrasts)


def load_spec(path: str | Path, sets: dict[str, Any] | None = None) -> Plan:
    """Read, validate and plan a sweep spec file, with `--set` overrides (dotted spec paths -> values) applied first."""
    path = Path(path)
    return parse_spec(read_spec_file(path), sets, name=str(path), folder=path.parent)


def dump_spec(spec: SweepSpec) -> str:
    """The resolved spec as YAML (defaults filled in); `parse_spec(dump_spec(s))` gives the same plan."""
    data = spec.model_dump(mode="json")
    first = ("name", "experiment", "description", "base")
    data = {**{k: data[k] for k in first}, **data}
    data["stages"] = [{"name": s.pop("name"), **s} for s in data["stages"]]
    return yaml.safe_dump(data, sort_keys=False, allow_unicode=True)


def plan_difference(old_spec_yaml: str, new: Plan) -> str:
    """What differs between an earlier launch's resolved spec (`dump_spec`, its spec.yaml) and `new`'s, as
    `base.train.epochs: 3 -> 8; seeds: [0,1] -> [0]` (six fields at most, then how many more)."""
    try:
        old = read_yaml(old_spec_yaml, Source("spec.yaml"))
    except UserError as exc:
        return f"the earlier launch's spec.yaml is unreadable ({exc})"
    before, after = _leaves(old), _leaves(yaml.safe_load(dump_spec(new.spec)))
    missing = object()
    changed = [p for p in {**after, **before} if before.get(p, missing) != after.get(p, missing)]
    if not changed:
        return "the same spec plans other trials now (planned by another fasweep version?)"

    def text(values: dict[str, Any], path: str) -> str:
        if path not in values:
            return "(unset)"
        value = values[path]
        out = value if isinstance(value, str) else json.dumps(value, separators=(",", ":"), default=str)
        return out if len(out) <= 40 else out[:37] + "..."

    parts = [f"{p}: {text(before, p)} -> {text(after, p)}" for p in changed[:6]]
    more = len(changed) - len(parts)
    return "; ".join(parts) + (f"; and {more} more" if more > 0 else "")


def _leaves(data: Any, prefix: str = "") -> dict[str, Any]:
    """Dotted paths to the values inside nested mappings and lists of mappings (`stages[1].seeds`); an empty
    mapping has none, any other list is one value."""
    if isinstance(data, dict):
        items = [(f"{prefix}.{key}" if prefix else str(key), value) for key, value in data.items()]
    elif isinstance(data, list) and data and all(isinstance(value, dict) for value in data):
        items = [(f"{prefix}[{i}]", value) for i, value in enumerate(data)]
    else:
        return {prefix: data}
    return {path: leaf for key, value in items for path, leaf in _leaves(value, key).items()}


@dataclass(frozen=True)
class Plan:
    """A validated spec and every trial it plans, in a stable order: the one value `launch`, `validate`, `plan`
    and `report` take. `hash` digests the trials (keys, configs, resources): equal plans, equal hashes."""

    spec: SweepSpec
    trials: tuple[PlannedTrial, ...]
    contrasts: tuple[Contrast, ...] = ()  # the comparisons the spec declares: the report's Holm family
    hash: str = field(init=False)

    def __post_init__(self) -> None:
        data = json.dumps([[t.key, t.config, t.resources] for t in self.trials], sort_keys=True, default=str)
        object.__setattr__(self, "hash", hashlib.sha256(data.encode()).hexdigest()[:16])

    @property
    def stages(self) -> list[str]:
        """Stage names in run order."""
        return list(dict.fromkeys(t.stage for t in self.trials))

    def stage_trials(self, stage: str) -> list[PlannedTrial]:
        """The trials of one stage, in plan order."""
        return [t for t in self.trials if t.stage == stage]

    def pack_size(self, stage: str) -> int:
        """At most how many of a stage's trials share a pack (the stage's `pack`, else the spec's)."""
        found = next(s for s, _ in stage_locs(self.spec) if s.name == stage)
        return found.pack or self.spec.pack

    def packs(self, stage: str, keys: Collection[str] | None = None, slots: int = 1) -> list[list[PlannedTrial]]:
        """The stage's trials (those in `keys`, None: all) grouped by `fasweep.packing.packable` into packs of at
        most `pack_size`, and into at least `slots` (packs the cluster runs at once) where the trials allow; a
        trial that cannot share a pack is a pack of one."""
        mine = [t for t in self.stage_trials(stage) if keys is None or t.key in keys]
        size = self.pack_size(stage)
        if size == 1:
            return [[t] for t in mine]
        groups = packable([TrialConfig.model_validate(t.config) for t in mine], size, slots)
        return [[mine[i] for i in group] for group in groups]

    def summary(self, slots: Mapping[str, int] | None = None) -> str:
        """`30 trials (10 conditions × 3 seeds)`, per stage when the spec has several; `in N packs` when it packs,
        for a cluster running `slots[stage]` packs at once (None: one)."""
        parts = []
        for stage, _ in stage_locs(self.spec):
            mine = self.stage_trials(stage.name)
            n_cond, n_seeds = len({t.condition for t in mine}), len(stage.seeds or self.spec.seeds)
            text = f"{n_cond} condition{'s' * (n_cond != 1)} × {n_seeds} seed{'s' * (n_seeds != 1)}"
            parts.append(f"{stage.name}: {text}" if self.spec.stages else text)
        n = len(self.trials)
        text = f"{n} trial{'s' * (n != 1)} ({'; '.join(parts)})"
        if any(self.pack_size(stage) > 1 for stage in self.stages):
            plain = {stage: len(self.packs(stage)) for stage in self.stages}
            filled = {stage: len(self.packs(stage, slots=k)) for stage, k in (slots or {}).items() if k > 1}
            packs = sum({**plain, **filled}.values())
            text += f" in {packs} pack{'s' * (packs != 1)}"
            cut = sorted({k for stage, k in (slots or {}).items() if filled.get(stage, 0) > plain[stage]})
            if cut:
                text += f" (cut to fill {'/'.join(map(str, cut))} slots)"
        return text

    def warnings(self) -> list[str]:
        """What a reader should know before the plan runs, one line each: a stage whose `init_from` chooses its
        source run on test data (no validation split); trials of a packing stage that run alone, by reason."""
        out = []
        for stage, _ in stage_locs(self.spec):
            size = self.pack_size(stage.name)
            mine = self.stage_trials(stage.name) if size > 1 else []
            alone = [r for t in mine if (r := not_packable(TrialConfig.model_validate(t.config)))]
            for reason, n in Counter(alone).items():
                out.append(f"stage {stage.name}: {n} of {len(mine)} trials run alone, not in packs of {size}: {reason}")
            init = stage.init_from
            if init is not None and init.select == "best" and on_test_data(init.metric):
                run = f"stage {stage.name}: the init_from run ({init.stage}/{init.condition}, best {init.metric})"
                fix = f"set data.val_fraction (e.g. 0.1) and init_from.metric: {selection_metric(init.metric, True)}"
                out.append(f"{chosen_on_test(run)}; {fix}")
        return out

    def gpus_needed(self) -> float:
        """GPUs the busiest stage uses with all its packs (up to `max_concurrent`) running at once."""
        peak = 0.0
        for stage, _ in stage_locs(self.spec):
            mine = self.packs(stage.name)
            running = min(len(mine), self.spec.max_concurrent or len(mine))
            peak = max(peak, running * (stage.resources or self.spec.resources).gpu)
        return peak
