"""User code by name: an import path `module:attribute` or an entry point's name (torch-free).

Wherever a spec names a rule, a model or a data set it may name the user's own: `feedback.mode:
mypkg.rules:WeightMirror`, or `weight_mirror` once an installed package registers that name in the entry point
group `fasweep.rules` (`fasweep.models`, `fasweep.datasets` for the others). What cannot be loaded is one line
naming the field, the value and why; the module is imported here, the caller checks what it got.
"""

from __future__ import annotations

import functools
import importlib
import re
import sys
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any

from fasweep.errors import UserError, suggest

GROUPS = {"rules": "fasweep.rules", "models": "fasweep.models", "datasets": "fasweep.datasets"}
_IMPORT_PATH = re.compile(r"[A-Za-z_][\w.]*:[A-Za-z_][\w.]*")


def is_import_path(name: str) -> bool:
    """Whether `name` is written `module:attribute` (a user's object by its import path)."""
    return _IMPORT_PATH.fullmatch(name) is not None


def registered(kind: str) -> dict[str, str]:
    """The names installed packages register for `kind` (rules, models, datasets) -> their import paths."""
    return _registered(tuple(sys.path))[kind]


@functools.lru_cache(maxsize=8)
def _registered(path: tuple[str, ...]) -> dict[str, dict[str, str]]:
    """Every group's entry points as installed on `path` (read once per sys.path: a scan takes ~10 ms)."""
    return {kind: {ep.name: ep.value for ep in entry_points(group=group)} for kind, group in GROUPS.items()}


def is_plugin(kind: str, name: str) -> bool:
    """Whether `name` names user code of `kind`: an import path, or a name an installed package registers."""
    return is_import_path(name) or name in registered(kind)


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
        where = f"no module named {exc.name}" if exc.name else _one_line(exc)
        fix = "install its package or put it on PYTHONPATH; on a cluster, ship it with the spec's `code:`"
        raise UserError.field(field, path, f"an importable module ({where}: {fix})") from None
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


def code_folder(entry: str, folder: Path | None) -> Path | None:
    """The user's code folder `entry` (a package folder: its name is what they import), absolute (a relative one
    against `folder`, the spec's, else the working directory); None when there is no such folder."""
    path = Path(entry).expanduser()
    path = (folder or Path.cwd()) / path if not path.is_absolute() else path
    return path.resolve() if path.is_dir() else None


def importable(folders: list[str]) -> None:
    """Make the packages in `folders` importable in this process (each folder's parent first on sys.path), as Ray's
    runtime_env `py_modules` makes them in the workers."""
    for parent in dict.fromkeys(str(Path(f).parent) for f in folders):
        if parent not in sys.path:
            sys.path.insert(0, parent)
