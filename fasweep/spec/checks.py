"""A spec's checks beyond field types, and the conditions (cells) each stage makes of its axes.

Names, plan size (at most MAX_TRIALS trials, counted before any is expanded), axis paths, stage references,
reference keys, `--set` values no trial uses, and that every setting changes what trains (`check_effect`). Every
error is one line naming the YAML line or the `--set` flag (`fasweep.spec.reading.Source`).
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import json
import math
import random
import re
from dataclasses import dataclass
from typing import Any, get_args, get_origin

from pydantic import BaseModel, ValidationError

from fasweep.config import Loc, TrialConfig, explain, format_loc, set_path, submodel, unknown_field
from fasweep.errors import UserError, listed, suggest
from fasweep.spec.model import Stage, SweepSpec, stage_locs
from fasweep.spec.reading import Source, set_loc

MAX_TRIALS = 10_000  # per spec: plans in about a second and 40 MB (Tune at 100,000 trials is impractical)
MAX_NAME_LEN = 100  # sweep, stage and named-condition names: MLflow run names, tag keys, folder names
MAX_EXPERIMENT_LEN = 256  # MLflow's SQL stores keep experiment names of up to 256 characters

# Sweep names end up in MLflow tag keys (`fasweep.lease.<sweep>`: letters, digits, _ - . space : /) and paths.
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_\-]*")
_CONDITION = re.compile(r"[A-Za-z0-9][A-Za-z0-9_+\-.=,]*")
_METRIC = re.compile(r"(?P<metric>[A-Za-z0-9_/.\-]+?)(?:@(?P<epoch>[1-9]\d*))?")
_NAME_HELP = f"a name of 1 to {MAX_NAME_LEN} letters, digits, '_' and '-' (no spaces, dots or slashes)"
_CONDITION_HELP = f"a name of 1 to {MAX_NAME_LEN} letters, digits and _ + - . = , (no spaces or slashes)"


def check_path(path: str, source: Source, loc: Loc) -> None:
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
class Cell:
    """One condition of a stage before seeds: its name and where each override came from."""

    name: str
    overrides: dict[str, Any]
    origins: dict[str, Loc]
    named: str = ""  # the named condition it belongs to ('' without `conditions`)
    rest: str = ""  # the rest of its name: grid values, sample=k and drawn values (`loss=hinge`)


def _cells(spec: SweepSpec, stage: Stage, sloc: Loc) -> list[Cell]:
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
        cells.append(Cell(",".join(parts) or "base", overrides, origins, cname, rest))
    return cells


def validate_cell(spec: SweepSpec, stage: Stage, cell: Cell, source: Source) -> dict[str, Any]:
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


def _check_arch(trial: TrialConfig, cell: Cell, source: Source) -> None:
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


def check_effect(
    spec: SweepSpec, cells: dict[str, list[Cell]], configs: dict[str, dict[str, dict[str, Any]]], source: Source
) -> None:
    """Every feedback setting is read by the rule of some layer it reaches, and every axis changes what trains.

    Refused, naming the field and what would make it count: an override of `feedback.X` (a condition, grid, sample
    or stage override) in a condition none of whose layers runs a rule that reads X (marks applied: `Dense10(R)`
    runs random whatever `feedback.mode` says); a `feedback.X` set in `base` to other than its default that no trial
    of the spec reads; two conditions of a stage whose configs differ only in what no layer reads (the same layers,
    rules and options: e.g. `model.arch` DSR1 and its own layer string)."""
    from fasweep.models import feedback_fields, feedback_read, layer_rules, rules_text, unread, what_reads

    read_anywhere: set[str] = set()
    for stage, sloc in stage_locs(spec):
        seen: dict[str, Cell] = {}
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


def check_spec(spec: SweepSpec, source: Source) -> dict[str, list[Cell]]:
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
    cells: dict[str, list[Cell]] = {}
    for stage, sloc in stage_locs(spec):
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


def _check_size(spec: SweepSpec, source: Source) -> None:
    """At most MAX_TRIALS trials, counted (conditions × grid × samples × seeds per stage) before any is made."""
    total = 0
    for stage, sloc in stage_locs(spec):
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


def _check_base_sets(spec: SweepSpec, cells: dict[str, list[Cell]], source: Source) -> None:
    """A `--set base.PATH` that every condition of every stage overrides changes no trial: refused, naming them."""
    for flag in source.sets.values():
        loc = set_loc(flag, {})
        if len(loc) < 2 or loc[0] != "base":
            continue
        path = ".".join(map(str, loc[1:]))
        setters = _setters(spec, cells, path)
        if setters:
            value: Any = spec.base.model_dump(mode="json")
            for part in path.split("."):
                value = value.get(part) if isinstance(value, dict) else None
            paths = ", ".join(sorted(set(setters.values())))
            expected = f"a base value some trial uses, but every condition sets {paths} ({listed(list(setters), 4)})"
            raise UserError.field(f"--set {flag}", value, expected)


def _setters(spec: SweepSpec, cells: dict[str, list[Cell]], path: str) -> dict[str, str] | None:
    """Each condition -> its override that replaces the base's trial `path`; None when a condition keeps the base's."""
    setters = {}
    for stage, _ in stage_locs(spec):
        fixed = ["model.init_from"] * (stage.init_from is not None)
        for cell in cells[stage.name]:
            over = next((p for p in [*cell.overrides, *fixed] if path == p or path.startswith(p + ".")), None)
            if over is None:
                return None
            setters[f"{stage.name}/{cell.name}" if spec.stages else cell.name] = over
    return setters


def _check_axes(stage: Stage, sloc: Loc, source: Source) -> None:
    """Axis keys are TrialConfig paths, varied in one place only; grid lists are non-empty and distinct."""
    for path in stage.overrides:
        check_path(path, source, (*sloc, "overrides", path))
    for name, overrides in stage.conditions.items():
        if not _is_name(_CONDITION, name):
            raise source.bad((*sloc, "conditions", name), name, _CONDITION_HELP)
        for path in overrides:
            check_path(path, source, (*sloc, "conditions", name, path))
    for path, values in stage.grid.items():
        loc = (*sloc, "grid", path)
        check_path(path, source, loc)
        if not values:
            raise source.bad(loc, values, "a non-empty list of values")
        rendered: set[str] = set()
        for i, value in enumerate(values):
            text = format_value(value)
            if text in rendered:
                raise source.bad((*loc, i), value, "distinct values in a grid axis")
            rendered.add(text)
    for path in stage.sample:
        check_path(path, source, (*sloc, "sample", path))
    if stage.num_samples > 1 and not stage.sample:
        raise source.bad((*sloc, "num_samples"), stage.num_samples, "1 without `sample` axes (use seeds to repeat)")
    named = {p for overrides in stage.conditions.values() for p in overrides}
    for kind, paths in (("grid", stage.grid), ("sample", stage.sample)):
        for path in paths:
            other = "conditions" if path in named else "grid" if kind == "sample" and path in stage.grid else None
            if other:
                raise source.fail((*sloc, kind, path), f"also varied in `{other}`; expected each path in one place")


def _check_init(stage: Stage, sloc: Loc, earlier: dict[str, list[Cell]], source: Source) -> None:
    """A stage's init_from names an earlier stage and one of its conditions."""
    init = stage.init_from
    assert init is not None
    if init.stage not in earlier:
        expected = f"an earlier stage: one of {', '.join(earlier)}" if earlier else "an earlier stage (none precede it)"
        raise source.bad((*sloc, "init_from", "stage"), init.stage, expected)
    names = [cell.name for cell in earlier[init.stage]]
    if init.condition not in names:
        shown = ", ".join(names[:12]) + (" ..." if len(names) > 12 else "")
        hint = suggest(init.condition, names)
        raise source.bad(
            (*sloc, "init_from", "condition"), init.condition, f"a condition of {init.stage}{hint}: {shown}"
        )


def _check_reference(spec: SweepSpec, cells: dict[str, list[Cell]], source: Source) -> None:
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


def _check_compare_to(spec: SweepSpec, cells: dict[str, list[Cell]], source: Source) -> None:
    """`compare_to` (the spec's or a stage's) names a planned condition: `cond` or `stage/cond`."""
    known = {c.name for stage_cells in cells.values() for c in stage_cells}
    known |= {f"{stage}/{c.name}" for stage, stage_cells in cells.items() for c in stage_cells}
    named = [(("compare_to",), spec.compare_to)]
    named += [(("stages", i, "compare_to"), stage.compare_to) for i, stage in enumerate(spec.stages)]
    for loc, name in named:
        if name is not None and name not in known:
            raise source.bad(loc, name, f"a planned condition name{suggest(name, sorted(known))}; see `fasweep plan`")
