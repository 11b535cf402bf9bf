"""What runs on a Ray worker: the Tune trainable of one planned trial (or pack).

A trial writes its checkpoints itself, straight into its own folder under the launch's storage
(`fasweep.runs.layout.trial_checkpoints`, see `fasweep.checkpoints`), in the epochs the spec's `checkpoint` policy
makes due (and at its last epoch), keeping `checkpoint.keep`; Tune receives metrics only. Every start of the
trainable (a first start, Tune's retry after a lost worker, a `--resume`) continues from the newest readable
checkpoint in that folder (a truncated one falls back to the one before); when the folder had any, or in a
`--resume`, every result carries `RESUMED_KEY`, the epoch it continued from (0: started over), for the driver to
record. A user error (`ERROR_KEY`) or an environment fault (`FAULT_KEY`: a full or read-only disk) ends the trial
with one result saying so instead of an exception: Tune would only retry it into the same wall.

A pack (`PACK_PREFIX` + its first member's key, see `fasweep.packed`) is one Tune trial training its members with
`train_pack`: one result per epoch carries every member that ran it under `MEMBERS_KEY` (a JSON object, member
key -> metrics with the member's own `RESUMED_KEY`). Each member checkpoints to its own trial folder, the one it
would use alone, so a member continues packed or alone."""

from __future__ import annotations

import hashlib
import json
import logging
import secrets
import tempfile
from pathlib import Path
from typing import Any

from ray import tune

from fasweep.checkpoints import CheckpointFolder
from fasweep.config import CheckpointPolicy, set_path
from fasweep.errors import UserError
from fasweep.faults import describe_fault
from fasweep.runs.layout import CHECKPOINT_FILE, HISTORY_FILE, trial_checkpoints

log = logging.getLogger(__name__)
RESUMED_KEY = "fasweep_resumed_from"  # in every result of a trial that continued (or a --resume): from which epoch
ERROR_KEY = "fasweep_error"  # the last result of a trial that hit a user error (a retry would hit it again)
FAULT_KEY = "fasweep_fault"  # the last result of a trial that hit an environment fault (full or read-only disk)
MEMBERS_KEY = "fasweep_members"  # in a pack's result: JSON {member key: its metrics of this epoch}
PACK_PREFIX = "pack:"  # a pack's Tune trial key: this + its first member's key


def pack_id(keys: list[str]) -> str:
    """The Tune trial key of a pack of these member keys."""
    return PACK_PREFIX + keys[0]


def run_trial(
    config: dict[str, Any],
    *,
    configs: dict[str, dict[str, Any]],
    init: Any,
    resumed: bool,
    storage: str,
    checkpointing: CheckpointPolicy,
    packs: dict[str, list[str]] | None = None,
) -> None:
    """Tune trainable: train the planned trial (or pack) `config['key']`, reporting each epoch.

    `configs`: key -> TrialConfig dict; `packs`: pack key -> member keys; `init`: the stage's init_from
    checkpoint as bytes (or None); `resumed`: this is a `--resume` launch; `storage`: the launch's storage root
    (the trials' checkpoint folders are under it; a fault that does not say its path names it);
    `checkpointing`: when a trial writes its checkpoint and how many it keeps.
    """
    import ray
    import torch

    from fasweep.config import validate_trial
    from fasweep.train import train

    key = config["key"]
    mine = {k: configs[k] for k in (packs or {}).get(key, [key])}
    if init is not None:
        mine = {k: set_path(c, "model.init_from.checkpoint", str(_init_file(init))) for k, c in mine.items()}
    torch.set_num_threads(max(1, int(ray.get_runtime_context().get_assigned_resources().get("CPU", 1))))
    if packs and key in packs:
        _run_pack(mine, resumed=resumed, storage=storage, checkpointing=checkpointing)
        return
    folder = trial_checkpoints(storage, key)
    with tempfile.TemporaryDirectory(prefix="fasweep-trial-") as tmp:
        resume_from, epoch, found = _first_readable(folder, Path(tmp))
        info = {RESUMED_KEY: float(epoch)} if found or resumed else {}
        reported: list[float] = []

        def on_epoch(metrics: dict[str, float], _saved: str | None) -> None:
            reported.append(metrics["epoch"])
            tune.report({**metrics, **info})

        try:
            result = train(
                validate_trial(mine[key]),
                checkpoint_dir=folder,
                checkpointing=checkpointing,
                resume_from=resume_from,
                on_epoch=on_epoch,
            )
        except Exception as exc:
            tune.report({**_failure(exc, storage), **info})
            return
        if not reported and result.final:  # resumed at its end: report it once more
            tune.report({**result.final, **info})


def _run_pack(
    configs: dict[str, dict[str, Any]], *, resumed: bool, storage: str, checkpointing: CheckpointPolicy
) -> None:
    """Train a pack's members (`configs`: member key -> TrialConfig dict) with `train_pack`, one result per epoch."""
    from fasweep.config import validate_trial
    from fasweep.packed import train_pack

    keys = list(configs)
    folders = [trial_checkpoints(storage, key) for key in keys]
    with tempfile.TemporaryDirectory(prefix="fasweep-pack-") as tmp:
        resumes: list[Path | None] = []
        info: dict[str, dict[str, float]] = {}
        running: set[str] = set()  # members with epochs left: an epoch's result waits for each of them
        for i, key in enumerate(keys):
            path, epoch, found = _first_readable(folders[i], Path(tmp) / str(i))
            resumes.append(path)
            info[key] = {RESUMED_KEY: float(epoch)} if found or resumed else {}
            if not _nothing_left(path, int(configs[key]["train"]["epochs"])):
                running.add(key)
        pending: dict[str, dict[str, float]] = {}
        reported: set[str] = set()

        def report() -> None:
            tune.report({MEMBERS_KEY: json.dumps({k: {**m, **info[k]} for k, m in pending.items()})})
            reported.update(pending)
            pending.clear()

        def on_epoch(index: int, metrics: dict[str, float], _saved: str | None) -> None:
            key = keys[index]
            pending[key] = metrics
            if metrics["diverged"] or metrics["epoch"] >= configs[key]["train"]["epochs"]:
                running.discard(key)
            if running <= pending.keys():
                report()

        try:
            results = train_pack(
                [validate_trial(configs[k]) for k in keys],
                checkpoint_dirs=folders,
                checkpointing=checkpointing,
                resume_from=resumes,
                on_epoch=on_epoch,
            )
        except Exception as exc:
            tune.report(_failure(exc, storage))
            return
        # members resumed at their end ran no epoch: their final metrics once more
        pending.update({k: r.final for k, r in zip(keys, results, strict=True) if k not in reported and r.final})
        if pending:
            report()


def _failure(exc: Exception, storage: str) -> dict[str, str]:
    """The result that ends a trial on a user error (`ERROR_KEY`) or an environment fault (`FAULT_KEY`): a retry
    would meet either again. Any other exception (a bug, a lost node) is raised again for Tune to retry."""
    if isinstance(exc, UserError):
        return {ERROR_KEY: str(exc)}
    fault = describe_fault(exc, storage)
    if fault is None:
        raise exc
    return {FAULT_KEY: fault}


def _nothing_left(checkpoint: Path | None, planned: int) -> bool:
    """Whether the trial a checkpoint file saved has nothing left to run (all epochs, or diverged)."""
    from fasweep.trial import nothing_left

    history = checkpoint.parent / HISTORY_FILE if checkpoint is not None else None
    return history is not None and history.is_file() and nothing_left(json.loads(history.read_text()), planned)


def _first_readable(location: str, dst: Path) -> tuple[Path | None, int, bool]:
    """The newest checkpoint in a trial's folder that loads (a killed write can leave a partial one): its local file
    (copied under `dst` from a URI) and epoch, or (None, 0); and whether the folder had any checkpoint."""
    import torch

    folder = CheckpointFolder(location)
    epochs = folder.epochs()
    for epoch in epochs:
        try:
            path = folder.local(epoch, dst) / CHECKPOINT_FILE
            return path, int(torch.load(path, map_location="cpu", weights_only=True)["epoch"]), True
        except Exception as exc:
            log.warning("checkpoint %s unreadable (%s); trying an older one", folder.folder(epoch), exc)
    return None, 0, bool(epochs)


def _init_file(data: bytes) -> Path:
    """Write an init_from checkpoint to a path named by its content, so a retried trial sees the same config."""
    path = Path(tempfile.gettempdir()) / "fasweep-init" / f"{hashlib.sha256(data).hexdigest()[:20]}.pt"
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{secrets.token_hex(4)}.tmp")
        tmp.write_bytes(data)
        tmp.replace(path)
    return path
