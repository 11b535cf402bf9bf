"""Shared test fixtures: paths to real data, small-thread torch, skips where data is missing."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
CIFAR10_JPEG = SHARED / "data" / "cifar10-jpeg"
FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")

os.environ.setdefault("OMP_NUM_THREADS", "1")


@pytest.fixture(autouse=True)
def _torch_threads():
    """Keep torch to one thread: tests run on 2-core machines beside Ray workers."""
    try:
        import torch
    except ImportError:  # spec tests never need torch
        yield
        return
    torch.set_num_threads(1)
    yield


@pytest.fixture
def cifar10_root() -> Path:
    """The shared CIFAR-10 image folder, or skip where ../shared is missing."""
    if not (CIFAR10_JPEG / "train").is_dir():
        pytest.skip(f"CIFAR-10 image folder not found at {CIFAR10_JPEG}")
    return CIFAR10_JPEG


@pytest.fixture
def fashion_mnist_root() -> Path:
    """Debian's Fashion-MNIST files, or skip where the package is not installed."""
    if not FASHION_MNIST.is_dir():
        pytest.skip("Fashion-MNIST not installed (apt-get install dataset-fashion-mnist)")
    return FASHION_MNIST


@pytest.fixture
def small_storage(tmp_path: Path) -> Iterator[Path]:
    """A real 1 MB disk (a tmpfs mounted under tmp_path), or skip where mounting is not allowed."""
    small = tmp_path / "small"
    small.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(small)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here: {mounted.stderr.decode().strip()}")
    try:
        yield small
    finally:
        subprocess.run(["umount", "-l", str(small)], check=False)
