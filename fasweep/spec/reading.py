"""Reading a spec: bounded YAML (specs are untrusted input), line numbers for errors (`Source`) and `--set`.

Reading is bounded: at most MAX_SPEC_BYTES of text and MAX_YAML_NODES values with every alias expanded (a
"billion laughs" is refused, not walked), MAX_YAML_DEPTH levels deep. A `--set PATH=VALUE` is applied to the raw
spec before validation, and errors in what it introduced name the flag instead of a line.
"""

from __future__ import annotations

import copy
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from fasweep.config import Loc, TrialConfig, brief, format_loc
from fasweep.errors import UserError
from fasweep.spec.model import Stage, SweepSpec

MAX_SPEC_BYTES = 1 << 20  # a spec's text (the shipped ones are under 5 KB)
MAX_YAML_NODES = 100_000  # YAML values of a spec (or a --set value), each alias counted as often as it is used
MAX_YAML_DEPTH = 32  # nested mappings and lists
_SAFE_TAGS = {
    f"tag:yaml.org,2002:{t}" for t in ("str", "int", "float", "bool", "null", "timestamp", "seq", "map", "merge")
}


@dataclass
class Source:
    """Where a spec came from, to point errors at a YAML line or a --set flag."""

    name: str
    root: yaml.Node | None = None
    sets: dict[Loc, str] = field(default_factory=dict)

    def where(self, loc: Loc) -> str:
        """`file:line: path` of the field at `loc` (line of its deepest YAML node), or `--set PATH[: path]`."""
        path = format_loc(loc) or "<top>"
        for flagged, flag in self.sets.items():
            if loc[: len(flagged)] == flagged:
                return f"--set {flag}" + ("" if path in (format_loc(flagged), flag) else f": {path}")
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


def read_yaml(text: str, source: Source) -> dict[str, Any]:
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


def set_loc(path: str, data: dict[str, Any]) -> Loc:
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


def apply_sets(data: dict[str, Any], sets: dict[str, Any], source: Source) -> None:
    """Apply `--set` values (dotted spec paths -> values) to the raw spec `data`, recording in `source` what each
    flag introduced (errors there name the flag)."""
    for path, value in sets.items():
        source.sets[_apply_set(data, set_loc(path, data), value, path)] = path


def read_spec_file(path: Path) -> str:
    """A spec file's text, read within MAX_SPEC_BYTES (no more: /dev/zero is a "spec" too)."""
    try:
        with path.open("rb") as fh:
            raw = fh.read(MAX_SPEC_BYTES + 1)
        if len(raw) > MAX_SPEC_BYTES:
            raise UserError.field(
                "spec", str(path), f"a YAML file of at most {MAX_SPEC_BYTES:,} bytes (MAX_SPEC_BYTES)"
            )
        return raw.decode()
    except FileNotFoundError:
        raise UserError.field("spec", str(path), "an existing YAML file, e.g. sweeps/quickstart.yaml") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError.field("spec", str(path), f"a readable UTF-8 YAML file ({exc.__class__.__name__})") from None
