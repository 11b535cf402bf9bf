"""The comparisons a spec declares before any data (`compare_to`, `compare`, `contrasts`), resolved to the planned
conditions they name and checked: the report's Holm family."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from fasweep.config import Loc, format_loc, get_path, set_path
from fasweep.errors import listed, suggest
from fasweep.runs.layout import condition_label
from fasweep.spec.checks import Cell, check_path, format_value
from fasweep.spec.model import SweepSpec, stage_locs
from fasweep.spec.reading import Source


@dataclass(frozen=True)
class Contrast:
    """A comparison the spec declares before any data (`compare_to`, `compare` or `contrasts`): condition X against
    baseline Y (X − Y), both as reports label them (`stage/condition`, the condition alone in stage main)."""

    condition: str
    baseline: str
    pairing: str
    declared_by: str


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
    path: str, value: Any, conds: dict[str, dict[str, Any]], where: str, loc: Loc, source: Source, strict: bool
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
            raise source.bad((*loc, path), value, f"a planned value of {path}{where}: {listed(planned)}")
        return []
    pairs = []
    for x, config in conds.items():
        if get_path(config, path) == value:
            continue
        twin = next((y for y, other in conds.items() if other == set_path(config, path, value)), None)
        if twin is not None:
            pairs.append((x, twin))
    return pairs


def declared_contrasts(
    spec: SweepSpec,
    configs: dict[str, dict[str, dict[str, Any]]],
    cells: dict[str, list[Cell]],
    source: Source,
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
            check_path(path, source, (*lloc, "compare", path))
    found = False
    for stage, sloc in stage_locs(spec):
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
    for stage, sloc in stage_locs(spec):
        pairing = stage.pairing or spec.pairing
        named += [((*sloc, "contrasts", i), pair, stage.name, pairing) for i, pair in enumerate(stage.contrasts)]
    for loc, pair, stage_name, pairing in named:
        for x, y in _contrast_pairs(pair, stage_name, configs, cells, loc, source):
            add(x, y, pairing, "contrasts", loc)
    return tuple(out.values())


def _contrast_side(
    name: str, stage: str, configs: dict[str, dict[str, Any]], cells: dict[str, list[Cell]]
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
    cells: dict[str, list[Cell]],
    loc: Loc,
    source: Source,
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
                f"condition alone means each of its grid cells): {listed(known)}"
            )
            raise source.bad((*loc, j), name, expected)
    (x_exact, xs), (y_exact, ys) = sides  # type: ignore[misc]
    if x_exact and y_exact:
        return [(next(iter(xs.values())), next(iter(ys.values())))]
    pairs = [(xs[rest], ys[rest]) for rest in xs if rest in ys]
    if not pairs:
        expected = f"conditions with grid values in common (X: {listed(list(xs), 4)}; Y: {listed(list(ys), 4)})"
        raise source.bad(loc, list(pair), expected)
    return pairs
