"""What a plan needs before any trial runs, checked where it is cheap: its data sets found (or downloaded), its
storage writable with room for its checkpoints (`preflight`), each trial's memory footprint (`footprints`).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rich.console import Console

from fasweep.config import set_path
from fasweep.errors import UserError
from fasweep.faults import describe_fault, free_space, human_bytes
from fasweep.spec.plan import Plan

if TYPE_CHECKING:
    from fasweep.trial import Footprint

ROOMY_BYTES = 50e9  # storage with this much free space is not checked against the plan's checkpoint sizes


def preflight(plan: Plan, console: Console) -> dict[str, dict[str, Any]]:
    """Before any trial: every distinct data set found (or downloaded), the storage writable; the trials' configs
    with a relative `data.root` made absolute (against the directory `fasweep launch` runs in)."""
    from fasweep.config import DataConfig
    from fasweep.datasets import source as data_source

    configs: dict[str, dict[str, Any]] = {}
    datasets: dict[str, dict[str, Any]] = {}
    for trial in plan.trials:
        config, root = trial.config, trial.config["data"].get("root")
        if root and "://" not in root and not Path(root).expanduser().is_absolute():
            config = set_path(config, "data.root", str(Path(root).expanduser().resolve()))
        configs[trial.key] = config
        datasets.setdefault(json.dumps(config["data"], sort_keys=True), config["data"])
    for data in datasets.values():
        source = data_source(data["name"])  # a generated, bundled or user's set needs no look (nor torch, here)
        if source == "files":
            from fasweep.data import locate

            source = locate(DataConfig.model_validate(data))
        console.print(f"data {data['name']}: {source}", markup=False, highlight=False, soft_wrap=True)
    storage = plan.spec.storage
    if "://" not in storage:
        folder = Path(storage).expanduser().resolve()
        try:
            folder.mkdir(parents=True, exist_ok=True)
            probe = folder / f".fasweep-probe-{os.getpid()}"
            probe.write_bytes(b"0" * 4096)
            probe.unlink()
        except OSError as exc:
            fault = describe_fault(exc, str(folder))
            raise UserError(f"storage {fault}" if fault else f"storage {folder}: not writable ({exc})") from None
        free = shutil.disk_usage(folder).free
        need = checkpoint_bytes(plan) if free < ROOMY_BYTES else 0  # the estimate builds models (imports torch)
        if need and free < need:
            console.print(
                f"warning: storage {folder} has {free_space(folder)}; the plan's checkpoints may need "
                f"{human_bytes(need)} ({plan.spec.checkpoint.keep} per trial)",
                markup=False,
                soft_wrap=True,
            )
    return configs


def footprints(plan: Plan) -> dict[str, Footprint | None]:
    """Each trial's `fasweep.trial.footprint` (measured once per distinct net, optimizer and data set)."""
    from fasweep.config import TrialConfig
    from fasweep.trial import footprint

    measured: dict[str, Footprint | None] = {}
    out = {}
    for t in plan.trials:
        train, data = t.config["train"], t.config["data"]["name"]
        sized = {"optimizer": train["optimizer"], "momentum": train["momentum"], "data": data}
        what = json.dumps({"model": t.config["model"], "feedback": t.config["feedback"], **sized}, sort_keys=True)
        if what not in measured:
            measured[what] = footprint(TrialConfig.model_validate(t.config))
        out[t.key] = measured[what]
    return out


def checkpoint_bytes(plan: Plan) -> int:
    """The plan's checkpoints in storage: `keep` per trial, each its net's state and optimizer moments."""
    sizes = [f.checkpoint for f in footprints(plan).values() if f is not None]
    return sum(sizes) * plan.spec.checkpoint.keep
