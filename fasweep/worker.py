"""What runs on a Ray worker: the Tune trainable of one planned trial, and the checkpoint folders it leaves.

An epoch's report carries its checkpoint folder (train()'s `checkpoint.pt` and `history.json`, plus an epoch
marker) every `checkpoint.every_epochs` epochs or `every_seconds` seconds of the spec, and at the last epoch;
Tune copies it to `<stage experiment>/<trial dir>/checkpoint_NNNNNN/` in the launch's storage, keeping the last
`checkpoint.keep`. A trial continues from Tune's checkpoint on a retry, else (`--resume`) from the newest
readable checkpoint `find_checkpoints` found for its key anywhere under the launch's storage; every result then
carries `RESUMED_KEY`, the epoch it continued from (0: started over), for the driver to record. A user error
(`ERROR_KEY`) or an environment fault (`FAULT_KEY`: a full or read-only disk) ends the trial with one result
saying so instead of an exception: Tune would only retry it into the same wall.

A pack (`PACK_PREFIX` + its first member's key, see `fasweep.packed`) is one Tune trial training its members
with `train_pack`: one result per epoch carries every member that ran it under `MEMBERS_KEY` (a JSON object,
member key -> metrics with the member's own `RESUMED_KEY`), and its checkpoint folder holds one subfolder per
member (`trial_dirname(member)`, as a solo trial's folder: checkpoint, history, epoch marker), so a member
continues packed or alone."""

from __future__ import annotations

import hashlib
import json
import logging
import secrets
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from ray import tune

from fasweep.config import set_path
from fasweep.errors import UserError
from fasweep.faults import describe_fault
from fasweep.runs.layout import CHECKPOINT_FILE, HISTORY_FILE, epoch_marker, marked_epoch, trial_dirname

log = logging.getLogger(__name__)
RESUMED_KEY = "fasweep_resumed_from"  # in every result of a trial that looked for a checkpoint to continue from
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
    resume: dict[str, list[str]] | None,
    storage: str = "",
    every_epochs: int = 1,
    every_seconds: float | None = None,
    packs: dict[str, list[str]] | None = None,
) -> None:
    """Tune trainable: train the planned trial (or pack) `config['key']`, reporting each epoch with its checkpoint.

    `configs`: key -> TrialConfig dict; `packs`: pack key -> member keys; `init`: the stage's init_from
    checkpoint as bytes (or None); `resume`: key -> checkpoint folders (newest first) when this is a `--resume`
    launch, else None; `storage`: the launch's storage, named by a fault that does not say its path;
    `every_epochs`, `every_seconds`: how often an epoch's report carries its checkpoint (the last epoch's always
    does).
    """
    import ray
    import torch

    from fasweep.config import TrialConfig
    from fasweep.train import train

    key = config["key"]
    mine = {k: configs[k] for k in (packs or {}).get(key, [key])}
    if init is not None:
        mine = {k: set_path(c, "model.init_from.checkpoint", str(_init_file(init))) for k, c in mine.items()}
    torch.set_num_threads(max(1, int(ray.get_runtime_context().get_assigned_resources().get("CPU", 1))))
    if packs and key in packs:
        _run_pack(mine, resume=resume, storage=storage, every_epochs=every_epochs, every_seconds=every_seconds)
        return
    trial_config = mine[key]
    with tempfile.TemporaryDirectory(prefix="fasweep-trial-") as tmp:
        work = Path(tmp)
        retried = tune.get_checkpoint()
        candidates = [retried.path] if retried is not None else (resume or {}).get(key, [])
        resume_from, epoch = _first_readable(candidates, work / "resume")
        info = {RESUMED_KEY: float(epoch)} if retried is not None or resume is not None else {}
        reported: list[float] = []
        planned = int(trial_config["train"]["epochs"])
        last_saved = [epoch, time.monotonic()]

        def on_epoch(metrics: dict[str, float], path: Path | None) -> None:
            reported.append(metrics["epoch"])
            number = int(metrics["epoch"])
            due = number - last_saved[0] >= every_epochs or number >= planned or bool(metrics.get("diverged"))
            due = due or (every_seconds is not None and time.monotonic() - last_saved[1] >= every_seconds)
            if due and path is not None:
                last_saved[:] = [number, time.monotonic()]
            tune.report({**metrics, **info}, checkpoint=_marked(path, number) if due and path else None)

        try:
            result = train(
                TrialConfig.model_validate(trial_config),
                checkpoint_dir=work / "checkpoint",
                resume_from=resume_from,
                on_epoch=on_epoch,
            )
        except Exception as exc:
            tune.report({**_failure(exc, storage), **info})
            return
        if not reported and result.final and resume_from is not None:  # resumed at its end: report it once more
            tune.report({**result.final, **info}, checkpoint=_marked(resume_from, epoch))


def _run_pack(
    configs: dict[str, dict[str, Any]],
    *,
    resume: dict[str, list[str]] | None,
    storage: str,
    every_epochs: int,
    every_seconds: float | None,
) -> None:
    """Train a pack's members (`configs`: member key -> TrialConfig dict) with `train_pack`, one result per epoch."""
    from fasweep.config import TrialConfig
    from fasweep.packed import train_pack

    keys = list(configs)
    with tempfile.TemporaryDirectory(prefix="fasweep-pack-") as tmp:
        work = Path(tmp)
        folder = work / "pack"
        dirs = {key: folder / trial_dirname(key) for key in keys}
        retried = tune.get_checkpoint()
        resumes: list[Path | None] = []
        info: dict[str, dict[str, float]] = {}
        running: set[str] = set()  # members with epochs left: an epoch's result waits for each of them
        for key in keys:
            sub = trial_dirname(key)
            candidates = [f"{retried.path}/{sub}"] if retried is not None else (resume or {}).get(key, [])
            path, epoch = _first_readable(candidates, work / "resume" / sub)
            dirs[key].mkdir(parents=True)
            if path is not None:  # the pack's folder always holds every member's latest checkpoint
                for name in (CHECKPOINT_FILE, HISTORY_FILE):
                    if (path.parent / name).is_file():
                        shutil.copy2(path.parent / name, dirs[key] / name)
                _mark(dirs[key], epoch)
            resumes.append(path)
            info[key] = {RESUMED_KEY: float(epoch)} if retried is not None or resume is not None else {}
            if not _nothing_left(path, int(configs[key]["train"]["epochs"])):
                running.add(key)
        pending: dict[str, dict[str, float]] = {}
        reported: set[str] = set()
        since = [0, time.monotonic()]  # results since the last checkpoint, and its time

        def report() -> None:
            since[0] += 1
            due = since[0] >= every_epochs or any(m["diverged"] for m in pending.values())
            due = due or (every_seconds is not None and time.monotonic() - since[1] >= every_seconds)
            due = due or any(m["epoch"] >= configs[k]["train"]["epochs"] for k, m in pending.items())
            if due:
                since[:] = [0, time.monotonic()]
                for key, metrics in pending.items():
                    _mark(dirs[key], int(metrics["epoch"]))
            members = json.dumps({k: {**m, **info[k]} for k, m in pending.items()})
            checkpoint = tune.Checkpoint.from_directory(str(folder)) if due else None
            tune.report({MEMBERS_KEY: members}, checkpoint=checkpoint)
            reported.update(pending)
            pending.clear()

        def on_epoch(index: int, metrics: dict[str, float], path: Path | None) -> None:
            key = keys[index]
            pending[key] = metrics
            if metrics["diverged"] or metrics["epoch"] >= configs[key]["train"]["epochs"]:
                running.discard(key)
            if running <= pending.keys():
                report()

        try:
            results = train_pack(
                [TrialConfig.model_validate(configs[k]) for k in keys],
                checkpoint_dirs=[dirs[k] for k in keys],
                resume_from=resumes,
                on_epoch=on_epoch,
            )
        except Exception as exc:
            tune.report(_failure(exc, storage))
            return
        # members resumed at their end ran no epoch: their final metrics once more, with the pack's checkpoint
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
    history = checkpoint.parent / HISTORY_FILE if checkpoint is not None else None
    if history is None or not history.is_file():
        return False
    epochs = json.loads(history.read_text())
    return bool(epochs) and (len(epochs) >= planned or bool(epochs[-1].get("diverged")))


def _mark(folder: Path, epoch: int) -> None:
    """Leave one epoch marker in a checkpoint folder."""
    for old in folder.iterdir():
        if marked_epoch(old.name) is not None:
            old.unlink()
    (folder / epoch_marker(epoch)).touch()


def _marked(path: Path, epoch: int) -> Any:
    """The checkpoint folder of `path` with its epoch marker, as a Tune checkpoint."""
    _mark(path.parent, epoch)
    return tune.Checkpoint.from_directory(str(path.parent))


def _first_readable(folders: list[str], dst: Path) -> tuple[Path | None, int]:
    """Copy the first checkpoint folder whose checkpoint loads (a killed write can leave a partial one); its
    local checkpoint file and epoch, or (None, 0) when none does."""
    import torch

    for i, folder in enumerate(folders):
        try:
            path = Path(tune.Checkpoint(folder).to_directory(str(dst / str(i)))) / CHECKPOINT_FILE
            return path, int(torch.load(path, map_location="cpu", weights_only=True)["epoch"])
        except Exception as exc:
            log.warning("checkpoint %s unreadable (%s); trying an older one", folder, exc)
    return None, 0


def find_checkpoints(root: str, keys: list[str]) -> dict[str, list[str]]:
    """The checkpoint folders of each trial key under a launch's storage `root` (local or URI, every stage
    experiment of the launch, solo or a member's subfolder of a pack's), newest epoch first; keys without any
    are left out."""
    import pyarrow.fs

    try:
        fs, base = pyarrow.fs.FileSystem.from_uri(root)
        infos = fs.get_file_info(pyarrow.fs.FileSelector(base, recursive=True, allow_not_found=True))
    except (OSError, ValueError):
        return {}
    by_dir = {trial_dirname(key): key for key in keys}
    prefix = root[: len(root) - len(base)] if root.endswith(base) else ""
    found: dict[str, list[tuple[int, str]]] = {}
    for info in infos:
        folder, _, name = info.path.rpartition("/")
        epoch = marked_epoch(name)
        if epoch is None:
            continue
        above, _, own = folder.rpartition("/")
        trial_dir = above.rpartition("/")[2]  # solo: <trial dir>/checkpoint_N/; a pack: checkpoint_N/<member dir>/
        key = by_dir.get(trial_dir) or by_dir.get(own)
        if key is not None:
            found.setdefault(key, []).append((epoch, prefix + folder))
    return {key: [path for _, path in sorted(items, reverse=True)] for key, items in found.items()}


def _init_file(data: bytes) -> Path:
    """Write an init_from checkpoint to a path named by its content, so a retried trial sees the same config."""
    path = Path(tempfile.gettempdir()) / "fasweep-init" / f"{hashlib.sha256(data).hexdigest()[:20]}.pt"
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{secrets.token_hex(4)}.tmp")
        tmp.write_bytes(data)
        tmp.replace(path)
    return path
