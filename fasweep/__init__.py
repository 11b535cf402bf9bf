"""fasweep: sweeps for asymmetric backpropagation (feedback alignment) on Ray, tracked in MLflow.

The public Python API (everything else is internal):

- `fasweep.train(config)`: train one trial here, no Ray; `config` a dict, a TrialConfig or a YAML file.
- `fasweep.launch(spec, ...)`: run a sweep spec on Ray, tracked in MLflow (as `fasweep launch`).
- `fasweep.runs(sweep)`: its trials as a pandas DataFrame, one row per trial and epoch, with its axes.
- `fasweep.report(sweep_or_spec, ...)`: the report `fasweep report` prints (tables, statistics, plots).
- `fasweep.fa(module, mode=..., **options)`: any model's Linear/Conv2d layers as FA layers (biotorch's BioModule).
- Your own rule: subclass `fasweep.nn.FeedbackRule`, its options `fasweep.rule_options.Option` (README: "Your
  own rule, model or data").

Importing fasweep loads neither torch nor Ray; each function loads what it needs.
"""

from __future__ import annotations

import importlib
import sys
from types import ModuleType
from typing import Any

from fasweep.api import CALLABLE, callable_module, fa

__version__ = "0.1.0"
__all__ = ["fa", "launch", "report", "runs", "train"]


class _Package(ModuleType):
    """This package: a submodule of an API function's name (fasweep.train, .launch, .runs, .report) is made callable
    as that function when the import system binds it here, however it was imported."""

    def __setattr__(self, name: str, value: Any) -> None:
        if name in CALLABLE and isinstance(value, ModuleType):
            callable_module(value)
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package


def __getattr__(name: str) -> Any:
    # fasweep.train, .launch, .runs, .report: the modules of those names, each callable as its API function
    if name in CALLABLE:
        return importlib.import_module(f"fasweep.{name}")
    raise AttributeError(f"module 'fasweep' has no attribute {name!r}")
