"""Benchmark: one DS0 epoch on CIFAR-10, device-resident pipeline (fasweep.data) vs a stock torchvision DataLoader.

Both sides train the same DS0 MLP (3072-512-256-10, ReLU, Adam, batch 128) with random crop (4 px
padding) + horizontal flip + normalisation; the baseline does it with PIL transforms in DataLoader
workers, fasweep.data with batched tensor ops on a uint8 tensor decoded once. The one-time decode
into the cache is timed separately. Prints times and ratios from one run on this machine.

    .venv/bin/python benchmarks/bench_data.py [--root ../shared/data/cifar10-jpeg] [--workers 2]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from collections.abc import Iterable
from pathlib import Path

import torch
from torch import nn

from fasweep.config import DataConfig
from fasweep.data import load_data

REPO = Path(__file__).resolve().parents[1]
CIFAR_MEAN, CIFAR_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)


def ds0(seed: int) -> nn.Module:
    """The seed report's DS0: Dense512 Dense256 Dense10 on flattened 3x32x32, ReLU, plain nn.Linear."""
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Flatten(), nn.Linear(3 * 32 * 32, 512), nn.ReLU(), nn.Linear(512, 256), nn.ReLU(), nn.Linear(256, 10)
    )


def epoch(batches: Iterable[tuple[torch.Tensor, torch.Tensor]], model: nn.Module | None) -> tuple[float, int]:
    """Seconds for one pass over `batches` (training `model` when given) and the number of samples seen."""
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3) if model is not None else None
    seen = 0
    start = time.perf_counter()
    for x, y in batches:
        seen += y.shape[0]
        if model is None or optimizer is None:
            continue
        optimizer.zero_grad(set_to_none=True)
        nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()
    return time.perf_counter() - start, seen


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, default=REPO.parent / "shared" / "data" / "cifar10-jpeg")
    parser.add_argument("--workers", type=int, default=2, help="DataLoader workers for the baseline")
    parser.add_argument(
        "--threads",
        type=int,
        default=os.cpu_count() or 1,
        help="torch threads in the main process, both pipelines (default: all cores; use 1 on a busy machine)",
    )
    parser.add_argument("--batch-size", type=int, default=128)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    load_before = os.getloadavg()[0]

    from torch.utils.data import DataLoader
    from torchvision import datasets, transforms

    with tempfile.TemporaryDirectory() as cache:
        os.environ["FASWEEP_CACHE_DIR"] = cache  # a cold cache, so the decode is measured
        cfg = DataConfig(name="cifar10", root=str(args.root), download=False)
        start = time.perf_counter()
        load_data(cfg)
        build_s = time.perf_counter() - start
        start = time.perf_counter()
        data = load_data(cfg)
        hit_s = time.perf_counter() - start

        def ours() -> Iterable[tuple[torch.Tensor, torch.Tensor]]:
            return data.batches("train", args.batch_size, shuffle=True, generator=torch.Generator().manual_seed(0))

        stock = DataLoader(
            datasets.ImageFolder(
                str(args.root / "train"),
                transform=transforms.Compose(
                    [
                        transforms.RandomCrop(32, padding=4),
                        transforms.RandomHorizontalFlip(),
                        transforms.ToTensor(),
                        transforms.Normalize(CIFAR_MEAN, CIFAR_STD),
                    ]
                ),
            ),
            batch_size=args.batch_size,
            shuffle=True,
            num_workers=args.workers,
        )
        results = {
            "fasweep.data, DS0 epoch": epoch(ours(), ds0(0)),
            "DataLoader, DS0 epoch": epoch(stock, ds0(0)),
            "fasweep.data, data only": epoch(ours(), None),
            "DataLoader, data only": epoch(stock, None),
        }

    print(f"CIFAR-10 image folder {args.root}; torch threads {args.threads}, DataLoader workers {args.workers}")
    print(f"{os.cpu_count()} CPUs, load average {load_before:.1f} before, {os.getloadavg()[0]:.1f} after")
    print(f"cache build (decode {data.x_train.shape[0] + data.x_test.shape[0]} JPEGs + save): {build_s:6.2f} s")
    print(f"cache hit (load):                                 {hit_s:6.2f} s")
    for name, (seconds, seen) in results.items():
        print(f"{name:26s} {seconds:7.2f} s  ({seen / seconds:8.0f} samples/s)")
    for what in ("DS0 epoch", "data only"):
        ratio = results[f"DataLoader, {what}"][0] / results[f"fasweep.data, {what}"][0]
        print(f"speed-up, {what}: {ratio:.1f}x (target >= 5x for the DS0 epoch)")


if __name__ == "__main__":
    main()
