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


DATASETS: dict[str, Dataset] = {
    "cifar10": Dataset("files", 10, "cifar-10-batches-py"),
    "cifar100": Dataset("files", 100, "cifar-100-python"),
    "mnist": Dataset("files", 10, "MNIST/raw"),
    "fashion_mnist": Dataset("files", 10, "FashionMNIST/raw"),
    "imagefolder": Dataset("files"),
    "digits": Dataset("bundled", 10),
    "linear": Dataset("generated"),
    "teacher": Dataset("generated"),
}
DATASET_NAMES: tuple[str, ...] = tuple(DATASETS)
