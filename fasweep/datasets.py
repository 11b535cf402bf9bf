"""The data sets fasweep knows, by name: one record each holding every fact its loader needs.

Torch-free, so `fasweep.config` checks `data.name` against it while `fasweep.data` loads by it, reading the record
and never the name. Adding a data set to fasweep is one record here (plus, for a new kind of files, its reader in
`fasweep.data`); a user's own is a function in their package, named by its import path (`mypkg.data:svhn`) or by
the entry point group `fasweep.datasets` (see `user_dataset`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any, Literal

from fasweep import plugins
from fasweep.errors import UserError

DIGIT_CLASSES = tuple(str(i) for i in range(10))
FASHION_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Boot")


@dataclass(frozen=True)
class Dataset:
    """A built-in data set. `source`: made by fasweep, shipped by a dependency, or read from files (found or
    downloaded); `fasweep.data` picks its loader by `source` and, for files, its reader by `layout`."""

    source: Literal["generated", "bundled", "files"]
    classes: int | None = None  # None: a regression task, or as many as an image folder holds
    torchvision_dir: str | None = None  # torchvision's folder under a `root`
    input_shape: tuple[int, ...] | None = None  # one sample: (C, H, W) or (features,); None: known once decoded
    targets: int | None = None  # a regression task's outputs (a classifier has `classes`)
    class_names: tuple[str, ...] | None = None  # None: read from its files (or an image folder's class folders)
    augment: bool = False  # random crop + flip when `data.augment` is null
    layout: Literal["cifar_pickle", "idx"] | None = None  # its own files' format; None: only an image folder holds it
    marker_files: tuple[str, ...] = ()  # the files that tell a copy in `layout` (an IDX file may be gzipped)
    torchvision_class: str | None = None  # its class in `torchvision.datasets`; set: torchvision can download it
    apt_package: str | None = None  # a system package that installs a copy in `apt_dir`, searched last
    apt_dir: str | None = None
    seed: int = 0  # generated: the task's own seed, the same for every trial
    hidden: int = 0  # generated: the teacher net's hidden units; 0: a linear map

    @property
    def outputs(self) -> int | None:
        """The net's outputs: the classes, or the regression targets (None: known once decoded)."""
        return self.classes or self.targets


_CIFAR10 = Dataset(
    "files",
    classes=10,
    torchvision_dir="cifar-10-batches-py",
    input_shape=(3, 32, 32),
    augment=True,
    layout="cifar_pickle",
    marker_files=("data_batch_1",),
    torchvision_class="CIFAR10",
)
_MNIST = Dataset(
    "files",
    classes=10,
    torchvision_dir="MNIST/raw",
    input_shape=(1, 28, 28),
    class_names=DIGIT_CLASSES,
    layout="idx",
    marker_files=("train-images-idx3-ubyte",),
    torchvision_class="MNIST",
)

DATASETS: dict[str, Dataset] = {
    "cifar10": _CIFAR10,
    "cifar100": replace(  # CIFAR-10's pickles with 100 classes, in other files
        _CIFAR10,
        classes=100,
        torchvision_dir="cifar-100-python",
        marker_files=("train", "meta"),
        torchvision_class="CIFAR100",
    ),
    "mnist": _MNIST,
    "fashion_mnist": replace(  # MNIST's IDX files holding clothes; Debian packages a copy
        _MNIST,
        torchvision_dir="FashionMNIST/raw",
        class_names=FASHION_CLASSES,
        torchvision_class="FashionMNIST",
        apt_package="dataset-fashion-mnist",
        apt_dir="/usr/share/datasets/fashion-mnist",
    ),
    "imagefolder": Dataset("files"),
    "digits": Dataset("bundled", 10, input_shape=(1, 8, 8), class_names=DIGIT_CLASSES),
    # Lillicrap et al. 2016: 30 inputs, 10 outputs; `linear` y = T x, `teacher` a random 30-20-10 tanh net of x
    "linear": Dataset("generated", input_shape=(30,), targets=10, seed=0),
    "teacher": Dataset("generated", input_shape=(30,), targets=10, seed=1, hidden=20),
}
DATASET_NAMES: tuple[str, ...] = tuple(DATASETS)


def is_user_data(name: str) -> bool:
    """Whether `name` names a user's data set (see `user_dataset`), told without importing it."""
    return name not in DATASETS and plugins.is_plugin("datasets", name)


def user_dataset(name: str) -> Callable[..., Any]:
    """The user's data set function `name` names, checked to be callable. `fasweep.data` calls it as `fn(root=
    data.root)`; it returns `(x_train, y_train, x_test, y_test)` tensors or `(train, test)` torchvision-style data
    sets. A UserError for `data.name` when it cannot be found or is not callable."""
    fn = plugins.find("datasets", name, "data.name", list(DATASETS))
    if not callable(fn):
        raise UserError.field("data.name", name, f"a function returning a data set, not a {type(fn).__name__}")
    return fn


def source(name: str) -> str:
    """Where data set `name` comes from: `generated`, `bundled`, `files` (found or downloaded) or `user` code."""
    return "user" if is_user_data(name) else DATASETS[name].source
