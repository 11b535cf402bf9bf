"""User code by name: an import path `module:attribute` or an entry point's name (torch-free).

Wherever a spec names a rule, a model or a data set it may name the user's own: `feedback.mode:
mypkg.rules:WeightMirror`, or `weight_mirror` once an installed package registers that name in the entry point
group `fasweep.rules` (`fasweep.models`, `fasweep.datasets` for the others). What cannot be loaded is one line
naming the field, the value and why; the module is imported here, the caller checks what it got.
"""

from __future__ import annotations

import importlib
from importlib.metadata import entry_points
from typing import Any

from fasweep.errors import UserError, suggest

GROUPS = {"rules": "fasweep.rules", "models": "fasweep.models", "datasets": "fasweep.datasets"}


def is_import_path(name: str) -> bool:
    """Whether `name` is written `module:attribute` (a user's object by its import path)."""
    module, colon, attr = name.partition(":")
    return bool(colon and module and attr)


def registered(kind: str) -> dict[str, str]:
    """The names installed packages register for `kind` (rules, models, datasets) -> their import paths."""
    return {ep.name: ep.value for ep in entry_points(group=GROUPS[kind])}


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= 200 else text[:197] + "..."


def load(path: str, field: str) -> Any:
    """The object at import path `module:attribute` (dotted attributes allowed); a UserError for `field` when the
    module does not import (why, in one line) or has no such attribute."""
    if not is_import_path(path):
        raise UserError.field(field, path, "an import path module:attribute, e.g. mypkg.rules:WeightMirror")
    module_name, _, attr = path.partition(":")
    try:
        obj: Any = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        where = f"module {exc.name} is not installed" if exc.name else _one_line(exc)
        fix = "install the package or put it on PYTHONPATH (workers: the spec's `code:`)"
        raise UserError.field(field, path, f"an importable module ({where}; {fix})") from None
    except Exception as exc:  # the user's module failed while importing
        raise UserError.field(field, path, f"a module that imports ({type(exc).__name__}: {_one_line(exc)})") from None
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise UserError.field(field, path, f"an attribute of module {module_name} (it has no {part!r})")
        obj = getattr(obj, part)
    return obj


def find(kind: str, name: str, field: str, builtin: list[str]) -> Any:
    """The user's object `name` of `kind`: an import path, or a name an installed package registers; otherwise a
    UserError listing the `builtin` names and the registered ones (with the closest as a hint)."""
    if is_import_path(name):
        return load(name, field)
    installed = registered(kind)
    if name in installed:
        return load(installed[name], field)
    names = [*builtin, *installed]
    expected = f"one of {', '.join(names)}, or an import path module:attribute{suggest(name, names)}"
    raise UserError.field(field, name, expected)
