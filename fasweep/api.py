"""The public Python API (`fasweep.train`, `fasweep.launch`, `fasweep.runs`, `fasweep.report`, `fasweep.fa`): what a
notebook or a script calls, as the command line does. Light to import: each function imports what it uses.

`fasweep.train`, `fasweep.launch`, `fasweep.runs` and `fasweep.report` are also the modules of those names; a call
to one (`fasweep.train(config)`) is a call to the function here: the package makes each such module callable as it
is imported (`fasweep.__init__`, `callable_module`), so the modules themselves never import this one.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import pandas
    from torch import nn

    from fasweep.config import TrialConfig
    from fasweep.launch import LaunchResult
    from fasweep.nn import FeedbackRule
    from fasweep.train import TrialResult


def train(config: TrialConfig | dict[str, Any] | str | Path, **options: Any) -> TrialResult:
    """Train one trial here (no Ray): `config` a TrialConfig, its dict (`{"model": {"arch": "DSR1"}, ...}`) or a
    YAML file of one. The result holds `status`, `history` (one dict of metrics per epoch) and `final`; `options`
    are `fasweep.train.train`'s (`checkpoint_dir`, `resume_from`, `on_epoch`, ...)."""
    import yaml

    from fasweep.config import TrialConfig, validate_trial
    from fasweep.train import train as run

    if isinstance(config, str | Path):
        path = Path(config)
        if not path.is_file():
            raise FileNotFoundError(path)
        config = validate_trial(yaml.safe_load(path.read_text()) or {}, where=str(path))
    elif not isinstance(config, TrialConfig):
        config = validate_trial(config)
    return run(config, **options)


def launch(
    spec: str | Path,
    *,
    sets: dict[str, Any] | None = None,
    code: Sequence[str | Path] = (),
    address: str | None = None,
    tracking_uri: str | None = None,
    resume: bool = False,
    num_cpus: int | None = None,
) -> LaunchResult:
    """Run the sweep `spec` on Ray and track it in MLflow, as `fasweep launch` does (`sets`: its `--set` values,
    `code`: its `--code` folders); returns the launch's id, status and store."""
    from fasweep.launch import launch as run

    sets = dict(sets or {})
    if code:
        sets["code"] = [str(Path(folder).resolve()) for folder in code]
    return run(spec, sets=sets, address=address, tracking_uri=tracking_uri, resume=resume, num_cpus=num_cpus)


def runs(sweep: str, *, tracking_uri: str | None = None, launch: str = "latest") -> pandas.DataFrame:
    """A sweep's trials as a table: one row per trial and epoch, with `stage`, `condition`, `seed`, `status`,
    `trial`, `launch`, the sweep's axes (as the trials' params, numbers as numbers) and every metric logged at
    that epoch (`test_acc`, `angle/dense1`, ...). `launch`: latest, all, or a launch id."""
    import pandas as pd

    from fasweep.report.collect import fetch_histories, load_sweep
    from fasweep.runs.layout import Tag
    from fasweep.runs.store import resolve_tracking_uri
    from fasweep.spec.reading import read_value

    uri = resolve_tracking_uri(tracking_uri)
    found = load_sweep(uri, sweep, launch=launch)
    fetch_histories(uri, found.trials, {key for t in found.trials for key in t.metrics})
    rows = []
    for t in found.trials:
        axes = {axis: read_value(t.params[axis], axis) for axis in found.axes if axis in t.params}
        ident = {"stage": t.stage, "condition": t.condition, "seed": t.seed, "status": t.status, "trial": t.key}
        ident["launch"] = t.tags.get(Tag.LAUNCH, "")
        epochs: dict[int, dict[str, float]] = {}
        for key, points in t.histories.items():
            for epoch, value in points:
                epochs.setdefault(epoch, {})[key] = value
        rows += [{**ident, **axes, "epoch": epoch, **values} for epoch, values in sorted(epochs.items())]
    return pd.DataFrame(rows)


def report(
    target: str,
    *,
    tracking_uri: str | None = None,
    format: str = "md",
    out: str | Path | None = None,
    **options: Any,
) -> str:
    """The report `fasweep report TARGET` prints (a sweep name or a spec file), rendered as `format` (md, csv, json,
    html); with `out`, its files (tables, plots, report.html) are written there too. `options` are the command's
    (`metric`, `at`, `by`, `launch`, `ci`, `baseline`, `pairing`, `margin`, `log`)."""
    from fasweep.errors import UserError
    from fasweep.report import FORMATS, make_report, render
    from fasweep.runs.store import resolve_tracking_uri

    if format not in FORMATS:
        raise UserError.field("format", format, " | ".join(FORMATS))
    folder = Path(out) if out is not None else None
    made = make_report(
        target, tracking_uri=resolve_tracking_uri(tracking_uri), out=folder, plots=format == "html", **options
    )
    return render(made, format)


def fa(module: nn.Module, mode: str | FeedbackRule = "random", **options: Any) -> nn.Module:
    """Convert any model (in place, returned): every `nn.Linear`/`nn.Conv2d` becomes an FA layer with the same
    weights and the rule `mode` (any rule name, import path or rule object) with `options`, as biotorch's
    `BioModule(model, mode=...)` does; train it with any torch optimizer."""
    from fasweep.nn import convert

    return convert(module, mode, **options)


class _Callable(ModuleType):
    """A module that is also the public function of its name: calling it calls that function of this API."""

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return globals()[self.__name__.rpartition(".")[2]](*args, **kwargs)


CALLABLE = ("launch", "report", "runs", "train")  # the modules of the package that are also this API's functions


def callable_module(module: ModuleType) -> None:
    """Make `module` (fasweep.train, ...) callable as this API's function of its last name."""
    module.__class__ = _Callable
