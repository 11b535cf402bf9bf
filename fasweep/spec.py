"""Sweep specs: read a YAML spec safely, validate it (errors name the field path and YAML line), expand it to trials.

A spec is a base TrialConfig plus axes: named `conditions` (override sets), a `grid` (cross product) and
`sample` (random axes drawn here with a seeded RNG, so the plan is exact and stable), repeated over
`seeds`, optionally in `stages` where a later stage starts from an earlier stage's best run. Never imports
torch: validating and planning a sweep is instant.

Specs are untrusted input, so reading one is bounded: at most MAX_SPEC_BYTES of text and MAX_YAML_NODES values
with every alias expanded (a "billion laughs" is refused, not walked), MAX_YAML_DEPTH levels deep, and at most
MAX_TRIALS trials, counted before any is expanded.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import hashlib
import itertools
import json
import math
import random
import re
from collections import Counter
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Self, get_args, get_origin

import yaml
from pydantic import BaseModel, Field, PrivateAttr, ValidationError, field_validator, model_validator

from fasweep import plugins
from fasweep.config import (
    CheckpointPolicy,
    DataConfig,
    Loc,
    Seed,
    Strict,
    TrialConfig,
    brief,
    explain,
    format_loc,
    get_path,
    set_path,
    submodel,
    suggest,
    unknown_field,
)
from fasweep.errors import UserError
from fasweep.packed.group import not_packable, packable
from fasweep.report_options import Pairing
from fasweep.runs.layout import VAL_PREFIX, chosen_on_test, condition_label, on_test_data, selection_metric, trial_key

MAX_SPEC_BYTES = 1 << 20  # a spec's text (the shipped ones are under 5 KB)
MAX_YAML_NODES = 100_000  # YAML values of a spec (or a --set value), each alias counted as often as it is used
MAX_YAML_DEPTH = 32  # nested mappings and lists
MAX_TRIALS = 10_000  # per spec: plans in about a second and 40 MB (Tune at 100,000 trials is impractical)
MAX_NAME_LEN = 100  # sweep, stage and named-condition names: MLflow run names, tag keys, folder names
MAX_EXPERIMENT_LEN = 256  # MLflow's SQL stores keep experiment names of up to 256 characters

# Sweep names end up in MLflow tag keys (`fasweep.lease.<sweep>`: letters, digits, _ - . space : /) and paths.
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_\-]*")
_CONDITION = re.compile(r"[A-Za-z0-9][A-Za-z0-9_+\-.=,]*")
_METRIC = re.compile(r"(?P<metric>[A-Za-z0-9_/.\-]+?)(?:@(?P<epoch>[1-9]\d*))?")
_SAFE_TAGS = {
    f"tag:yaml.org,2002:{t}" for t in ("str", "int", "float", "bool", "null", "timestamp", "seq", "map", "merge")
}
_NAME_HELP = f"a name of 1 to {MAX_NAME_LEN} letters, digits, '_' and '-' (no spaces, dots or slashes)"
_CONDITION_HELP = f"a name of 1 to {MAX_NAME_LEN} letters, digits and _ + - . = , (no spaces or slashes)"


# --- the spec model -----------------------------------------------------------------------------------------


class Resources(Strict):
    """Ray resources of one trial: CPUs and a (fractional) GPU share."""

    cpu: float = Field(default=1.0, gt=0)
    gpu: float = Field(default=0.0, ge=0)

    @field_validator("gpu")
    @classmethod
    def _whole_above_one(cls, v: float) -> float:
        if v > 1 and v != int(v):
            raise ValueError("a fraction <= 1 or a whole number of GPUs")
        return v


class Distribution(Strict):
    """One random axis: exactly one of uniform/loguniform [low, high], randint [low, high) or choice [values]."""

    uniform: tuple[float, float] | None = None
    loguniform: tuple[float, float] | None = None
    randint: tuple[int, int] | None = None
    choice: list[Any] | None = Field(default=None, min_length=1)

    @model_validator(mode="after")
    def _one_kind(self) -> Self:
        set_kinds = [k for k in ("uniform", "loguniform", "randint", "choice") if getattr(self, k) is not None]
        if len(set_kinds) != 1:
            raise ValueError("exactly one of uniform, loguniform, randint, choice")
        bounds = getattr(self, set_kinds[0])
        if set_kinds[0] != "choice" and not bounds[0] < bounds[1]:
            raise ValueError(f"{set_kinds[0]} [low, high] with low < high")
        if self.loguniform is not None and self.loguniform[0] <= 0:
            raise ValueError("loguniform bounds > 0")
        return self

    def draw(self, rng: random.Random) -> Any:
        """One value drawn with `rng`."""
        if self.uniform is not None:
            return rng.uniform(*self.uniform)
        if self.loguniform is not None:
            low, high = self.loguniform
            return math.exp(rng.uniform(math.log(low), math.log(high)))
        if self.randint is not None:
            return rng.randrange(*self.randint)
        assert self.choice is not None
        return rng.choice(self.choice)


class Asha(Strict):
    """Ray Tune's asynchronous successive halving: stop weak trials early, judged on `metric` per epoch."""

    metric: str = "test_acc"
    mode: Literal["max", "min"] = "max"
    grace_period: int = Field(default=1, ge=1)
    reduction_factor: float = Field(default=3.0, gt=1)
    max_t: int | None = Field(default=None, ge=1, description="None: the trials' train.epochs")


class Scheduler(Strict):
    """Trial scheduler; only ASHA for now."""

    asha: Asha


class StageInit(Strict):
    """Start a stage's trials from layers of an earlier stage's best (or last) run of one condition."""

    stage: str
    condition: str
    layers: list[int | str] = Field(default_factory=lambda: [0], description="layer-string token indices or names")
    freeze: bool = True
    select: Literal["best", "last"] = Field(
        default="best", description="best: the seed run with the best final `metric`; last: the last run to finish"
    )
    metric: str = Field(
        default="test_acc",
        description="unset: val_acc where the source holds out a validation split; a test metric there is refused",
    )
    mode: Literal["max", "min"] = "max"

    def symbol(self) -> str:
        """The placeholder put in `model.init_from.checkpoint` until the launcher resolves it."""
        return f"stage:{self.stage}/{self.condition}"


class Axes(Strict):
    """What varies: named conditions × grid × random samples (each may be absent)."""

    conditions: dict[str, dict[str, Any]] = Field(default_factory=dict, description="name -> {dotted path: value}")
    grid: dict[str, list[Any]] = Field(default_factory=dict, description="dotted path -> values (cross product)")
    sample: dict[str, Distribution] = Field(default_factory=dict, description="dotted path -> distribution")
    num_samples: int = Field(default=1, ge=1, description="random draws of the `sample` axes")


class Stage(Axes):
    """One stage of a multi-stage sweep; stages run in order."""

    name: str
    description: str = ""
    overrides: dict[str, Any] = Field(default_factory=dict, description="dotted path -> value for the whole stage")
    seeds: list[Seed] | None = Field(default=None, min_length=1, description="None: the spec's seeds")
    resources: Resources | None = Field(default=None, description="None: the spec's resources")
    init_from: StageInit | None = None
    compare_to: str | None = Field(default=None, description="the report's baseline in this stage; None: the spec's")
    compare: dict[str, Any] | None = Field(default=None, description="{axis path: value}; None: the spec's")
    contrasts: list[tuple[str, str]] = Field(default_factory=list, description="[X, Y] pairs compared (X − Y)")
    pairing: Pairing | None = Field(default=None, description="None: the spec's pairing")
    pack: int | None = Field(default=None, ge=1, description="None: the spec's pack")


class SweepSpec(Axes):
    """A sweep: a base trial config, the axes to vary, seeds, resources and published reference numbers."""

    name: str
    experiment: str = Field(description="MLflow experiment; defaults to `name`")
    description: str = ""
    base: TrialConfig = Field(default_factory=TrialConfig)
    seeds: list[Seed] = Field(default_factory=lambda: [0], min_length=1)
    sample_seed: int = Field(default=0, description="seed of the RNG drawing the `sample` axes")
    resources: Resources = Field(default_factory=Resources)
    max_concurrent: int | None = Field(default=None, ge=1, description="None: as many trials as resources allow")
    max_retries: int = Field(default=2, ge=0, description="retries of a failed trial, resuming its checkpoint")
    pack: int = Field(default=1, ge=1, description="trials per pack: compatible trials trained as one fused model")
    checkpoint: CheckpointPolicy = Field(default_factory=CheckpointPolicy)
    scheduler: Scheduler | None = None
    storage: str = Field(default="./fasweep-runs", description="Ray Tune storage path or URI (s3://...)")
    code: list[str] = Field(
        default_factory=list,
        description="the user's package folders (relative to the spec's folder): imported here, shipped to the "
        "Ray workers (runtime_env py_modules)",
    )
    stages: list[Stage] = Field(default_factory=list)
    reference: dict[str, dict[str, float]] = Field(
        default_factory=dict, description="condition (or stage/condition) -> {metric or metric@epoch: value}"
    )
    compare_to: str | None = Field(default=None, description="condition (or stage/condition) the report compares with")
    compare: dict[str, Any] | None = Field(
        default=None, description="{axis path: value}: each condition against its twin with that value, all else equal"
    )
    contrasts: list[tuple[str, str]] = Field(default_factory=list, description="[X, Y] pairs compared (X − Y)")
    pairing: Pairing = Field(default="none", description="seed: compare conditions seed by seed")
    equivalence_margin: float | None = Field(
        default=None, gt=0, description="TOST margin: |X − Y| < margin, in the metric's units; None: no TOST"
    )
    _source: _Source | None = PrivateAttr(default=None)

    @model_validator(mode="before")
    @classmethod
    def _experiment_defaults_to_name(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("experiment") is None and isinstance(data.get("name"), str):
            return {**data, "experiment": data["name"]}
        return data

    @property
    def axes(self) -> list[str]:
        """The dotted paths that vary across the sweep's trials, in spec order."""
        seen: dict[str, None] = {}
        for stage, _ in _stages(self):
            for overrides in stage.conditions.values():
                seen.update(dict.fromkeys(overrides))
            seen.update(dict.fromkeys(stage.grid))
            seen.update(dict.fromkeys(stage.sample))
            if len(self.stages) > 1:
                seen.update(dict.fromkeys(stage.overrides))
        return list(seen)

    def reference_for(self, stage: str, condition: str) -> dict[str, float]:
        """Published numbers of a condition: `reference['<stage>/<condition>']`, else `reference['<condition>']`."""
        return self.reference.get(f"{stage}/{condition}", self.reference.get(condition, {}))


@dataclass(frozen=True)
class Contrast:
    """A comparison the spec declares before any data (`compare_to`, `compare` or `contrasts`): condition X against
    baseline Y (X − Y), both as reports label them (`stage/condition`, the condition alone in stage main)."""

    condition: str
    baseline: str
    pairing: str
    declared_by: str


@dataclass(frozen=True)
class PlannedTrial:
    """One trial of the plan. `key` (`<stage>/<condition>/s<seed>`) is unique and stable across runs."""

    key: str
    stage: str
    condition: str
    seed: int
    overrides: dict[str, Any]
    config: dict[str, Any]
    resources: dict[str, float]
    init_from: dict[str, Any] | None = field(default=None)


# --- reading YAML and --set ---------------------------------------------------------------------------------


@dataclass
class _Source:
    """Where a spec came from, to point errors at a YAML line or a --set flag."""

    name: str
    root: yaml.Node | None = None
    sets: dict[Loc, str] = field(default_factory=dict)

    def where(self, loc: Loc) -> str:
        """`file:line: path` of the field at `loc` (line of its deepest YAML node), or `--set PATH[: path]`."""
        path = format_loc(loc) or "<top>"
        for set_loc, flag in self.sets.items():
            if loc[: len(set_loc)] == set_loc:
                return f"--set {flag}" + ("" if path in (format_loc(set_loc), flag) else f": {path}")
        line = _line_of(self.root, loc)
        return f"{self.name}:{line}: {path}" if line else f"{self.name}: {path}"

    def fail(self, loc: Loc, message: str) -> UserError:
        """A UserError `where: path: message` for the field at `loc`."""
        return UserError(f"{self.where(loc)}: {message}")

    def bad(self, loc: Loc, value: Any, expected: str) -> UserError:
        """The standard `where: path: got VALUE; expected EXPECTED` error."""
        return UserError(f"{self.where(loc)}: got {brief(value)}; expected {expected}")


def _line_of(root: yaml.Node | None, loc: Loc) -> int | None:
    """1-based line of the node at `loc` (a mapping entry's key line), or of its deepest existing ancestor."""
    node, line = root, (root.start_mark.line + 1 if root is not None else None)
    for part in loc:
        if isinstance(node, yaml.MappingNode):
            entry = next(((k, v) for k, v in node.value if getattr(k, "value", None) == str(part)), None)
            if entry is None:
                break
            line, node = entry[0].start_mark.line + 1, entry[1]
        elif isinstance(node, yaml.SequenceNode) and isinstance(part, int) and 0 <= part < len(node.value):
            node = node.value[part]
            line = node.start_mark.line + 1
        else:
            break
    return line


def _check_nodes(root: yaml.Node, name: str) -> None:
    """Refuse what plain, bounded YAML has not, naming path and line: tags beyond it (e.g. !!python/object),
    duplicate keys, recursive aliases, more than MAX_YAML_DEPTH levels or MAX_YAML_NODES values.

    Each node is checked once and its size with aliases expanded memoised, so aliases cost nothing to walk: a
    "billion laughs" is refused at the first value that expands past the cap, in milliseconds.
    """
    sizes: dict[int, int] = {}

    def error(node: yaml.Node, loc: Loc, message: str) -> UserError:
        return UserError(f"{name}:{node.start_mark.line + 1}: {format_loc(loc) or '<top>'}: {message}")

    def visit(node: yaml.Node, loc: Loc, above: tuple[int, ...]) -> int:
        if id(node) in sizes:
            return sizes[id(node)]
        if id(node) in above:
            raise error(node, loc, "recursive YAML alias; expected a value that does not contain itself")
        if len(above) >= MAX_YAML_DEPTH:
            raise error(node, loc, f"nested over {MAX_YAML_DEPTH} levels deep; expected at most {MAX_YAML_DEPTH}")
        if node.tag not in _SAFE_TAGS:
            tag = node.tag.replace("tag:yaml.org,2002:", "!!")
            raise error(
                node, loc, f"YAML tag {tag} is not allowed; expected plain YAML values (specs are read with safe_load)"
            )
        inner, size = (*above, id(node)), 1
        if isinstance(node, yaml.MappingNode):
            seen: set[str] = set()
            for key, value in node.value:
                size += visit(key, loc, inner)
                key_name = str(key.value)
                if key_name in seen:
                    raise error(key, (*loc, key_name), "duplicate key; expected each key once per mapping")
                seen.add(key_name)
                size += visit(value, (*loc, key_name), inner)
        elif isinstance(node, yaml.SequenceNode):
            for i, item in enumerate(node.value):
                size += visit(item, (*loc, i), inner)
        if size > MAX_YAML_NODES:
            expected = f"at most {MAX_YAML_NODES:,} (MAX_YAML_NODES)"
            raise error(node, loc, f"got {size:,} YAML values once aliases are expanded; expected {expected}")
        sizes[id(node)] = size
        return size

    visit(root, (), ())


def _compose(text: str, name: str) -> tuple[Any, yaml.Node | None]:
    """One YAML document read safely and within the caps: its value and node tree; (None, None) when empty."""
    if len(text) > MAX_SPEC_BYTES:
        raise UserError(f"{name}: got {len(text):,} characters; expected at most {MAX_SPEC_BYTES:,} (MAX_SPEC_BYTES)")
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
        if root is None:
            return None, None
        _check_nodes(root, name)
        return yaml.SafeLoader("").construct_document(root), root
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = f":{mark.line + 1}" if mark else ""
        problem = " ".join(str(exc.problem or exc.context or exc).split())
        raise UserError(f"{name}{line}: YAML syntax error: {problem}; expected one valid YAML document") from None
    except yaml.YAMLError as exc:
        raise UserError(f"{name}: YAML error: {' '.join(str(exc).split())}") from None
    except RecursionError:  # the composer recurses per level: far past MAX_YAML_DEPTH
        raise UserError(f"{name}: YAML nested too deeply to read; expected at most {MAX_YAML_DEPTH} levels") from None
    except ValueError as exc:  # a value the constructor cannot build: 2024-13-45, an integer of 5,000 digits
        problem = " ".join(str(exc).split())[:200]
        raise UserError(f"{name}: unreadable YAML value ({problem}); expected plain YAML values") from None


def _read_yaml(text: str, source: _Source) -> dict[str, Any]:
    """Safe-load one YAML mapping, keeping its node tree in `source` for line numbers."""
    data, root = _compose(text, source.name)
    if root is None:
        raise UserError(f"{source.name}: empty spec; expected a mapping with name, base and axes")
    source.root = root
    if not isinstance(data, dict):
        raise UserError(
            f"{source.name}:{root.start_mark.line + 1}: <top>: got a {type(data).__name__}; "
            "expected a mapping (name: ..., base: ..., grid: ...)"
        )
    return data


def read_value(text: str, name: str) -> Any:
    """One YAML value (a `--set` value), read with a spec's safety and caps; '' for empty text."""
    return _compose(text, name)[0] if text.strip() else ""


def _axes_loc(parts: list[str], level: Any) -> Loc:
    """Spec loc of a --set path inside a spec or stage level, keeping dotted trial paths and names whole."""
    head, rest = parts[0], parts[1:]
    if head in ("grid", "sample", "overrides") and rest:
        return (head, ".".join(rest))
    if head == "conditions" and len(rest) > 1:
        names = level.get("conditions") if isinstance(level, dict) else None
        names = names if isinstance(names, dict) else {}
        cut = next((n for n in range(len(rest) - 1, 0, -1) if ".".join(rest[:n]) in names), 1)
        return (head, ".".join(rest[:cut]), ".".join(rest[cut:]))
    if head == "reference" and len(rest) > 1:
        return (head, ".".join(rest[:-1]), rest[-1])
    return tuple(parts)


def _set_loc(path: str, data: dict[str, Any]) -> Loc:
    """`stages[1].grid.train.lr` or `stages.1.grid.train.lr` -> ('stages', 1, 'grid', 'train.lr').

    A trial setting outside `base` (`train.epochs`) or outside a stage's `overrides` is refused, naming the path
    meant."""
    parts = re.sub(r"\[(\d+)\]", r".\1", path).split(".")
    if not all(parts):
        raise UserError.field(f"--set {path}", path, "a dotted field path such as base.train.epochs")
    head: Loc = ()
    level: Any = data
    fields = SweepSpec.model_fields
    fix = f"a spec path: trial settings go under base (did you mean base.{path}?)"
    if parts[0] == "stages" and len(parts) > 1:
        if not parts[1].isdigit():
            raise UserError.field(f"--set {path}", parts[1], "a stage index, e.g. stages[1].seeds")
        stages, index = data.get("stages"), int(parts[1])
        level = stages[index] if isinstance(stages, list) and index < len(stages) else None
        head, parts, fields = ("stages", index), parts[2:], Stage.model_fields
        meant = f"stages[{index}].overrides.{'.'.join(parts)}"
        fix = f"a stage path: a stage's trial settings go under its overrides (did you mean {meant}?)"
    if parts and parts[0] not in fields and parts[0] in TrialConfig.model_fields:
        raise UserError.field(f"--set {path}", path, fix)
    return (*head, *(_axes_loc(parts, level) if parts else ()))


def _apply_set(data: dict[str, Any], loc: Loc, value: Any, flag: str) -> Loc:
    """Set `value` at `loc` in the raw spec dict, creating mappings on the way and copying the ones it changes
    (a YAML alias shares them with other places). Returns the part of `loc` the flag introduced: up to its
    first new key (errors there blame the flag, not the file), else all of `loc`."""
    node: Any = data
    introduced = loc
    for i, part in enumerate(loc):
        if isinstance(part, int):
            if not isinstance(node, list) or not 0 <= part < len(node):
                size = len(node) if isinstance(node, list) else 0
                raise UserError.field(f"--set {flag}", part, f"an index below {size} of {format_loc(loc[:i])}")
        elif not isinstance(node, dict):
            raise UserError.field(f"--set {flag}", node, f"{format_loc(loc[:i])} to be a mapping")
        elif part not in node and introduced == loc:
            introduced = loc[: i + 1]
        if i == len(loc) - 1:
            node[part] = value
        else:
            child = node[part] if isinstance(part, int) else node.get(part)
            node[part] = {} if child is None else copy.copy(child)
            node = node[part]
    return introduced


# --- checks and expansion ------------------------------------------------------------------------------------


def _check_path(path: str, source: _Source, loc: Loc) -> None:
    """A grid/condition/sample key must be a dotted path into TrialConfig (seeds have their own field)."""
    model: type[BaseModel] | None = TrialConfig
    parts = path.split(".")
    for i, part in enumerate(parts):
        if model is None:
            raise source.fail(loc, f"{'.'.join(parts[:i])} is a value, not a section; expected a TrialConfig path")
        fields = model.model_fields
        if part not in fields:
            raise source.fail(loc, unknown_field(part, list(fields), ".".join(parts[: i + 1])))
        annotation = fields[part].annotation
        model = submodel(annotation)
        if model is None and any(get_origin(a) is dict for a in get_args(annotation)):
            break  # a mapping-valued field such as train.l2: its keys are checked with the trial config
        extra = model is not None and model.model_config.get("extra") == "allow"
        if extra and i + 1 < len(parts) and parts[i + 1] not in model.model_fields:  # type: ignore[union-attr]
            break  # a rule's own option (`feedback.mirror_lr`): checked with the trial config
    if path == "train.seed":
        raise source.fail(loc, "the seed is not an axis; expected the spec's `seeds: [...]` list")


def _stages(spec: SweepSpec) -> list[tuple[Stage, Loc]]:
    """The spec's stages with their locs; a spec without stages is one stage 'main' made of its own axes."""
    if spec.stages:
        return [(stage, ("stages", i)) for i, stage in enumerate(spec.stages)]
    main = Stage(
        name="main",
        conditions=spec.conditions,
        grid=spec.grid,
        sample=spec.sample,
        num_samples=spec.num_samples,
    )
    return [(main, ())]


def format_value(value: Any, digits: int | None = None) -> str:
    """A short, path-safe rendering of an axis value for condition names."""
    if isinstance(value, bool) or value is None:
        text = json.dumps(value)
    elif isinstance(value, float) and digits:
        text = f"{value:.{digits}g}"
        text += "" if any(c in text for c in ".en") else ".0"
    elif isinstance(value, (str, int, float)):
        text = str(value)
    else:
        text = json.dumps(value, separators=(",", ":"))
    return text.replace("/", "_").replace(" ", "_")


def _short_names(paths: list[str]) -> dict[str, str]:
    """Shortest unique dotted suffix of each path: feedback.concordance -> concordance."""
    out = {}
    for path in paths:
        parts = path.split(".")
        for n in range(1, len(parts) + 1):
            tail = ".".join(parts[-n:])
            if sum(p == tail or p.endswith("." + tail) for p in paths) == 1:
                out[path] = tail
                break
    return out


@dataclass(frozen=True)
class _Cell:
    """One condition of a stage before seeds: its name and where each override came from."""

    name: str
    overrides: dict[str, Any]
    origins: dict[str, Loc]
    named: str = ""  # the named condition it belongs to ('' without `conditions`)
    rest: str = ""  # the rest of its name: grid values, sample=k and drawn values (`loss=hinge`)


def _cells(spec: SweepSpec, stage: Stage, sloc: Loc) -> list[_Cell]:
    """Named conditions × grid × samples of one stage, named readably and deterministically.

    Names are unique: condition names are mapping keys, rendered grid values are checked distinct, and
    draws are told apart by `sample=k`.
    """
    short = _short_names([*stage.grid, *stage.sample])
    named = [(name, ovr, (*sloc, "conditions", name)) for name, ovr in stage.conditions.items()] or [("", {}, sloc)]
    combos = list(itertools.product(*(list(enumerate(values)) for values in stage.grid.values())))
    fixed = {path: (*sloc, "overrides", path) for path in stage.overrides}
    cells = []
    for (cname, covr, cloc), combo, k in itertools.product(named, combos, range(stage.num_samples)):
        parts = [cname] if cname else []
        overrides = dict(stage.overrides)
        origins = dict(fixed)
        overrides.update(covr)
        origins.update({p: (*cloc, p) for p in covr})
        for path, (i, value) in zip(stage.grid, combo, strict=True):
            overrides[path], origins[path] = value, (*sloc, "grid", path, i)
            parts.append(f"{short[path]}={format_value(value)}")
        if stage.num_samples > 1:
            parts.append(f"sample={k}")
        for path, dist in stage.sample.items():
            value = dist.draw(random.Random(f"{spec.sample_seed}:{stage.name}:{k}:{path}"))
            overrides[path], origins[path] = value, (*sloc, "sample", path)
            parts.append(f"{short[path]}={format_value(value, digits=4)}")
        rest = ",".join(parts[1:] if cname else parts)
        cells.append(_Cell(",".join(parts) or "base", overrides, origins, cname, rest))
    return cells


def _validate_cell(spec: SweepSpec, stage: Stage, cell: _Cell, source: _Source) -> dict[str, Any]:
    """Apply a cell's overrides (and a stage's init_from) to the base and validate it as a TrialConfig."""
    config = spec.base.model_dump(mode="json")
    for path, value in cell.overrides.items():
        config = set_path(config, path, value)
    if stage.init_from is not None:
        if "model.init_from" in cell.overrides:
            raise source.fail(cell.origins["model.init_from"], "set by the stage's init_from too; expected one")
        init = {"checkpoint": stage.init_from.symbol(), "layers": stage.init_from.layers}
        config = set_path(config, "model.init_from", {**init, "freeze": stage.init_from.freeze})
    try:
        trial = TrialConfig.model_validate(config)
    except ValidationError as exc:
        loc, message = explain(exc, config, TrialConfig)
        dotted = ".".join(map(str, loc))
        origin = next((o for p, o in cell.origins.items() if dotted == p or dotted.startswith(p + ".")), None)
        if origin is None:  # not from an override: the base itself
            raise source.fail(("base", *loc), message) from None
        raise source.fail(origin, message if dotted in cell.origins else f"{format_loc(loc)}: {message}") from None
    _check_arch(trial, cell, source)
    return trial.model_dump(mode="json")


def _check_arch(trial: TrialConfig, cell: _Cell, source: _Source) -> None:
    """model.arch must be a preset, a valid layer string or a user's model that loads; FixConv layers need
    model.init_from."""
    from fasweep.models import layers_of

    loc = cell.origins.get("model.arch", ("base", "model", "arch"))
    try:
        layers = layers_of(trial.model.arch) or []
    except UserError as exc:
        detail = str(exc).removeprefix("model.arch").lstrip(": ")
        raise source.fail(loc, detail) from None
    if any(layer.kind == "fixconv" for layer in layers) and trial.model.init_from is None:
        raise source.bad(loc, trial.model.arch, "model.init_from (or a stage init_from) for its FixConv layer")


def _check_effect(
    spec: SweepSpec, cells: dict[str, list[_Cell]], configs: dict[str, dict[str, dict[str, Any]]], source: _Source
) -> None:
    """Every feedback setting is read by the rule of some layer it reaches, and every axis changes what trains.

    Refused, naming the field and what would make it count: an override of `feedback.X` (a condition, grid, sample
    or stage override) in a condition none of whose layers runs a rule that reads X (marks applied: `Dense10(R)`
    runs random whatever `feedback.mode` says); a `feedback.X` set in `base` to other than its default that no trial
    of the spec reads; two conditions of a stage whose configs differ only in what no layer reads (the same layers,
    rules and options: e.g. `model.arch` DSR1 and its own layer string)."""
    from fasweep.models import feedback_fields, feedback_read, layer_rules, rules_text, unread, what_reads

    read_anywhere: set[str] = set()
    for stage, sloc in _stages(spec):
        seen: dict[str, _Cell] = {}
        for cell in cells[stage.name]:
            config = configs[stage.name][cell.name]
            rules = layer_rules(config["model"]["arch"], config["feedback"], config["model"].get("rules"))
            read = feedback_read(rules)
            read_anywhere |= read
            for path, value in cell.overrides.items():
                fields = [f for f in feedback_fields(path, value) if f not in read]
                if fields:
                    origin = cell.origins[path]
                    shown = stage.grid[path] if origin[len(sloc) : len(sloc) + 1] == ("grid",) else value
                    loc = origin[:-1] if isinstance(origin[-1], int) else origin  # a grid axis, not one value
                    raise source.bad(loc, shown, unread(fields[0], rules, f" of condition {cell.name}"))
            model = {**config["model"], "arch": _layer_shapes(config["model"]["arch"])}
            effective = {**config, "model": model, "feedback": [vars(r) for r in rules]}  # what trains
            key = json.dumps(effective, sort_keys=True, default=str)
            twin = seen.setdefault(key, cell)
            if twin is not cell and configs[stage.name][twin.name] != config:
                paths = [
                    p for p in {**twin.overrides, **cell.overrides} if twin.overrides.get(p) != cell.overrides.get(p)
                ]
                blamed = cell if paths[0] in cell.overrides else twin
                raise source.bad(
                    blamed.origins[paths[0]],
                    blamed.overrides[paths[0]],
                    f"a value that changes what trains: conditions {twin.name} and {cell.name} train the same "
                    f"layers and rules ({rules_text(rules)}) and differ only in {', '.join(paths)}",
                )
    for name in sorted(spec.base.feedback.model_fields_set - read_anywhere):
        value = getattr(spec.base.feedback, name)
        if value == type(spec.base.feedback).model_fields[name].default:  # a default written out (a dumped spec)
            continue
        raise source.bad(
            ("base", "feedback", name),
            value,
            f"a setting some trial reads: no layer of any condition runs a rule that reads feedback.{name} (to make "
            f"it count: {what_reads(name)})",
        )


@functools.lru_cache(maxsize=256)
def _layer_shapes(arch: str) -> str:
    """The layer string of `arch` without its marks: the network's shape (its rules are compared separately)."""
    from fasweep.models import format_layers, is_user_model, parse_layers, resolve_arch

    if is_user_model(arch):  # its layers are not known without building it
        return arch
    return format_layers([dataclasses.replace(spec, feedback=None) for spec in parse_layers(resolve_arch(arch))])


def _check_spec(spec: SweepSpec, source: _Source) -> dict[str, list[_Cell]]:
    """Checks beyond field types (names, plan size, axes, stage references, reference keys, --set values that no
    trial uses); returns each stage's cells."""
    if spec.stages:
        for key in ("conditions", "grid", "sample"):
            if getattr(spec, key):
                raise source.fail((key,), "not allowed beside `stages`; expected it inside each stage")
        if spec.num_samples != 1:
            raise source.fail(("num_samples",), "not allowed beside `stages`; expected it inside each stage")
    if not _is_name(_NAME, spec.name):
        raise source.bad(("name",), spec.name, _NAME_HELP)
    experiment = spec.experiment
    if not (experiment.strip() and experiment.isprintable() and len(experiment) <= MAX_EXPERIMENT_LEN):
        raise source.bad(
            ("experiment",), experiment, f"an MLflow experiment name of 1 to {MAX_EXPERIMENT_LEN} printable characters"
        )
    names: set[str] = set()
    for i, stage in enumerate(spec.stages):
        if not _is_name(_NAME, stage.name):
            raise source.bad(("stages", i, "name"), stage.name, _NAME_HELP)
        if stage.name in names:
            raise source.bad(("stages", i, "name"), stage.name, "a stage name not used before")
        names.add(stage.name)
    if len(set(spec.seeds)) != len(spec.seeds):
        raise source.bad(("seeds",), spec.seeds, "distinct seeds")
    _check_size(spec, source)
    cells: dict[str, list[_Cell]] = {}
    for stage, sloc in _stages(spec):
        _check_axes(stage, sloc, source)
        if spec.scheduler is not None and (stage.pack or spec.pack) > 1:
            loc = (*sloc, "pack") if stage.pack is not None else ("pack",)
            raise source.bad(loc, stage.pack or spec.pack, "1 with scheduler.asha (ASHA would stop a whole pack)")
        if stage.seeds is not None and len(set(stage.seeds)) != len(stage.seeds):
            raise source.bad((*sloc, "seeds"), stage.seeds, "distinct seeds")
        if stage.init_from is not None:
            _check_init(stage, sloc, cells, source)
        cells[stage.name] = _cells(spec, stage, sloc)
    _check_reference(spec, cells, source)
    _check_compare_to(spec, cells, source)
    _check_base_sets(spec, cells, source)
    return cells


def _is_name(pattern: re.Pattern[str], name: str) -> bool:
    return len(name) <= MAX_NAME_LEN and pattern.fullmatch(name) is not None


def _check_size(spec: SweepSpec, source: _Source) -> None:
    """At most MAX_TRIALS trials, counted (conditions × grid × samples × seeds per stage) before any is made."""
    total = 0
    for stage, sloc in _stages(spec):
        factors = {
            "condition": (len(stage.conditions) or 1, (*sloc, "conditions")),
            "grid cell": (math.prod(len(values) for values in stage.grid.values()), (*sloc, "grid")),
            "sample": (stage.num_samples, (*sloc, "num_samples")),
            "seed": (len(stage.seeds or spec.seeds), (*sloc, "seeds") if stage.seeds else ("seeds",)),
        }
        count = math.prod(n for n, _ in factors.values())
        total += count
        if total > MAX_TRIALS:
            loc = max(factors.values(), key=lambda f: f[0])[1]  # blame the biggest factor
            product = " × ".join(f"{n:,} {what}{'s' * (n != 1)}" for what, (n, _) in factors.items())
            where = f"stage {stage.name}: " if spec.stages else ""
            raise source.fail(
                loc,
                f"got {total:,} trials ({where}{product}); expected at most {MAX_TRIALS:,} per spec (MAX_TRIALS): "
                "fewer values or several specs",
            )


def _check_base_sets(spec: SweepSpec, cells: dict[str, list[_Cell]], source: _Source) -> None:
    """A `--set base.PATH` that every condition of every stage overrides changes no trial: refused, naming them."""
    for flag in source.sets.values():
        loc = _set_loc(flag, {})
        if len(loc) < 2 or loc[0] != "base":
            continue
        path = ".".join(map(str, loc[1:]))
        setters = _setters(spec, cells, path)
        if setters:
            value: Any = spec.base.model_dump(mode="json")
            for part in path.split("."):
                value = value.get(part) if isinstance(value, dict) else None
            listed = ", ".join(list(setters)[:4]) + (f" and {len(setters) - 4} more" if len(setters) > 4 else "")
            paths = ", ".join(sorted(set(setters.values())))
            expected = f"a base value some trial uses, but every condition sets {paths} ({listed})"
            raise UserError.field(f"--set {flag}", value, expected)


def _setters(spec: SweepSpec, cells: dict[str, list[_Cell]], path: str) -> dict[str, str] | None:
    """Each condition -> its override that replaces the base's trial `path`; None when a condition keeps the base's."""
    setters = {}
    for stage, _ in _stages(spec):
        fixed = ["model.init_from"] * (stage.init_from is not None)
        for cell in cells[stage.name]:
            over = next((p for p in [*cell.overrides, *fixed] if path == p or path.startswith(p + ".")), None)
            if over is None:
                return None
            setters[f"{stage.name}/{cell.name}" if spec.stages else cell.name] = over
    return setters


def _check_axes(stage: Stage, sloc: Loc, source: _Source) -> None:
    """Axis keys are TrialConfig paths, varied in one place only; grid lists are non-empty and distinct."""
    for path in stage.overrides:
        _check_path(path, source, (*sloc, "overrides", path))
    for name, overrides in stage.conditions.items():
        if not _is_name(_CONDITION, name):
            raise source.bad((*sloc, "conditions", name), name, _CONDITION_HELP)
        for path in overrides:
            _check_path(path, source, (*sloc, "conditions", name, path))
    for path, values in stage.grid.items():
        loc = (*sloc, "grid", path)
        _check_path(path, source, loc)
        if not values:
            raise source.bad(loc, values, "a non-empty list of values")
        rendered: set[str] = set()
        for i, value in enumerate(values):
            text = format_value(value)
            if text in rendered:
                raise source.bad((*loc, i), value, "distinct values in a grid axis")
            rendered.add(text)
    for path in stage.sample:
        _check_path(path, source, (*sloc, "sample", path))
    if stage.num_samples > 1 and not stage.sample:
        raise source.bad((*sloc, "num_samples"), stage.num_samples, "1 without `sample` axes (use seeds to repeat)")
    named = {p for overrides in stage.conditions.values() for p in overrides}
    for kind, paths in (("grid", stage.grid), ("sample", stage.sample)):
        for path in paths:
            other = "conditions" if path in named else "grid" if kind == "sample" and path in stage.grid else None
            if other:
                raise source.fail((*sloc, kind, path), f"also varied in `{other}`; expected each path in one place")


def _check_init(stage: Stage, sloc: Loc, earlier: dict[str, list[_Cell]], source: _Source) -> None:
    """A stage's init_from names an earlier stage and one of its conditions."""
    init = stage.init_from
    assert init is not None
    if init.stage not in earlier:
        expected = f"an earlier stage: one of {', '.join(earlier)}" if earlier else "an earlier stage (none precede it)"
        raise source.bad((*sloc, "init_from", "stage"), init.stage, expected)
    names = [cell.name for cell in earlier[init.stage]]
    if init.condition not in names:
        listed = ", ".join(names[:12]) + (" ..." if len(names) > 12 else "")
        hint = suggest(init.condition, names)
        raise source.bad(
            (*sloc, "init_from", "condition"), init.condition, f"a condition of {init.stage}{hint}: {listed}"
        )


def _check_selection(stage: Stage, sloc: Loc, earlier: list[PlannedTrial], source: _Source) -> None:
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


def _check_reference(spec: SweepSpec, cells: dict[str, list[_Cell]], source: _Source) -> None:
    """Reference keys name planned conditions (`cond` or `stage/cond`); metrics are `name` or `name@epoch`."""
    known = {c.name for stage_cells in cells.values() for c in stage_cells}
    known |= {f"{stage}/{c.name}" for stage, stage_cells in cells.items() for c in stage_cells}
    for key, metrics in spec.reference.items():
        if key not in known:
            hint = suggest(key, sorted(known))
            raise source.bad(("reference", key), key, f"a planned condition name{hint}; see `fasweep plan`")
        for metric in metrics:
            if not _METRIC.fullmatch(metric):
                raise source.bad(("reference", key, metric), metric, "a metric name, optionally @epoch: test_acc@200")


def _check_compare_to(spec: SweepSpec, cells: dict[str, list[_Cell]], source: _Source) -> None:
    """`compare_to` (the spec's or a stage's) names a planned condition: `cond` or `stage/cond`."""
    known = {c.name for stage_cells in cells.values() for c in stage_cells}
    known |= {f"{stage}/{c.name}" for stage, stage_cells in cells.items() for c in stage_cells}
    named = [(("compare_to",), spec.compare_to)]
    named += [(("stages", i, "compare_to"), stage.compare_to) for i, stage in enumerate(spec.stages)]
    for loc, name in named:
        if name is not None and name not in known:
            raise source.bad(loc, name, f"a planned condition name{suggest(name, sorted(known))}; see `fasweep plan`")


def _listed(names: list[str], most: int = 12) -> str:
    return ", ".join(names[:most]) + (f" and {len(names) - most} more" if len(names) > most else "")


def _resolve(name: str, stage: str, configs: dict[str, dict[str, Any]]) -> str | None:
    """The label (`stage/cond`, or `cond` in stage main) a planned-condition name means, read as reference keys and
    `compare_to` are: `stage/cond` exactly; `cond` in `stage` (when given), else in the one stage that has it."""
    if "/" in name:
        at, cond = name.split("/", 1)
        return condition_label(at, cond) if cond in configs.get(at, {}) else None
    if stage and name in configs.get(stage, {}):
        return condition_label(stage, name)
    owners = [at for at, conds in configs.items() if name in conds]
    return condition_label(owners[0], name) if len(owners) == 1 else None


def _twins(
    path: str, value: Any, conds: dict[str, dict[str, Any]], where: str, loc: Loc, source: _Source, strict: bool
) -> list[tuple[str, str]]:
    """`compare: {path: value}` in one stage (`where`: ` in stage NAME`, or ''): (X, Y) for each condition X whose
    config equals Y's except that Y has `path` = value. Not strict (the spec's `compare` seen from one of several
    stages): [] where the stage does not vary `path` or plans no such value."""
    planned = list(dict.fromkeys(format_value(get_path(c, path)) for c in conds.values()))
    if len(planned) < 2:
        if strict:
            raise source.bad(loc, path, f"an axis path varied{where} (a condition or grid key)")
        return []
    if not any(get_path(c, path) == value for c in conds.values()):
        if strict:
            raise source.bad((*loc, path), value, f"a planned value of {path}{where}: {_listed(planned)}")
        return []
    pairs = []
    for x, config in conds.items():
        if get_path(config, path) == value:
            continue
        twin = next((y for y, other in conds.items() if other == set_path(config, path, value)), None)
        if twin is not None:
            pairs.append((x, twin))
    return pairs


def _contrasts(
    spec: SweepSpec,
    configs: dict[str, dict[str, dict[str, Any]]],
    cells: dict[str, list[_Cell]],
    source: _Source,
) -> tuple[Contrast, ...]:
    """The comparisons the spec declares, checked: per stage its `compare` or `compare_to` (a stage's own wins over
    the spec's; one of the two per level), and the `contrasts` pairs (names as reference keys take them; a named
    condition alone stands for each of its grid cells, paired with the other side's cell of the same grid values:
    `_contrast_pairs`). A condition may be X of several comparisons; the same X − Y declared twice is refused."""
    out: dict[tuple[str, str], Contrast] = {}
    origin: dict[tuple[str, str], Loc] = {}

    def add(x: str, y: str, pairing: str, by: str, loc: Loc) -> None:
        if x == y:
            raise source.bad(loc, [x, y], "two different conditions")
        if (x, y) in out:
            where = format_loc(origin[x, y])
            raise source.bad(loc, [x, y], f"each comparison declared once; {where} declares {x} − {y} already")
        out[x, y], origin[x, y] = Contrast(x, y, pairing, by), loc

    for level, lloc in [(spec, ()), *((stage, ("stages", i)) for i, stage in enumerate(spec.stages))]:
        if level.compare is not None and level.compare_to is not None:
            raise source.bad((*lloc, "compare"), level.compare, "compare or compare_to, not both")
        if level.compare is not None and len(level.compare) != 1:
            raise source.bad((*lloc, "compare"), level.compare, "one axis path and its value, e.g. {model.arch: DD0}")
        for path in level.compare or {}:
            _check_path(path, source, (*lloc, "compare", path))
    found = False
    for stage, sloc in _stages(spec):
        pairing = stage.pairing or spec.pairing
        own = bool(spec.stages) and (stage.compare is not None or stage.compare_to is not None)
        level, lloc = (stage, sloc) if own else (spec, ())
        if level.compare is not None:
            [(path, value)] = level.compare.items()
            where = f" in stage {stage.name}" if spec.stages else ""
            strict = own or not spec.stages
            pairs = _twins(path, value, configs[stage.name], where, (*lloc, "compare"), source, strict)
            found |= bool(pairs)
            for x, y in pairs:
                add(
                    condition_label(stage.name, x),
                    condition_label(stage.name, y),
                    pairing,
                    "compare",
                    (*lloc, "compare"),
                )
        elif level.compare_to is not None:
            base = _resolve(level.compare_to, stage.name, configs)
            for x in configs[stage.name]:
                label = condition_label(stage.name, x)
                if base is not None and label != base:
                    add(label, base, pairing, "compare_to", (*lloc, "compare_to"))
    if spec.compare is not None and not found and not any(s.compare is not None for s in spec.stages):
        [(path, value)] = spec.compare.items()
        raise source.bad(("compare",), {path: value}, "an axis path and a planned value it varies over in some stage")
    named = [(("contrasts", i), pair, "", spec.pairing) for i, pair in enumerate(spec.contrasts)]
    for stage, sloc in _stages(spec):
        pairing = stage.pairing or spec.pairing
        named += [((*sloc, "contrasts", i), pair, stage.name, pairing) for i, pair in enumerate(stage.contrasts)]
    for loc, pair, stage_name, pairing in named:
        for x, y in _contrast_pairs(pair, stage_name, configs, cells, loc, source):
            add(x, y, pairing, "contrasts", loc)
    return tuple(out.values())


def _contrast_side(
    name: str, stage: str, configs: dict[str, dict[str, Any]], cells: dict[str, list[_Cell]]
) -> tuple[bool, dict[str, str]] | None:
    """What one side of a contrast names: (True, {its grid part: label}) for a planned condition (`_resolve`), or
    (False, {grid part: label} of each of its cells) for a named condition alone (`cond` or `stage/cond`, in
    `stage` first, else in the one stage that has it); None for neither."""
    label = _resolve(name, stage, configs)
    if label is not None:
        at = next(at for at, conds in configs.items() for c in conds if condition_label(at, c) == label)
        cell = next(c for c in cells[at] if condition_label(at, c.name) == label)
        return True, {cell.rest: label}
    at, _, cond = name.rpartition("/")
    owners = [at] if at else [stage] if any(c.named == cond for c in cells.get(stage, [])) else list(cells)
    owners = [s for s in owners if any(c.named == cond for c in cells.get(s, []))]
    if len(owners) != 1:
        return None
    return False, {c.rest: condition_label(owners[0], c.name) for c in cells[owners[0]] if c.named == cond}


def _contrast_pairs(
    pair: tuple[str, str],
    stage: str,
    configs: dict[str, dict[str, Any]],
    cells: dict[str, list[_Cell]],
    loc: Loc,
    source: _Source,
) -> list[tuple[str, str]]:
    """The (X, Y) labels a declared `[X, Y]` means: two planned conditions, one pair; a named condition alone
    (`DSR2` where the grid makes `DSR2,loss=hinge`, ...) pairs each of its cells with the other side's cell of the
    same grid values, so the grid is held fixed (`DSR2,loss=hinge` − `DSR1,loss=hinge`, ...)."""
    sides = [_contrast_side(name, stage, configs, cells) for name in pair]
    for j, (name, side) in enumerate(zip(pair, sides, strict=True)):
        if side is None:
            known = [condition_label(at, c.named) for at, mine in cells.items() for c in mine if c.named]
            known = list(
                dict.fromkeys(known + [condition_label(at, c) for at, conds in configs.items() for c in conds])
            )
            expected = (
                f"a planned condition name{suggest(name, known)} (stage/condition where two stages have it; a named "
                f"condition alone means each of its grid cells): {_listed(known)}"
            )
            raise source.bad((*loc, j), name, expected)
    (x_exact, xs), (y_exact, ys) = sides  # type: ignore[misc]
    if x_exact and y_exact:
        return [(next(iter(xs.values())), next(iter(ys.values())))]
    pairs = [(xs[rest], ys[rest]) for rest in xs if rest in ys]
    if not pairs:
        expected = f"conditions with grid values in common (X: {_listed(list(xs), 4)}; Y: {_listed(list(ys), 4)})"
        raise source.bad(loc, list(pair), expected)
    return pairs


def _expand(spec: SweepSpec) -> tuple[list[PlannedTrial], tuple[Contrast, ...]]:
    """Every trial of the spec in a stable order (stage, condition (conditions × grid × samples), seed) and the
    comparisons it declares."""
    source = spec._source or _Source(f"<spec {spec.name}>")
    cells = _check_spec(spec, source)
    configs = {
        stage.name: {cell.name: _validate_cell(spec, stage, cell, source) for cell in cells[stage.name]}
        for stage, _ in _stages(spec)
    }
    _check_effect(spec, cells, configs, source)
    trials: list[PlannedTrial] = []
    for stage, sloc in _stages(spec):
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
    return trials, _contrasts(spec, configs, cells, source)


# --- entry points ---------------------------------------------------------------------------------------------


def parse_spec(
    text: str, sets: dict[str, Any] | None = None, *, name: str = "<spec>", folder: Path | None = None
) -> Plan:
    """Validate a spec from YAML text (plus --set overrides) and plan it; errors are one-line UserErrors with
    the YAML line or --set flag. The spec's `code` folders (relative to `folder`) are made importable first."""
    source = _Source(name)
    data = _read_yaml(text, source)
    for path, value in (sets or {}).items():
        source.sets[_apply_set(data, _set_loc(path, data), value, path)] = path
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
    spec._source = source
    trials, contrasts = _expand(spec)  # every trial config validated now, errors pointing at their line
    return Plan(spec, tuple(trials), contrasts)


def load_spec(path: str | Path, sets: dict[str, Any] | None = None) -> Plan:
    """Read, validate and plan a sweep spec file, with `--set` overrides (dotted spec paths -> values) applied first."""
    path = Path(path)
    try:
        with path.open("rb") as fh:
            raw = fh.read(MAX_SPEC_BYTES + 1)  # no more than that: /dev/zero is a "spec" too
        if len(raw) > MAX_SPEC_BYTES:
            raise UserError.field(
                "spec", str(path), f"a YAML file of at most {MAX_SPEC_BYTES:,} bytes (MAX_SPEC_BYTES)"
            )
        text = raw.decode()
    except FileNotFoundError:
        raise UserError.field("spec", str(path), "an existing YAML file, e.g. sweeps/quickstart.yaml") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError.field("spec", str(path), f"a readable UTF-8 YAML file ({exc.__class__.__name__})") from None
    return parse_spec(text, sets, name=str(path), folder=path.parent)


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
        old = _read_yaml(old_spec_yaml, _Source("spec.yaml"))
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
        found = next(s for s, _ in _stages(self.spec) if s.name == stage)
        return found.pack or self.spec.pack

    def packs(self, stage: str, keys: Collection[str] | None = None, slots: int = 1) -> list[list[PlannedTrial]]:
        """The stage's trials (those in `keys`, None: all) grouped by `fasweep.packed.packable` into packs of at
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
        for stage, _ in _stages(self.spec):
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
        for stage, _ in _stages(self.spec):
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
        for stage, _ in _stages(self.spec):
            mine = self.packs(stage.name)
            running = min(len(mine), self.spec.max_concurrent or len(mine))
            peak = max(peak, running * (stage.resources or self.spec.resources).gpu)
        return peak
