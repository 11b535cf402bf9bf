"""The data sets fasweep knows, by name: where each comes from, its classes, torchvision's folder for it.

Torch-free, so `fasweep.config` checks `data.name` against it while `fasweep.data` loads by it. Adding a
data set to fasweep is one entry here and its reader in `fasweep.data`; a user's own is a function in their
package, named by its import path (`mypkg.data:svhn`) or by the entry point group `fasweep.datasets` (see
`user_dataset`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

from fasweep import plugins
from fasweep.errors import UserError


@dataclass(frozen=True)
class Dataset:
    """`source`: made by fasweep, shipped by a dependency, or read from files (found or downloaded)."""

    source: Literal["generated", "bundled", "files"]
    classes: int | None = None  # None: a regression task, or as many as an image folder holds
    torchvision_dir: str | None = None  # torchvision's folder under a `root`; set: torchvision can download it
    input_shape: tuple[int, ...] | None = None  # one sample: (C, H, W) or (features,); None: known once decoded
    targets: int | None = None  # a regression task's outputs (a classifier has `classes`)

    @property
    def outputs(self) -> int | None:
        """The net's outputs: the classes, or the regression targets (None: known once decoded)."""
        return self.classes or self.targets


DATASETS: dict[str, Dataset] = {
    "cifar10": Dataset("files", 10, "cifar-10-batches-py", (3, 32, 32)),
    "cifar100": Dataset("files", 100, "cifar-100-python", (3, 32, 32)),
    "mnist": Dataset("files", 10, "MNIST/raw", (1, 28, 28)),
    "fashion_mnist": Dataset("files", 10, "FashionMNIST/raw", (1, 28, 28)),
    "imagefolder": Dataset("files"),
    "digits": Dataset("bundled", 10, input_shape=(1, 8, 8)),
    "linear": Dataset("generated", input_shape=(30,), targets=10),  # Lillicrap et al. 2016: 30 inputs, 10 outputs
    "teacher": Dataset("generated", input_shape=(30,), targets=10),
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
