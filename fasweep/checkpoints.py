"""A trial's checkpoints in storage (a local or shared path, or a URI such as s3://), written once where they stay.

A trial's folder (`fasweep.runs.layout.trial_checkpoints`: `<launch root>/_checkpoints/<trial dir>/`, the same for
every stage experiment and `--resume` of the launch, and for a pack's member as alone) holds one `epoch-NNNNNN/`
per checkpoint, with `checkpoint.pt` and `history.json`. A write is atomic and happens once: on a local or mounted
filesystem both files go to a temporary folder beside the others that is then renamed into place; on an object
store (no folder rename) each file is one PUT, atomic by itself, the history first and the checkpoint last, so a
folder counts once its checkpoint exists. After a write the trial keeps its newest `keep` checkpoints and drops any
past the epoch just written (left by an earlier run of the trial, found unreadable). Torch-free: the caller
serializes (to bytes: torch.save straight to a full disk fails without saying so), `fasweep.config.CheckpointPolicy`
says when. The driver imports this module too.
"""

from __future__ import annotations

import contextlib
import secrets
from pathlib import Path

from fasweep.runs.layout import (
    CHECKPOINT_FILE,
    CHECKPOINTS_DIR,
    HISTORY_FILE,
    epoch_marker,
    marked_epoch,
    trial_checkpoints,
    trial_dirname,
)

_TMP_SUFFIX = ".tmp"  # `.<epoch folder>.<token>.tmp`: a local write in progress (or killed)


class CheckpointFolder:
    """One trial's checkpoint folder (a local path or a URI): its epochs, a new checkpoint, a local copy of one."""

    def __init__(self, location: str | Path) -> None:
        import pyarrow.fs

        location = str(location)
        if "://" in location:
            self.location = location.rstrip("/")
            self.fs, self.path = pyarrow.fs.FileSystem.from_uri(self.location)
        else:  # a path as it is (not parsed as a URI)
            self.location = self.path = str(Path(location).expanduser().resolve())
            self.fs = pyarrow.fs.LocalFileSystem()
        self.on_disk = isinstance(self.fs, pyarrow.fs.LocalFileSystem)

    def folder(self, epoch: int) -> str:
        """The location of the checkpoint after `epoch`."""
        return f"{self.location}/{epoch_marker(epoch)}"

    def epochs(self) -> list[int]:
        """The epochs with a checkpoint here, newest first."""
        return sorted(self._listing()[0], reverse=True)

    def write(self, epoch: int, history: bytes, checkpoint: bytes | memoryview, keep: int) -> str:
        """Write the checkpoint after `epoch` (the bytes of history.json and checkpoint.pt), then drop the ones not
        kept; its location."""
        import pyarrow.fs

        final = f"{self.path}/{epoch_marker(epoch)}"
        if self.on_disk:
            tmp = f"{self.path}/.{epoch_marker(epoch)}.{secrets.token_hex(4)}{_TMP_SUFFIX}"
            self.fs.create_dir(tmp, recursive=True)
            try:
                self._put(f"{tmp}/{HISTORY_FILE}", history)
                self._put(f"{tmp}/{CHECKPOINT_FILE}", checkpoint)
                if self.fs.get_file_info(final).type != pyarrow.fs.FileType.NotFound:  # replayed: the older copy goes
                    self.fs.delete_dir(final)
                self.fs.move(tmp, final)
            except BaseException:
                self._drop(tmp)
                raise
        else:
            self.fs.create_dir(final, recursive=True)
            self._put(f"{final}/{HISTORY_FILE}", history)
            self._put(f"{final}/{CHECKPOINT_FILE}", checkpoint)
        self._prune(epoch, keep)
        return self.folder(epoch)

    def local(self, epoch: int, dst: Path) -> Path:
        """A local folder with the checkpoint after `epoch`: the folder itself on a local filesystem, else a copy
        of its files under `dst`."""
        source = f"{self.path}/{epoch_marker(epoch)}"
        if self.on_disk:
            return Path(source)
        target = dst / epoch_marker(epoch)
        target.mkdir(parents=True, exist_ok=True)
        for name in (HISTORY_FILE, CHECKPOINT_FILE):
            with self.fs.open_input_stream(f"{source}/{name}") as src, (target / name).open("wb") as out:
                while chunk := src.read(1 << 22):
                    out.write(chunk)
        return target

    def _put(self, path: str, data: bytes | memoryview) -> None:
        with self.fs.open_output_stream(path) as out:
            out.write(data)

    def _listing(self) -> tuple[set[int], list[str]]:
        """(epochs with a complete checkpoint, every epoch or temporary folder's path) in this folder."""
        import pyarrow.fs

        selector = pyarrow.fs.FileSelector(self.path, allow_not_found=True, recursive=True)
        complete, folders = set(), set()
        for info in self.fs.get_file_info(selector):
            parts = _parts(info.path, self.path)
            top = parts[0]
            if marked_epoch(top) is None and not (top.startswith(".") and top.endswith(_TMP_SUFFIX)):
                continue
            folders.add(f"{self.path}/{top}")
            if (epoch := _checkpoint_epoch(parts)) is not None:
                complete.add(epoch)
        return complete, sorted(folders)

    def _prune(self, epoch: int, keep: int) -> None:
        """Keep the newest `keep` checkpoints up to `epoch`; drop the rest, and what killed writes left."""
        complete, folders = self._listing()
        kept = {self.path + "/" + epoch_marker(e) for e in sorted(e for e in complete if e <= epoch)[-keep:]}
        for folder in folders:
            if folder not in kept:
                self._drop(folder)

    def _drop(self, path: str) -> None:
        with contextlib.suppress(OSError):  # already gone (or the storage refuses: the next write tries again)
            self.fs.delete_dir(path)


def _parts(path: str, base: str) -> list[str]:
    """The parts of `path` below the folder `base`."""
    return path[len(base) :].strip("/").split("/")


def _checkpoint_epoch(parts: list[str]) -> int | None:
    """The epoch of a checkpoint file's path (its parts inside a trial's folder): `epoch-NNNNNN/checkpoint.pt` is one
    (complete once it exists), any other path is not (None)."""
    return marked_epoch(parts[0]) if len(parts) == 2 and parts[1] == CHECKPOINT_FILE else None


def newest_checkpoint(location: str | Path, dst: Path) -> Path | None:
    """The newest checkpoint file in a trial's folder (in place, or copied under `dst` from a URI); None if none."""
    folder = CheckpointFolder(location)
    epochs = folder.epochs()
    return folder.local(epochs[0], dst) / CHECKPOINT_FILE if epochs else None


def find_checkpoints(root: str, keys: list[str]) -> dict[str, list[str]]:
    """The checkpoint folders of each trial key under a launch's storage `root` (local or URI), newest first, from
    one listing of its checkpoints folder; keys without any are left out."""
    import pyarrow.fs

    try:
        base = CheckpointFolder(f"{root.rstrip('/')}/{CHECKPOINTS_DIR}")
        infos = base.fs.get_file_info(pyarrow.fs.FileSelector(base.path, recursive=True, allow_not_found=True))
    except (OSError, ValueError):
        return {}
    by_dir = {trial_dirname(key): key for key in keys}
    found: dict[str, set[int]] = {}
    for info in infos:
        trial, *inside = _parts(info.path, base.path)
        if trial in by_dir and (epoch := _checkpoint_epoch(inside)) is not None:
            found.setdefault(by_dir[trial], set()).add(epoch)
    return {
        key: [f"{trial_checkpoints(root, key)}/{epoch_marker(e)}" for e in sorted(epochs, reverse=True)]
        for key, epochs in found.items()
    }
