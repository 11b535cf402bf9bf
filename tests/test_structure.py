"""The package's structure, read from its source: every import of a fasweep module (at module level, in a function,
under TYPE_CHECKING) runs down the floors declared here, and none closes a cycle; the spec never loads torch."""

from __future__ import annotations

import ast
import subprocess
import sys
from collections.abc import Iterator, Mapping
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "fasweep"

# The floors, lowest first: a module imports only modules on its own floor or below. A name stands for that module,
# or for a package and every module under it that no longer name claims; "" is the package `fasweep` itself.
FLOORS: tuple[tuple[str, ...], ...] = (
    ("errors", "faults", "report_options", "torch_env", "trial_curves", "runs.layout", "report.stats"),
    ("runs.store",),
    ("plugins",),
    ("datasets", "rule_options"),
    ("config",),
    ("nn.rules",),
    ("nn.layers", "nn.dfa", "nn.weight_mirror"),
    ("nn.untied", "nn.alignment"),
    ("nn.convert", "nn.step"),
    ("nn",),
    ("models", "data"),
    ("packing",),
    ("spec", "spec.model"),
    ("spec.reading",),
    ("spec.checks",),
    ("spec.contrasts",),
    ("spec.plan",),
    ("checkpoints",),
    ("trial",),
    ("train",),
    ("packed.optim",),
    ("packed.net",),
    ("packed.train",),
    ("packed",),
    ("runs.lease", "runs.reader"),
    ("runs.conditions",),
    ("runs.condition_runs",),
    ("runs.writer",),
    ("runs", "runs.status", "runs.links", "progress"),
    ("worker",),
    ("report.collect",),
    ("report.summary",),
    ("report.render",),
    ("report.comparisons",),
    ("report.tables",),
    ("report.plots",),
    ("report",),
    ("preflight",),
    ("cluster",),
    ("driver",),
    ("signals",),
    ("launch",),
    ("api", "demo"),
    ("cli", ""),
    ("console",),
)


def modules() -> dict[str, Path]:
    """Every module of the package by its name relative to it (`spec.plan`; "" the package itself)."""
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE).with_suffix("").parts
        found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def imports_of(name: str, path: Path, known: Mapping[str, Path]) -> Iterator[tuple[str, int]]:
    """The fasweep modules `name` imports anywhere in its source, with the line of each import."""
    package = "fasweep." + name if path.name == "__init__.py" else ("fasweep." + name).rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from this module's package, up `level - 1`
                parts = package.split(".")
                base = ".".join([*parts[: len(parts) - node.level + 1], *([base] if base else [])])
            targets = [f"{base}.{alias.name}" for alias in node.names]  # a module, or a name in module `base`
        else:
            continue
        for target in dict.fromkeys(targets):
            if target != "fasweep" and not target.startswith("fasweep."):
                continue
            module = target.removeprefix("fasweep").removeprefix(".")
            while module and module not in known:  # `fasweep.x.name`: the module x
                module = module.rpartition(".")[0]
            if module != name:
                yield module, node.lineno


def graph() -> dict[str, dict[str, int]]:
    """Module -> {module it imports: the line of its first such import}."""
    known = modules()
    edges: dict[str, dict[str, int]] = {}
    for name, path in known.items():
        edges[name] = {}
        for target, line in imports_of(name, path, known):
            edges[name].setdefault(target, line)
    return edges


def floor_of(name: str) -> int:
    """The floor of a module: that of the longest name in FLOORS that is it or a package above it."""
    best: tuple[int, int] | None = None  # (length of the name matched, floor)
    for floor, names in enumerate(FLOORS):
        for listed in names:
            matches = name == listed or (listed and name.startswith(listed + "."))
            if matches and (best is None or len(listed) > best[0]):
                best = (len(listed), floor)
    assert best is not None, f"fasweep.{name} is on no floor: add it to FLOORS in {Path(__file__).name}"
    return best[1]


def upward(edges: Mapping[str, Mapping[str, int]]) -> list[str]:
    """Each import that runs up a floor, as `a (line n) -> b`."""
    return [
        f"fasweep.{a} (line {line}) imports fasweep.{b}: floor {floor_of(a)} < {floor_of(b)}"
        for a, targets in sorted(edges.items())
        for b, line in sorted(targets.items())
        if floor_of(b) > floor_of(a)
    ]


def cycles(edges: Mapping[str, Mapping[str, int]]) -> list[list[str]]:
    """The import cycles among the modules: one path around each strongly connected component larger than one."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in edges.get(v, {}):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = stack[stack.index(v) :]
            del stack[stack.index(v) :]
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return found


def test_no_import_runs_up_a_floor_and_none_closes_a_cycle() -> None:
    edges = graph()
    assert {"spec.plan", "launch", "runs.writer", "driver", ""} <= edges.keys()  # the package was read
    assert edges["launch"].keys() >= {"driver", "signals", "cluster", "preflight", "runs.writer", "spec.plan"}
    assert upward(edges) == []
    assert cycles(edges) == []


def test_the_checks_find_an_import_that_runs_up_and_a_cycle(tmp_path: Path) -> None:
    """The same checks on the real graph with an import added from a low floor to a high one: both report it."""
    edges = {name: dict(targets) for name, targets in graph().items()}
    edges["runs.layout"]["launch"] = 1  # the bottom floor importing the top's stage loop
    assert upward(edges) == [
        f"fasweep.runs.layout (line 1) imports fasweep.launch: floor {floor_of('runs.layout')} < {floor_of('launch')}"
    ]
    assert any({"runs.layout", "launch"} <= set(component) for component in cycles(edges))
    source = tmp_path / "m.py"  # and an import inside a function is read like one at the top
    source.write_text("def f():\n    from fasweep.launch import launch\n")
    assert list(imports_of("runs.layout", source, modules())) == [("launch", 2)]


def test_spec_never_imports_torch() -> None:
    code = (
        "import sys; from fasweep.spec.plan import load_spec; "
        "load_spec('sweeps/untied_fixed_cifar10.yaml'); print('torch' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
