"""Packed vs unpacked trials in one process (no Ray): trials/hour of `train_pack` and of `train()` one by one.

Prints, in one run, for DS0 on digits (batch 128, 2 epochs; batch 32, 1 epoch: bench_launch.py's tiny trials)
and PG0 on one batch (1 epoch; CIFAR-10 from ../shared when present, else digits): the wall time of N trials
trained one after the other with `train()` and of the same N trials as packs of K (`train_pack`), trials/hour
of each and their ratio (median over repetitions that interleave the two, so a busy host slows both alike).
Both paths do everything a trial does (data on the device, per-epoch evaluation, alignment probe; no
checkpoints). Uses CUDA when it is available, else the CPU.

    .venv/bin/python benchmarks/bench_pack.py [--trials 16] [--pack 16] [--reps 2] [--device auto|cpu|cuda]
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from fasweep.config import TrialConfig, validate_trial
from fasweep.packed import train_pack
from fasweep.packing import packable
from fasweep.train import pick_device, train

CIFAR10 = Path(__file__).resolve().parents[2] / "shared" / "data" / "cifar10-jpeg"


def configs(name: str, batch_size: int, trials: int, device: str) -> list[TrialConfig]:
    """N trials of one condition, seeds 0..N-1 (the sweep shape a pack is for)."""
    epochs = 2 if batch_size == 128 else 1
    if name == "DS0":
        data: dict[str, Any] = {"name": "digits"}
    elif (CIFAR10 / "train").is_dir():  # one batch
        data, epochs = {"name": "imagefolder", "root": str(CIFAR10), "limit_train": 128, "limit_test": 128}, 1
    else:
        data = {"name": "digits", "limit_train": 128}
    base = {"data": data, "model": {"arch": name}, "feedback": {"mode": "random"}}
    return [
        validate_trial(base | {"train": {"epochs": epochs, "seed": s, "batch_size": batch_size, "device": device}})
        for s in range(trials)
    ]


def timed(fn: Callable[[], object], device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def bench(trials: list[TrialConfig], size: int, reps: int, device: torch.device) -> tuple[float, float, float]:
    """Median seconds for the trials alone (one after another) and as packs of `size`; median ratio."""
    train(trials[0])  # warm-up: imports, data cache, kernels
    train_pack(trials[:2])
    packs = packable(trials, size)
    alone, packed = [], []
    for _ in range(reps):
        alone.append(timed(lambda: [train(c) for c in trials], device))
        packed.append(timed(lambda: [train_pack([trials[i] for i in pack]) for pack in packs], device))
    ratio = statistics.median(a / p for a, p in zip(alone, packed, strict=True))
    return statistics.median(alone), statistics.median(packed), ratio


def main() -> None:
    """Run the benchmark and print its figures."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=16)
    parser.add_argument("--pack", type=int, default=16, help="trials per pack (K)")
    parser.add_argument("--reps", type=int, default=2)
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads for both paths")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = pick_device(args.device)
    print(f"device {device}, {args.trials} trials, packs of {args.pack}, {args.reps} reps, {args.threads} thread(s)")
    header = f"{'model':<9} {'data x epochs':<20} {'alone s':>8} {'packed s':>9} {'alone/h':>8} {'packed/h':>9}"
    print(f"{header} {'ratio':>6}")
    for name, batch_size in (("DS0", 128), ("DS0", 32), ("PG0", 128)):
        trials = configs(name, batch_size, args.trials, device.type)
        alone, packed, ratio = bench(trials, args.pack, args.reps, device)
        limit = trials[0].data.limit_train
        data = f"{trials[0].data.name}{f'[:{limit}]' if limit else ''} x{trials[0].train.epochs}"
        rates = f"{3600 * len(trials) / alone:>8.0f} {3600 * len(trials) / packed:>9.0f}"
        print(f"{f'{name}/b{batch_size}':<9} {data:<20} {alone:>8.1f} {packed:>9.1f} {rates} {ratio:>5.1f}x")


if __name__ == "__main__":
    main()
