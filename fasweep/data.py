"""Data sets as device-resident tensors: find or download, decode once into a uint8 cache, batch on the device.

`load_data(DataConfig)` returns a `TensorData` whose images stay uint8 NCHW on the training device;
`TensorData.batches` normalises (and, for training, randomly crops with 4-px padding and flips) whole
batches with tensor ops, so no per-sample Python runs in the training loop. Which data sets exist, and what
each needs, is `fasweep.datasets`: the code here reads a data set's record, never its name. Files are
untrusted: CIFAR pickles go through an allow-list unpickler, a file that fails to decode is one UserError
naming it, and the cache carries a checksum (a bad one is rebuilt).
"""

from __future__ import annotations

import errno
import fcntl
import gzip
import hashlib
import importlib.util
import logging
import math
import os
import pickle
import socket
import stat
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from PIL import Image

from fasweep.config import DataConfig
from fasweep.datasets import DATASETS, Dataset, is_user_data, user_dataset
from fasweep.errors import UserError
from fasweep.runs.layout import cache_dir, home_cache

log = logging.getLogger(__name__)

CACHE_VERSION = 2
CROP_PAD = 4
DOWNLOAD_TIMEOUT_S = 10.0
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm"}
DIGITS_CSV = Path("datasets/data/digits.csv.gz")  # inside the sklearn package
REGRESSION_SIZES = {"train": 10_000, "test": 2_000}

Split = Literal["train", "val", "test"]


@dataclass
class TensorData:
    """A whole data set on one device; images uint8 NCHW, regression inputs float32 (N, D)."""

    name: str
    task: Literal["classification", "regression"]
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_val: torch.Tensor | None
    y_val: torch.Tensor | None
    x_test: torch.Tensor
    y_test: torch.Tensor
    num_outputs: int
    input_shape: tuple[int, ...]
    classes: tuple[str, ...] | None = None
    augment: bool = False
    scale: torch.Tensor | None = None  # float = uint8 * scale + shift, per channel (1, C, 1, 1); None: as is
    shift: torch.Tensor | None = None

    def batches(
        self, split: Split, batch_size: int, *, shuffle: bool, generator: torch.Generator | None = None
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Yield (float inputs, targets) covering `split` once; train batches are augmented when enabled.

        Shuffling and augmentation draw from `generator` (on its device), so a seeded generator
        gives the same batches every time.
        """
        x, y = {
            "train": (self.x_train, self.y_train),
            "val": (self.x_val, self.y_val),
            "test": (self.x_test, self.y_test),
        }[split]
        if x is None or y is None:
            raise UserError.field("data.val_fraction", 0.0, "> 0 to draw validation batches")
        n = x.shape[0]
        order = None
        if shuffle:
            order = torch.randperm(n, generator=generator, device=_rng_device(generator, x)).to(x.device)
        augment = self.augment and split == "train"
        for start in range(0, n, batch_size):
            if order is None:
                xb, yb = x[start : start + batch_size], y[start : start + batch_size]
            else:
                idx = order[start : start + batch_size]
                xb, yb = x.index_select(0, idx), y.index_select(0, idx)
            if augment:
                xb = random_crop_flip(xb, CROP_PAD, generator)
            yield self._to_float(xb), yb

    def _to_float(self, xb: torch.Tensor) -> torch.Tensor:
        if self.scale is None or self.shift is None:
            return xb
        return xb.float().mul_(self.scale).add_(self.shift)


def _rng_device(generator: torch.Generator | None, x: torch.Tensor) -> torch.device:
    return generator.device if generator is not None else x.device


def random_crop_flip(x: torch.Tensor, pad: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """Per-sample random crop of an (N, C, H, W) batch zero-padded by `pad`, then a random horizontal flip.

    Same distribution as torchvision's RandomCrop(size, padding=pad) + RandomHorizontalFlip(), done
    for the whole batch as one pad and one gather from per-sample flat pixel indices.
    """
    n, c, h, w = x.shape
    dev = _rng_device(generator, x)
    oy, ox, flip = (
        torch.randint(0, high, (n, 1, 1), generator=generator, device=dev).to(x.device)
        for high in (2 * pad + 1, 2 * pad + 1, 2)
    )
    cols = torch.arange(w, device=x.device)
    cols = torch.where(flip.bool(), cols.flip(0), cols) + ox  # a flip after the crop reverses the chosen columns
    rows = oy + torch.arange(h, device=x.device)[:, None]
    index = (rows * (w + 2 * pad) + cols).view(n, 1, h * w).expand(n, c, h * w)
    padded = torch.nn.functional.pad(x, (pad, pad, pad, pad)).view(n, c, -1)
    return padded.gather(2, index).view(n, c, h, w)


@dataclass
class _Raw:
    """A data set as read from its source, on the CPU, before limits, split and device."""

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    classes: tuple[str, ...] | None
    mean: torch.Tensor | None = None  # per-channel statistics of the training images in [0, 1] units
    std: torch.Tensor | None = None
    pixel_max: float = 255.0


def load_data(cfg: DataConfig, device: str | torch.device = "cpu", seed: int = 0) -> TensorData:
    """Load the data set `cfg` names onto `device`; `seed` picks the validation split."""
    raw = _user_data(cfg) if is_user_data(cfg.name) else _LOADERS[DATASETS[cfg.name].source](cfg)
    return _assemble(cfg, raw, torch.device(device), seed)


def locate(cfg: DataConfig) -> str:
    """Where the data set `cfg` names comes from, checked without decoding it: `generated`, `bundled`, or the
    folder of a local copy (downloading one now when none is found and `data.download` allows it). A data set
    that is nowhere and cannot be downloaded is the one-line UserError a trial would raise."""
    if is_user_data(cfg.name):
        user_dataset(cfg.name)
        return "user"
    if DATASETS[cfg.name].source != "files":
        return DATASETS[cfg.name].source
    return str(_find_or_download(cfg).path)


def _assemble(cfg: DataConfig, raw: _Raw, device: torch.device, seed: int) -> TensorData:
    """Apply limits and the validation split, move to `device` and set up normalisation."""
    x_train, y_train = raw.x_train[: cfg.limit_train], raw.y_train[: cfg.limit_train]
    x_test, y_test = raw.x_test[: cfg.limit_test], raw.y_test[: cfg.limit_test]
    x_val = y_val = None
    if cfg.val_fraction > 0:
        n_val = max(1, round(cfg.val_fraction * x_train.shape[0]))
        if n_val >= x_train.shape[0]:
            raise UserError.field(
                "data.val_fraction", cfg.val_fraction, f"a fraction leaving training samples of {x_train.shape[0]}"
            )
        perm = torch.randperm(x_train.shape[0], generator=torch.Generator().manual_seed(seed))
        val_idx, train_idx = perm[:n_val].sort().values, perm[n_val:].sort().values
        x_val, y_val = x_train[val_idx].to(device), y_train[val_idx].to(device)
        x_train, y_train = x_train[train_idx], y_train[train_idx]
    regression = raw.classes is None
    scale = shift = None
    if not regression:
        mean = raw.mean if cfg.normalize and raw.mean is not None else torch.zeros(x_train.shape[1])
        std = raw.std if cfg.normalize and raw.std is not None else torch.ones(x_train.shape[1])
        scale = (1.0 / (raw.pixel_max * std)).float().view(1, -1, 1, 1).to(device)
        shift = (-mean / std).float().view(1, -1, 1, 1).to(device)
    default_augment = cfg.name in DATASETS and DATASETS[cfg.name].augment
    return TensorData(
        name=cfg.name,
        task="regression" if regression else "classification",
        x_train=x_train.to(device),
        y_train=y_train.to(device),
        x_val=x_val,
        y_val=y_val,
        x_test=x_test.to(device),
        y_test=y_test.to(device),
        num_outputs=raw.y_train.shape[1] if regression else len(raw.classes or ()),
        input_shape=tuple(raw.x_train.shape[1:]),
        classes=raw.classes,
        augment=default_augment if cfg.augment is None else cfg.augment,
        scale=scale,
        shift=shift,
    )


# --- generated and built-in data sets ---------------------------------------------------------------


def _regression(cfg: DataConfig) -> _Raw:
    """Lillicrap's tasks, fixed for every trial (the record's seed): `linear` y = T x, `teacher` a random tanh net.

    T has entries uniform in [-1, 1] (10x30); the teacher is 30-20-10 with N(0, 1/fan_in) weights.
    Inputs are x ~ N(0, I); 10,000 train and 2,000 test pairs.
    """
    if cfg.augment:
        raise UserError.field("data.augment", cfg.augment, f"false or null for the {cfg.name} regression task")
    task = DATASETS[cfg.name]
    assert task.input_shape is not None and task.targets is not None  # every generated task declares both
    (d_in,), d_hidden, d_out = task.input_shape, task.hidden, task.targets
    g = torch.Generator().manual_seed(task.seed)
    if not d_hidden:
        t = torch.rand(d_out, d_in, generator=g) * 2 - 1

        def target(x: torch.Tensor) -> torch.Tensor:
            return x @ t.T
    else:
        w1 = torch.randn(d_hidden, d_in, generator=g) / math.sqrt(d_in)
        w2 = torch.randn(d_out, d_hidden, generator=g) / math.sqrt(d_hidden)

        def target(x: torch.Tensor) -> torch.Tensor:
            return torch.tanh(x @ w1.T) @ w2.T

    x_train = torch.randn(REGRESSION_SIZES["train"], d_in, generator=g)
    x_test = torch.randn(REGRESSION_SIZES["test"], d_in, generator=g)
    return _Raw(x_train, target(x_train), x_test, target(x_test), classes=None)


def _digits(cfg: DataConfig) -> _Raw:
    """scikit-learn's 8x8 digits (values 0..16) as 1x8x8 uint8; the last 297 images are the test set.

    Read from the CSV scikit-learn ships, as its `load_digits` does, without importing scikit-learn (about 2 s
    of a worker's start)."""
    found = importlib.util.find_spec("sklearn")
    folders = (found.submodule_search_locations or []) if found else []
    path = next((p for p in (Path(f) / DIGITS_CSV for f in folders) if p.is_file()), None)
    if path is None:
        raise UserError.field("data.name", cfg.name, "scikit-learn installed: it ships the digits")
    with gzip.open(path, "rt", encoding="utf-8") as f:
        table = np.loadtxt(f, delimiter=",")
    x = torch.from_numpy(table[:, :-1].reshape(-1, 1, 8, 8).astype(np.uint8))
    y = torch.from_numpy(table[:, -1].astype(np.int64))
    n_train = 1500
    return _with_stats(
        _Raw(x[:n_train], y[:n_train], x[n_train:], y[n_train:], DATASETS[cfg.name].class_names), pixel_max=16.0
    )


def _with_stats(raw: _Raw, pixel_max: float = 255.0, chunk: int = 4096) -> _Raw:
    """Fill in the per-channel mean/std of the training images (in units of `pixel_max`)."""
    total = torch.zeros(raw.x_train.shape[1], dtype=torch.float64)
    squares = torch.zeros_like(total)
    for start in range(0, raw.x_train.shape[0], chunk):
        part = raw.x_train[start : start + chunk].double() / pixel_max
        total += part.sum(dim=(0, 2, 3))
        squares += part.square().sum(dim=(0, 2, 3))
    count = raw.x_train.numel() / raw.x_train.shape[1]
    raw.mean = total / count
    raw.std = (squares / count - raw.mean.square()).clamp_min(1e-12).sqrt()
    raw.pixel_max = pixel_max
    return raw


def _user_data(cfg: DataConfig) -> _Raw:
    """A user's data set (`fasweep.datasets.user_dataset`) read once, in the form of fasweep's own: images
    (N, C, H, W) (uint8 0-255, or float; (N, H, W) gets a channel) with int64 class labels, or inputs (N, D)
    with float targets (N, D) for regression."""
    got = user_dataset(cfg.name)(root=cfg.root)
    expected = "(x_train, y_train, x_test, y_test) tensors or (train, test) torchvision-style data sets"
    if isinstance(got, tuple | list) and len(got) == 2:
        got = (*_from_dataset(got[0]), *_from_dataset(got[1]))
    if not (isinstance(got, tuple | list) and len(got) == 4 and all(isinstance(t, torch.Tensor) for t in got)):
        raise UserError.field("data.name", cfg.name, f"a function returning {expected}, not {type(got).__name__}")
    x_train, y_train, x_test, y_test = got
    if y_train.is_floating_point():  # regression
        return _Raw(x_train.float(), y_train.float(), x_test.float(), y_test.float(), classes=None)
    x_train, x_test = (x.unsqueeze(1) if x.dim() == 3 else x for x in (x_train, x_test))
    if x_train.dim() != 4 or x_test.shape[1:] != x_train.shape[1:]:
        shape = f"images (N, C, H, W) for class labels; got {tuple(x_train.shape)} and {tuple(x_test.shape)}"
        raise UserError.field("data.name", cfg.name, shape)
    classes = tuple(str(c) for c in range(int(max(y_train.max(), y_test.max())) + 1))
    pixel_max = 255.0 if x_train.dtype == torch.uint8 else 1.0
    raw = _Raw(x_train, y_train.long(), x_test.to(x_train.dtype), y_test.long(), classes)
    return _with_stats(raw, pixel_max=pixel_max)


def _from_dataset(ds: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """(inputs, labels) of a torchvision-style data set (`ds[i]` is (PIL image or tensor, label)), read whole."""
    xs, ys = [], []
    for i in range(len(ds)):
        x, y = ds[i]
        if isinstance(x, Image.Image):
            array = np.asarray(x, dtype=np.uint8)
            x = torch.from_numpy(array.copy()).permute(2, 0, 1) if array.ndim == 3 else torch.from_numpy(array.copy())
        xs.append(torch.as_tensor(x))
        ys.append(torch.as_tensor(y))
    return torch.stack(xs), torch.stack(ys)


# --- finding a local copy, or downloading one -------------------------------------------------------


@dataclass(frozen=True)
class _Source:
    """A local copy: `kind` says which reader decodes it."""

    kind: Literal["cifar_pickle", "idx", "folder"]
    path: Path


def _search_dirs(cfg: DataConfig) -> list[tuple[Path, bool]]:
    """The folders that may hold data set `cfg.name`, in order, each with whether it is a bare base folder.

    In a bare base (`./data`, `$FASWEEP_DATA_DIR`) only torchvision's own sub-folder counts, since raw
    files or a `train/` folder there could belong to any data set (MNIST and Fashion-MNIST share file names).
    """
    if cfg.root is not None:
        return [(Path(cfg.root).expanduser(), False)]
    bases = [Path(p) for p in [os.environ.get("FASWEEP_DATA_DIR")] if p]
    bases += [Path("data").absolute(), home_cache() / "data"]
    dirs = [pair for base in bases for pair in ((base / cfg.name, False), (base, True))]
    apt_dir = DATASETS[cfg.name].apt_dir
    if apt_dir is not None:
        dirs.append((Path(apt_dir), False))
    return dirs


def _holds(where: Path, dataset: Dataset) -> bool:
    """Whether `where` holds `dataset`'s own files: every one of its marker files (an IDX file may be gzipped)."""
    if dataset.layout == "idx":
        return all(_idx_file(where, stem) is not None for stem in dataset.marker_files)
    return all((where / file).is_file() for file in dataset.marker_files)


def _probe(name: str, folder: Path, bare: bool) -> _Source | None:
    """The copy of `name` inside `folder`: torchvision's layout, its raw files, or train/<class>/ images."""
    dataset = DATASETS[name]
    candidates = [folder / dataset.torchvision_dir] if dataset.torchvision_dir else []
    for where in candidates + ([] if bare else [folder]):
        if dataset.layout is not None and _holds(where, dataset):
            return _Source(dataset.layout, where)
    if not bare and (folder / "train").is_dir():
        return _Source("folder", folder)
    return None


def _locate(cfg: DataConfig) -> _Source | None:
    for folder, bare in _search_dirs(cfg):
        found = _probe(cfg.name, folder, bare)
        if found is not None:
            return found
    return None


def _missing(cfg: DataConfig, failure: str = "") -> UserError:
    """The one-line error for a data set that is nowhere to be found."""
    dataset = DATASETS[cfg.name]
    if dataset.layout is None:  # no files of its own: any image folder, found only at `data.root`
        return UserError.field("data.root", cfg.root, "a folder holding train/<class>/* and test/<class>/* images")
    places = ", ".join(str(d) for d, _ in _search_dirs(cfg))
    if cfg.root is None and not os.environ.get("FASWEEP_DATA_DIR"):
        places += " ($FASWEEP_DATA_DIR unset)"
    fixes = ["set data.root=DIR (torchvision layout, raw files or train/<class>/ image folder)"]
    if dataset.apt_package is not None:
        fixes.append(f"apt-get install {dataset.apt_package}")
    if failure:
        fixes.append("or download it on a machine that is online")
    else:
        fixes.append("or allow a download (data.download=true, needs network)")
    lead = f"download failed ({failure}); " if failure else ""
    return UserError(f"data.name={cfg.name!r}: {lead}no local copy found in {places}; fix: {', '.join(fixes)}")


_KINDS = {  # what a `data.root` that is no folder is
    stat.S_ISREG: "a file",
    stat.S_ISCHR: "a character device",
    stat.S_ISBLK: "a block device",
    stat.S_ISFIFO: "a named pipe",
    stat.S_ISSOCK: "a socket",
}


def _check_root(cfg: DataConfig) -> None:
    """A one-line UserError when `data.root` is there but is no folder (a file, a device, a symbolic link loop)
    or cannot be looked at: what is wrong with the path, rather than a failed search or download."""
    if cfg.root is None or "://" in cfg.root:
        return
    root = Path(cfg.root).expanduser()
    try:
        mode = root.stat().st_mode
        what = next((name for test, name in _KINDS.items() if test(mode)), None)
    except FileNotFoundError:
        return  # not there yet: searched, then downloaded into
    except OSError as exc:
        what = "a symbolic link loop" if exc.errno == errno.ELOOP else f"not accessible ({exc.strerror})"
    if what is not None:
        raise UserError.field(
            "data.root", cfg.root, f"a folder holding {cfg.name} (or one to download it into); {root} is {what}"
        )


def _find_or_download(cfg: DataConfig) -> _Source:
    _check_root(cfg)
    found = _locate(cfg)
    if found is not None:
        return found
    if not cfg.download or DATASETS[cfg.name].torchvision_class is None:
        raise _missing(cfg)
    base = os.environ.get("FASWEEP_DATA_DIR") or home_cache() / "data"
    dest = Path(cfg.root).expanduser() if cfg.root else Path(base) / cfg.name
    _download(cfg, dest)
    found = _locate(cfg)
    if found is None:
        raise _missing(cfg, f"nothing usable in {dest} after the download")
    return found


def _download(cfg: DataConfig, dest: Path) -> None:
    """torchvision's download into `dest`, failing fast (short socket timeout) when offline."""
    from torchvision import datasets

    cls = getattr(datasets, str(DATASETS[cfg.name].torchvision_class))
    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(DOWNLOAD_TIMEOUT_S)
    try:
        dest.mkdir(parents=True, exist_ok=True)
        cls(str(dest), train=True, download=True)
    except (OSError, RuntimeError, ValueError) as exc:
        reason = " ".join(str(exc).split()) or exc.__class__.__name__
        raise _missing(cfg, reason) from None
    finally:
        socket.setdefaulttimeout(previous)


# --- decoding and the uint8 cache --------------------------------------------------------------------


def _cache_key(name: str, source: _Source) -> str:
    """A digest of the source: files' size and mtime; for image folders the mtime of every (class) folder.

    A folder's mtime changes when files are added, removed or renamed in it (not when one is rewritten).
    """
    if source.kind == "folder":
        entries = [p for split in ("train", "test") for p in [source.path / split, *_class_dirs(source.path / split)]]
    else:
        entries = sorted(p for p in source.path.iterdir() if p.is_file())
    parts = [f"v{CACHE_VERSION}", name, source.kind, str(source.path.resolve())]
    for p in entries:
        st = p.stat()
        parts.append(f"{p.name}:{st.st_size}:{st.st_mtime_ns}")
    return hashlib.sha1("\n".join(parts).encode()).hexdigest()[:16]


def _checksum(raw: _Raw) -> str:
    """SHA-256 of every field of `raw` (tensors: dtype, shape and bytes)."""
    digest = hashlib.sha256()
    for field in fields(raw):
        value = getattr(raw, field.name)
        digest.update(field.name.encode())
        if isinstance(value, torch.Tensor):
            digest.update(f"{value.dtype}{tuple(value.shape)}".encode())
            digest.update(memoryview(np.ascontiguousarray(value.numpy())).cast("B"))
        else:
            digest.update(repr(value).encode())
    return digest.hexdigest()


def _read_cache(path: Path) -> _Raw | None:
    """The data cached at `path`; None when there is none, or it is unreadable or fails its checksum."""
    if not path.exists():
        return None
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)
        raw = _Raw(**saved["raw"])
        raw.classes = None if raw.classes is None else tuple(raw.classes)
        problem = "" if saved["sha256"] == _checksum(raw) else "its checksum does not match"
    except Exception as exc:  # a truncated or overwritten file fails in many ways: each means "rebuild"
        problem = f"it is unreadable ({exc.__class__.__name__})"
    if problem:
        log.warning("data cache %s is corrupt: %s; rebuilding it", path, problem)
        return None
    return raw


def _cached(cfg: DataConfig) -> _Raw:
    """Decode the located source once into a checksummed uint8 cache file; later calls (any process) load it."""
    source = _find_or_download(cfg)
    path = cache_dir() / f"{cfg.name}-{_cache_key(cfg.name, source)}.pt"
    raw = _read_cache(path)
    if raw is not None:
        return raw
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_suffix(".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # concurrent trials: one decodes, the others wait and load
        raw = _read_cache(path)  # written meanwhile by another process?
        if raw is None:
            start = time.perf_counter()
            raw = _decode(cfg.name, source)
            tmp = path.with_suffix(f".tmp{os.getpid()}")
            torch.save({"raw": raw.__dict__, "sha256": _checksum(raw)}, tmp)
            os.replace(tmp, path)
            log.info(
                "decoded %s from %s in %.1f s, cached at %s", cfg.name, source.path, time.perf_counter() - start, path
            )
    return raw


_LOADERS: dict[str, Callable[[DataConfig], _Raw]] = {"generated": _regression, "bundled": _digits, "files": _cached}


def _decode(name: str, source: _Source) -> _Raw:
    readers: dict[str, Callable[[Path], _Raw]] = {
        "cifar_pickle": _read_cifar_pickle,
        "idx": lambda p: _read_idx(DATASETS[name].class_names or (), p),
        "folder": _read_folder,
    }
    raw = readers[source.kind](source.path)
    expected = DATASETS[name].classes
    if expected is not None and len(raw.classes or ()) != expected:
        raise UserError.field(
            "data.root", str(source.path), f"{expected} classes for {name}, found {len(raw.classes or ())}"
        )
    return _with_stats(raw)


class _CifarUnpickler(pickle.Unpickler):
    """Unpickles only what CIFAR's python batches hold: dicts, lists, str, bytes, numbers and numpy arrays.

    Any other global (the way a crafted pickle calls `os.system` and the like) is refused before it is looked up.
    """

    ALLOWED = frozenset(
        {
            ("numpy", "ndarray"),
            ("numpy", "dtype"),
            *((f"numpy.{core}.multiarray", f) for core in ("core", "_core") for f in ("_reconstruct", "scalar")),
            *((f"numpy.{core}.numeric", "_frombuffer") for core in ("core", "_core")),  # protocol 5 arrays
            ("_codecs", "encode"),  # bytes in a protocol-2 pickle written by Python 3
        }
    )

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"it refers to {module}.{name}")
        return super().find_class(module, name)


def _unpickle_cifar(path: Path, keys: tuple[str, ...]) -> dict[str, Any]:
    """One CIFAR python pickle holding a dict with `keys`; a crafted or broken file is one UserError naming it."""
    expected = f"a CIFAR python pickle of arrays, lists, str and numbers with keys {', '.join(keys)}"
    try:
        with open(path, "rb") as fh:
            batch = _CifarUnpickler(fh, encoding="latin1").load()
    except Exception as exc:  # untrusted bytes: anything that fails to parse is a bad file
        reason = " ".join(str(exc).split()) or exc.__class__.__name__
        raise UserError.field("data.root", str(path), f"{expected} ({reason})") from None
    if not isinstance(batch, dict) or any(k not in batch for k in keys):
        raise UserError.field("data.root", str(path), expected)
    return batch


def _read_cifar_pickle(folder: Path) -> _Raw:
    """CIFAR-10/100 in the python pickle layout (`cifar-10-batches-py` / `cifar-100-python`)."""
    if (folder / "data_batch_1").is_file():
        train_files, test_file, meta_file = [f"data_batch_{i}" for i in range(1, 6)], "test_batch", "batches.meta"
        label_key, names_key = "labels", "label_names"
    else:
        train_files, test_file, meta_file = ["train"], "test", "meta"
        label_key, names_key = "fine_labels", "fine_label_names"

    def tensors(files: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        xs, ys = [], []
        for file in files:
            batch = _unpickle_cifar(folder / file, ("data", label_key))
            try:
                x = np.asarray(batch["data"], dtype=np.uint8).reshape(-1, 3, 32, 32)
                y = np.asarray(batch[label_key], dtype=np.int64).reshape(-1)
                if len(x) != len(y):
                    raise ValueError(f"{len(x)} images, {len(y)} labels")
            except (ValueError, TypeError) as exc:
                expected = f"rows of 3x32x32 uint8 pixels and one label each ({exc})"
                raise UserError.field("data.root", str(folder / file), expected) from None
            xs.append(x)
            ys.append(y)
        return torch.from_numpy(np.concatenate(xs)), torch.from_numpy(np.concatenate(ys))

    x_train, y_train = tensors(train_files)
    x_test, y_test = tensors([test_file])
    names = _unpickle_cifar(folder / meta_file, (names_key,))[names_key]
    return _Raw(x_train, y_train, x_test, y_test, tuple(str(n) for n in names))


def _idx_file(folder: Path, stem: str) -> Path | None:
    for candidate in (folder / stem, folder / f"{stem}.gz"):
        if candidate.is_file():
            return candidate
    return None


def _read_idx_array(path: Path) -> np.ndarray:
    """One IDX file (optionally gzipped): big-endian dims after a 4-byte magic whose last byte is ndim."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as fh:
        data = fh.read()
    ndim = data[3]
    dims = np.frombuffer(data, dtype=">i4", count=ndim, offset=4)
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims)


def _read_idx(classes: tuple[str, ...], folder: Path) -> _Raw:
    """MNIST / Fashion-MNIST (labels 0.. naming `classes`) from their IDX files (`train-images-idx3-ubyte[.gz]`,
    `t10k-...`)."""
    arrays = {}
    for split in ("train", "t10k"):
        for part in ("images-idx3", "labels-idx1"):
            path = _idx_file(folder, f"{split}-{part}-ubyte")
            if path is None:
                raise UserError.field("data.root", str(folder), f"{split}-{part}-ubyte[.gz] beside the training images")
            arrays[split, part] = torch.from_numpy(_read_idx_array(path).copy())
    return _Raw(
        arrays["train", "images-idx3"].unsqueeze(1),
        arrays["train", "labels-idx1"].long(),
        arrays["t10k", "images-idx3"].unsqueeze(1),
        arrays["t10k", "labels-idx1"].long(),
        classes,
    )


def _class_dirs(split_dir: Path) -> list[Path]:
    return sorted(p for p in split_dir.iterdir() if p.is_dir() and not p.name.startswith("."))


def _read_folder(root: Path) -> _Raw:
    """An image folder `train/<class>/*`, `test/<class>/*` (classes in sorted order, as torchvision's ImageFolder).

    All images must share one size; grey images stay one channel, anything else becomes RGB. Each
    split is stored in a fixed shuffled order (seed 0) so that `limit_*` takes a mix of classes.
    """
    if not (root / "test").is_dir():
        raise UserError.field("data.root", str(root), "a test/<class>/ folder beside train/<class>/")
    classes = tuple(p.name for p in _class_dirs(root / "train"))
    if len(classes) < 2:
        raise UserError.field("data.root", str(root), f"at least 2 class folders under train/ (found {list(classes)})")
    unknown = sorted({p.name for p in _class_dirs(root / "test")} - set(classes))
    if unknown:
        raise UserError.field("data.root", str(root), f"test classes that also exist in train/ (extra: {unknown})")
    splits = {}
    for split in ("train", "test"):
        files, labels = [], []
        for label, cls in enumerate(classes):
            folder = root / split / cls
            names = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES) if folder.is_dir() else []
            files += names
            labels += [label] * len(names)
        if not files:
            raise UserError.field("data.root", str(root), f"image files under {split}/<class>/")
        order = torch.randperm(len(files), generator=torch.Generator().manual_seed(0))
        splits[split] = (_decode_images([files[i] for i in order]), torch.tensor(labels, dtype=torch.int64)[order])
    return _Raw(*splits["train"], *splits["test"], classes)


def _read_image(path: Path, mode: str | None = None) -> Image.Image:
    """`path` decoded in full (converted to `mode` if given); a file PIL cannot decode is a UserError naming it."""
    try:
        with Image.open(path) as img:
            img.load()
            return img if mode is None else img.convert(mode)
    except Exception as exc:  # untrusted bytes: any decoder failure (truncated, not an image, a bomb) is a bad file
        reason = " ".join(str(exc).split()) or exc.__class__.__name__
        raise UserError.field("data.root", str(path), f"a readable image file ({reason})") from None


def _decode_images(files: list[Path], chunk: int = 1024) -> torch.Tensor:
    """Decode image files into one (N, C, H, W) uint8 tensor with a thread pool (PIL releases the GIL)."""
    first = _read_image(files[0])
    mode = "L" if first.mode in ("1", "L", "I;16", "I") else "RGB"
    width, height = first.size
    channels = 1 if mode == "L" else 3
    out = np.empty((len(files), height, width, channels), dtype=np.uint8)

    def decode(start: int) -> None:
        for i in range(start, min(start + chunk, len(files))):
            img = _read_image(files[i], mode)
            if img.size != (width, height):
                raise UserError.field("data.root", str(files[i]), f"every image {width}x{height} px")
            out[i] = np.asarray(img).reshape(out.shape[1:])

    with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        list(pool.map(decode, range(0, len(files), chunk)))  # list() re-raises a worker's error
    return torch.from_numpy(out).permute(0, 3, 1, 2).contiguous()
