"""The data sets fasweep knows, by name: where each comes from, its classes, torchvision's folder for it.

Torch-free, so `fasweep.config` checks `data.name` against it while `fasweep.data` loads by it. Adding a
data set is one entry here and its reader in `fasweep.data`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal


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
