"""fasweep.data on real data: digits, Debian Fashion-MNIST, the CIFAR-10 image folder, PNG folders, generated tasks."""

from __future__ import annotations

import gzip
import io
import logging
import math
import os
import pickle
import shutil
import socket
import struct
import subprocess
import sys
import urllib.request
from dataclasses import replace
from pathlib import Path
from typing import ClassVar

import numpy as np
import pytest
import torch
from PIL import Image
from sklearn.datasets import load_digits

from fasweep import data as data_module
from fasweep.config import DataConfig
from fasweep.data import load_data, locate, random_crop_flip
from fasweep.datasets import DATASETS
from fasweep.errors import UserError
from fasweep.runs.layout import cache_dir


@pytest.fixture(autouse=True)
def isolated(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A private cache, an empty home and working directory, no $FASWEEP_DATA_DIR."""
    monkeypatch.setenv("FASWEEP_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv("FASWEEP_DATA_DIR", raising=False)
    (tmp_path / "work").mkdir()
    monkeypatch.chdir(tmp_path / "work")
    return tmp_path


def rows(x: torch.Tensor) -> list[bytes]:
    """Each sample as bytes, sorted: equal lists mean equal multisets of samples."""
    return sorted(r.numpy().tobytes() for r in x.reshape(x.shape[0], -1))


def test_digits_shapes_classes_and_pixels() -> None:
    data = load_data(DataConfig(name="digits"))
    bunch = load_digits()
    assert (data.task, data.num_outputs, data.input_shape) == ("classification", 10, (1, 8, 8))
    assert data.x_train.shape == (1500, 1, 8, 8) and data.x_test.shape == (297, 1, 8, 8)
    assert data.x_train.dtype == torch.uint8 and data.y_train.dtype == torch.int64
    assert data.classes == tuple(str(i) for i in range(10)) and not data.augment
    assert np.array_equal(torch.cat([data.x_train, data.x_test])[:, 0].numpy(), bunch.images)  # 0..16: exact
    assert np.array_equal(torch.cat([data.y_train, data.y_test]).numpy(), bunch.target)
    limited = load_data(DataConfig(name="digits", limit_train=100, limit_test=10))
    assert (limited.x_train.shape[0], limited.x_test.shape[0]) == (100, 10)


def test_digits_are_read_without_importing_sklearn(monkeypatch: pytest.MonkeyPatch) -> None:
    code = "import sys; from fasweep.config import DataConfig; from fasweep.data import load_data"
    code += "; load_data(DataConfig(name='digits')); print('sklearn' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
    monkeypatch.setitem(sys.modules, "sklearn", None)  # blocked, as if scikit-learn were not installed
    with pytest.raises(UserError, match=r"data.name: got 'digits'; expected scikit-learn installed"):
        load_data(DataConfig(name="digits"))


def test_fashion_mnist_from_debian_files_matches_torchvision(fashion_mnist_root: Path, isolated: Path) -> None:
    data = load_data(DataConfig(name="fashion_mnist", download=False))
    assert data.x_train.shape == (60_000, 1, 28, 28) and data.x_test.shape == (10_000, 1, 28, 28)
    assert data.x_train.dtype == torch.uint8 and data.num_outputs == 10
    assert sorted(data.y_train.unique().tolist()) == list(range(10))
    # torchvision's own reader, on the un-gzipped files in its layout, must agree pixel for pixel
    raw = isolated / "tv" / "FashionMNIST" / "raw"
    raw.mkdir(parents=True)
    for gz in fashion_mnist_root.glob("*-ubyte.gz"):
        (raw / gz.stem).write_bytes(gzip.decompress(gz.read_bytes()))
    from torchvision.datasets import FashionMNIST

    reference = FashionMNIST(str(isolated / "tv"), train=False, download=False)
    assert torch.equal(data.x_test[:, 0], reference.data) and torch.equal(data.y_test, reference.targets)
    via_layout = load_data(DataConfig(name="fashion_mnist", root=str(isolated / "tv"), download=False))
    assert torch.equal(via_layout.x_train, data.x_train)


def small_cifar(src: Path, dest: Path, n_train: int = 6, n_test: int = 2) -> Path:
    """A copy of a few real CIFAR-10 JPEGs per class, in the image-folder layout."""
    for split, n in (("train", n_train), ("test", n_test)):
        for cls in sorted(p.name for p in (src / split).iterdir()):
            (dest / split / cls).mkdir(parents=True)
            for f in sorted((src / split / cls).iterdir())[:n]:
                shutil.copy(f, dest / split / cls / f.name)
    return dest


def decode_folder(split_dir: Path, classes: tuple[str, ...], mode: str) -> tuple[list[bytes], list[int]]:
    """Independent decode with PIL: sorted sample bytes and the label counts."""
    images, labels = [], []
    for label, cls in enumerate(classes):
        for f in sorted((split_dir / cls).iterdir()):
            arr = np.array(Image.open(f).convert(mode))
            images.append(torch.from_numpy(arr.reshape(arr.shape[0], arr.shape[1], -1)).permute(2, 0, 1).contiguous())
            labels.append(label)
    return rows(torch.stack(images)), np.bincount(labels).tolist()


def test_cifar10_image_folder(cifar10_root: Path, isolated: Path) -> None:
    root = small_cifar(cifar10_root, isolated / "cifar")
    data = load_data(DataConfig(name="cifar10", root=str(root), download=False))
    assert data.x_train.shape == (60, 3, 32, 32) and data.x_test.shape == (20, 3, 32, 32)
    assert data.classes is not None and data.classes[:2] == ("airplane", "automobile") and data.augment
    expected, counts = decode_folder(root / "train", data.classes, "RGB")
    assert rows(data.x_train) == expected and np.bincount(data.y_train.numpy()).tolist() == counts
    assert data.y_train[:10].unique().numel() > 2, "stored order mixes classes, so limit_train takes several"


@pytest.mark.slow
def test_cifar10_full_decode(cifar10_root: Path) -> None:
    data = load_data(DataConfig(name="cifar10", root=str(cifar10_root), download=False))
    assert data.x_train.shape == (50_000, 3, 32, 32) and data.x_test.shape == (10_000, 3, 32, 32)
    assert np.bincount(data.y_train.numpy()).tolist() == [5000] * 10
    test_mean = (data.x_test.double() / 255).mean(dim=(0, 2, 3))
    assert torch.allclose(test_mean, torch.tensor([0.494, 0.485, 0.450], dtype=torch.float64), atol=2e-3)


def write_png_folder(root: Path, classes: tuple[int, ...] = (3, 5, 8)) -> Path:
    """Real digit images scaled to 0..255, written as grey PNGs under train/ and test/ by class name."""
    bunch = load_digits()
    for label in classes:
        images = bunch.images[bunch.target == label]
        for split, part in (("train", images[:5]), ("test", images[5:7])):
            (root / split / f"digit{label}").mkdir(parents=True, exist_ok=True)
            for i, img in enumerate(part):
                Image.fromarray((img * 15).astype(np.uint8), mode="L").save(root / split / f"digit{label}" / f"{i}.png")
    return root


def test_imagefolder_of_pngs(isolated: Path) -> None:
    root = write_png_folder(isolated / "pngs")
    data = load_data(DataConfig(name="imagefolder", root=str(root)))
    assert data.classes == ("digit3", "digit5", "digit8") and data.num_outputs == 3
    assert data.x_train.shape == (15, 1, 8, 8) and data.x_test.shape == (6, 1, 8, 8) and not data.augment
    expected, counts = decode_folder(root / "test", data.classes, "L")
    assert rows(data.x_test) == expected and np.bincount(data.y_test.numpy()).tolist() == counts

    Image.new("L", (9, 8)).save(root / "train" / "digit3" / "odd.png")
    with pytest.raises(UserError, match=r"data\.root: got '.*odd\.png'; expected every image 8x8 px"):
        load_data(DataConfig(name="imagefolder", root=str(root)))
    with pytest.raises(UserError, match=r"data\.root: got None"):
        load_data(DataConfig(name="imagefolder"))


def test_cache_is_used_and_invalidated(isolated: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = write_png_folder(isolated / "pngs")
    cfg = DataConfig(name="imagefolder", root=str(root))
    first = load_data(cfg)
    with monkeypatch.context() as patch:
        patch.setattr(data_module, "_decode", lambda *_: pytest.fail("decoded again instead of using the cache"))
        assert torch.equal(load_data(cfg).x_train, first.x_train)

    shutil.copy(root / "train" / "digit3" / "0.png", root / "train" / "digit3" / "new.png")
    changed = load_data(cfg)  # a new file changes the folder, so the cache is rebuilt from the images
    assert changed.x_train.shape[0] == 16 and len(list(cache_dir().glob("imagefolder-*.pt"))) == 2


# --- hostile and broken files ----------------------------------------------------------------------------


class Py2Pickler(pickle._Pickler):
    """Protocol 2 with bytes as Python 2 `str` and numpy 1's module names, as in the real CIFAR files."""

    dispatch: ClassVar[dict] = dict(pickle._Pickler.dispatch)

    def save_bytes(self, obj: bytes) -> None:
        self.write(pickle.BINSTRING + struct.pack("<i", len(obj)) + obj)
        self.memoize(obj)

    dispatch[bytes] = save_bytes


def dumps(obj: object, protocol: int | str) -> bytes:
    if protocol == "py2":
        buffer = io.BytesIO()
        Py2Pickler(buffer, protocol=2).dump(obj)
        return buffer.getvalue().replace(b"numpy._core.", b"numpy.core.")
    return pickle.dumps(obj, protocol=protocol)


def write_cifar10_pickles(folder: Path, protocol: int | str, n: int = 3) -> Path:
    """CIFAR-10's python layout with `n` random images per batch: 5 train batches, a test batch, the meta file."""
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True)
    for file in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batch = {
            "batch_label": file,
            "data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
            "labels": rng.integers(0, 10, n).tolist(),
            "filenames": [f"{file}_{i}.png" for i in range(n)],
        }
        (folder / file).write_bytes(dumps(batch, protocol))
    meta = {"label_names": [f"class{i}" for i in range(10)], "num_vis": 3072}
    (folder / "batches.meta").write_bytes(dumps(meta, protocol))
    return folder


@pytest.mark.parametrize("protocol", ["py2", 2, pickle.HIGHEST_PROTOCOL])
def test_cifar_pickles_load_through_the_restricted_unpickler(isolated: Path, protocol: int | str) -> None:
    root = write_cifar10_pickles(isolated / "cifar-10-batches-py", protocol)
    data = load_data(DataConfig(name="cifar10", root=str(root), download=False))
    batches = [pickle.loads((root / f"data_batch_{i}").read_bytes(), encoding="latin1") for i in range(1, 6)]
    x = np.concatenate([b["data"] for b in batches]).reshape(-1, 3, 32, 32)
    assert np.array_equal(data.x_train.numpy(), x)
    assert data.y_train.tolist() == [label for b in batches for label in b["labels"]]
    assert data.classes == tuple(f"class{i}" for i in range(10))


class _Payload:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return os.system, (f"touch {self.marker}",)


def test_crafted_cifar_pickle_runs_nothing(isolated: Path) -> None:
    root = write_cifar10_pickles(isolated / "cifar-10-batches-py", 2)
    marker = isolated / "pwned"
    crafted = {"data": np.zeros((3, 3072), np.uint8), "labels": [0, 1, 2], "x": _Payload(marker)}
    (root / "data_batch_1").write_bytes(pickle.dumps(crafted, protocol=2))
    with pytest.raises(UserError) as err:
        load_data(DataConfig(name="cifar10", root=str(root), download=False))
    assert not marker.exists()
    assert_one_line_naming(err.value, f"data.root: got '{root / 'data_batch_1'}'", "refers to posix.system")
    (root / "data_batch_1").write_bytes(b"\x80\x02}q\x00(X")  # a truncated pickle: one line too
    with pytest.raises(UserError) as err:
        load_data(DataConfig(name="cifar10", root=str(root), download=False))
    assert_one_line_naming(err.value, str(root / "data_batch_1"), "a CIFAR python pickle")


@pytest.mark.parametrize("damage", ["truncate", "zero"])
def test_corrupt_cache_is_rebuilt(isolated: Path, damage: str, caplog: pytest.LogCaptureFixture) -> None:
    root = write_cifar10_pickles(isolated / "cifar-10-batches-py", 2, n=40)
    cfg = DataConfig(name="cifar10", root=str(root), download=False)
    clean = load_data(cfg)
    (cached,) = cache_dir().glob("cifar10-*.pt")
    blob = bytearray(cached.read_bytes())
    if damage == "truncate":
        del blob[len(blob) // 2 :]
    else:  # zero pixels inside the stored tensor: the file still loads, only the checksum can tell
        start = blob.find(clean.x_train.numpy().tobytes()[:64])
        assert start > 0
        blob[start + 1000 : start + 5000] = bytes(4000)
    cached.write_bytes(bytes(blob))
    with caplog.at_level(logging.WARNING, logger="fasweep.data"):
        again = load_data(cfg)
    assert ("checksum does not match" if damage == "zero" else "unreadable") in caplog.text
    assert "rebuilding" in caplog.text
    for name in ("x_train", "y_train", "x_test", "y_test", "scale", "shift"):
        assert torch.equal(getattr(again, name), getattr(clean, name)), name
    caplog.clear()
    assert torch.equal(load_data(cfg).x_train, clean.x_train) and "corrupt" not in caplog.text  # repaired


def test_corrupt_images_name_the_file(isolated: Path) -> None:
    root = write_png_folder(isolated / "pngs")
    bad = root / "train" / "digit5" / "junk.jpg"
    bad.write_bytes(b"not an image at all")
    with pytest.raises(UserError) as err:
        load_data(DataConfig(name="imagefolder", root=str(root)))
    assert_one_line_naming(err.value, f"data.root: got '{bad}'; expected a readable image file")
    buffer = io.BytesIO()
    Image.fromarray(np.full((8, 8), 7, np.uint8), mode="L").save(buffer, format="JPEG")
    bad.write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])  # a JPEG cut short
    with pytest.raises(UserError) as err:
        load_data(DataConfig(name="imagefolder", root=str(root)))
    assert_one_line_naming(err.value, f"data.root: got '{bad}'; expected a readable image file (Truncated")


def test_image_folder_with_one_class_is_an_error(isolated: Path) -> None:
    root = write_png_folder(isolated / "pngs", classes=(3,))
    with pytest.raises(UserError) as err:
        load_data(DataConfig(name="imagefolder", root=str(root)))
    assert_one_line_naming(err.value, "data.root", "at least 2 class folders under train/", "digit3")


@pytest.mark.parametrize("name", sorted(DATASETS))
def test_every_registered_name_loads_or_says_where_it_looked(name: str) -> None:
    try:
        data = load_data(DataConfig(name=name, download=False))
    except UserError as err:
        assert DATASETS[name].source == "files" and "\n" not in str(err)
    else:
        assert data.name == name and (DATASETS[name].classes in (None, data.num_outputs))


def test_records_agree_with_torchvision_and_themselves() -> None:
    """Each record's torchvision class is torchvision's, and its folder is where that class keeps the files; a
    record with files of its own names the files that tell them; class names, where declared, number its classes."""
    from torchvision import datasets

    for name, record in DATASETS.items():
        assert (record.layout is None) == (not record.marker_files), name
        assert record.class_names is None or len(record.class_names) == record.classes, name
        if record.torchvision_class is None:
            continue
        cls = getattr(datasets, record.torchvision_class)
        folder = getattr(cls, "base_folder", f"{cls.__name__}/raw")  # CIFAR: base_folder; MNIST-likes: <class>/raw
        assert record.torchvision_dir == folder, name


def test_a_new_data_set_is_one_record(fashion_mnist_root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A record added to the registry, and nothing else, is validated, found in its own files and loaded by it."""
    letters = tuple("abcdefghij")
    record = replace(DATASETS["fashion_mnist"], class_names=letters, augment=True, apt_package=None, apt_dir=None)
    monkeypatch.setitem(DATASETS, "letters", record)
    data = load_data(DataConfig(name="letters", root=str(fashion_mnist_root), download=False, limit_train=100))
    fashion = load_data(DataConfig(name="fashion_mnist", download=False, limit_train=100))
    assert (data.name, data.classes, data.augment, fashion.augment) == ("letters", letters, True, False)
    assert torch.equal(data.x_train, fashion.x_train) and torch.equal(data.y_test, fashion.y_test)
    with pytest.raises(UserError) as err:
        load_data(DataConfig(name="letters", download=False))
    assert "apt-get" not in str(err.value) and str(fashion_mnist_root) not in str(err.value)


def test_batches_normalised_ordered_and_shuffled_deterministically() -> None:
    data = load_data(DataConfig(name="digits"))
    train = load_digits().images[:1500].astype(np.float64) / 16
    xb, _ = next(data.batches("test", 64, shuffle=False))
    expected = (load_digits().images[1500:1564] / 16 - train.mean()) / train.std()
    assert np.allclose(xb[:, 0].numpy(), expected, atol=1e-5)
    plain = torch.cat([x for x, _ in data.batches("train", 128, shuffle=False)])
    assert abs(plain.mean().item()) < 1e-4 and abs(plain.std().item() - 1) < 1e-3

    def epoch(seed: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        return list(data.batches("train", 128, shuffle=True, generator=torch.Generator().manual_seed(seed)))

    first, again, other = epoch(0), epoch(0), epoch(1)
    assert len(first) == math.ceil(1500 / 128) and first[-1][0].shape[0] == 1500 - 11 * 128
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(first, again, strict=True))
    assert not torch.equal(first[0][1], other[0][1])
    shuffled = torch.cat([x for x, _ in first])
    assert not torch.equal(shuffled, plain) and rows(shuffled) == rows(plain)  # a permutation: each sample once
    raw = load_data(DataConfig(name="digits", normalize=False))
    assert torch.equal(next(raw.batches("test", 8, shuffle=False))[0], raw.x_test[:8].float() / 16)


def test_random_crop_flip_against_explicit_crops() -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (64, 3, 6, 5), dtype=torch.uint8, generator=g)
    out = random_crop_flip(x, 2, g)
    assert out.shape == x.shape and out.dtype == torch.uint8
    padded = np.pad(x.numpy(), ((0, 0), (0, 0), (2, 2), (2, 2)))
    seen = set()
    for i in range(x.shape[0]):
        matches = [
            (dy, dx, flip)
            for dy in range(5)
            for dx in range(5)
            for flip in (False, True)
            if np.array_equal(
                padded[i, :, dy : dy + 6, dx : dx + 5][..., ::-1] if flip else padded[i, :, dy : dy + 6, dx : dx + 5],
                out[i].numpy(),
            )
        ]
        assert matches, f"sample {i} is no padded crop (flipped or not) of its input"
        seen.update(matches)
    assert {f for *_, f in seen} == {False, True} and {dy for dy, *_ in seen} >= {0, 4}


def test_augmentation_changes_train_batches_only() -> None:
    plain, augmented = (load_data(DataConfig(name="digits", augment=a)) for a in (False, True))
    assert augmented.augment and not plain.augment

    def first(data, split):  # type: ignore[no-untyped-def]
        return next(data.batches(split, 256, shuffle=True, generator=torch.Generator().manual_seed(3)))

    (xa, ya), (xp, yp) = first(augmented, "train"), first(plain, "train")
    assert xa.shape == xp.shape and torch.equal(ya, yp) and not torch.equal(xa, xp)
    assert torch.equal(first(augmented, "test")[0], first(plain, "test")[0])


def test_validation_split_disjoint_and_deterministic() -> None:
    full = load_data(DataConfig(name="linear"))
    split = load_data(DataConfig(name="linear", val_fraction=0.2), seed=7)
    assert split.x_val is not None and split.x_val.shape == (2000, 30) and split.x_train.shape == (8000, 30)
    assert not set(rows(split.x_val)) & set(rows(split.x_train))
    assert rows(torch.cat([split.x_val, split.x_train])) == rows(full.x_train)
    assert torch.equal(load_data(DataConfig(name="linear", val_fraction=0.2), seed=7).x_val, split.x_val)
    assert not torch.equal(load_data(DataConfig(name="linear", val_fraction=0.2), seed=8).x_val, split.x_val)
    assert sum(y.shape[0] for _, y in split.batches("val", 500, shuffle=False)) == 2000
    with pytest.raises(UserError, match=r"data\.val_fraction"):
        next(full.batches("val", 10, shuffle=False))
    with pytest.raises(UserError, match=r"data\.val_fraction: got 0\.5"):
        load_data(DataConfig(name="linear", val_fraction=0.5, limit_train=1))


def test_linear_and_teacher_tasks() -> None:
    for name in ("linear", "teacher"):
        data = load_data(DataConfig(name=name))
        assert (data.task, data.num_outputs, data.input_shape) == ("regression", 10, (30,))
        assert data.x_train.shape == (10_000, 30) and data.y_test.shape == (2_000, 10)
        assert data.x_train.dtype == torch.float32 and abs(data.x_train.std().item() - 1) < 0.02
        assert torch.equal(load_data(DataConfig(name=name)).y_train, data.y_train), "fixed task"
        xb, yb = next(data.batches("train", 32, shuffle=False))
        assert torch.equal(xb, data.x_train[:32]) and torch.equal(yb, data.y_train[:32])
        # an independent least-squares fit: exact for y = T x with T in [-1, 1], not for the tanh teacher
        t = torch.linalg.lstsq(data.x_train.double(), data.y_train.double()).solution.T
        residual = (data.x_train.double() @ t.T - data.y_train).norm() / data.y_train.norm()
        if name == "linear":
            assert residual < 1e-6 and t.abs().max() <= 1
        else:
            assert residual > 0.05
    with pytest.raises(UserError, match=r"data\.augment"):
        load_data(DataConfig(name="linear", augment=True))


def assert_one_line_naming(err: UserError, *parts: str) -> None:
    message = str(err)
    assert "\n" not in message
    for part in parts:
        assert part in message, f"{part!r} not in {message!r}"


def test_missing_data_names_every_place(isolated: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FASWEEP_DATA_DIR", str(isolated / "store"))
    with pytest.raises(UserError) as err:
        load_data(DataConfig(name="cifar100", download=False))
    assert_one_line_naming(
        err.value,
        "cifar100",
        str(isolated / "store" / "cifar100"),
        str(isolated / "work" / "data"),
        str(isolated / "home" / ".cache" / "fasweep" / "data"),
        "data.root=",
        "data.download=true",
    )
    with pytest.raises(UserError) as err:
        load_data(DataConfig(name="fashion_mnist", root=str(isolated / "nowhere"), download=False))
    assert_one_line_naming(err.value, str(isolated / "nowhere"), "apt-get install dataset-fashion-mnist")


def test_a_data_root_that_is_no_folder_says_what_it_is(isolated: Path) -> None:
    """A file, a device or a symbolic link loop as `data.root`: one line saying so, with download allowed (the
    default), where a search and a download into it would fail with `[Errno 17] File exists`."""
    loop, plain = isolated / "loop", isolated / "plain.txt"
    loop.symlink_to(loop)
    plain.write_text("not a data set")
    for root, what in [(loop, "a symbolic link loop"), (Path("/dev/zero"), "a character device"), (plain, "a file")]:
        with pytest.raises(UserError) as err:
            load_data(DataConfig(name="fashion_mnist", root=str(root)))
        assert str(err.value) == (
            f"data.root: got '{root}'; expected a folder holding fashion_mnist (or one to download it into); "
            f"{root} is {what}"
        )
        assert locate_message(DataConfig(name="cifar10", root=str(root))).endswith(f"{root} is {what}")


def locate_message(cfg: DataConfig) -> str:
    """The UserError `fasweep launch`'s data check (`locate`) raises for `cfg`."""
    with pytest.raises(UserError) as err:
        locate(cfg)
    return str(err.value)


@pytest.mark.timeout(60)
def test_download_offline_fails_fast_with_one_line(isolated: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with socket.socket() as s:  # a local port nobody listens on: the proxy refuses, as an offline network would
        s.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{s.getsockname()[1]}"
    for var in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY"):
        monkeypatch.setenv(var, dead)
    monkeypatch.delenv("no_proxy", raising=False)
    monkeypatch.delenv("NO_PROXY", raising=False)
    # urlopen's global opener keeps the proxies it was built with: drop the one built here afterwards
    monkeypatch.setattr(urllib.request, "_opener", None)
    with pytest.raises(UserError) as err:
        load_data(DataConfig(name="mnist", download=True))
    assert_one_line_naming(
        err.value, "mnist", "download failed", str(isolated / "work" / "data" / "mnist"), "data.root="
    )
    assert socket.getdefaulttimeout() is None


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_batches_on_cuda_match_cpu() -> None:
    cpu, gpu = (load_data(DataConfig(name="digits", augment=True), device=d) for d in ("cpu", "cuda"))
    assert gpu.x_train.is_cuda and gpu.x_train.dtype == torch.uint8
    xc, _ = next(cpu.batches("test", 64, shuffle=False))
    xg, _ = next(gpu.batches("test", 64, shuffle=False))
    assert torch.allclose(xg.cpu(), xc)
    g = torch.Generator(device="cuda").manual_seed(0)
    xb, yb = next(gpu.batches("train", 64, shuffle=True, generator=g))
    assert xb.is_cuda and yb.is_cuda and xb.shape == (64, 1, 8, 8) and xb.dtype == torch.float32
