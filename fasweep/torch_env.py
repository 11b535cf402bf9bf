"""Environment variables torch reads once per process (at its first CPU allocation): set before torch loads."""

from __future__ import annotations

import os

TORCH_ENV = {
    # CPU tensors of 2 MiB or more are 2 MiB-aligned and advised as transparent huge pages (where the kernel's THP
    # mode is `madvise` or `always`): an untied layer's weight gradient, a fresh 88 MB at every PG-Untie step, then
    # costs 512x fewer page faults (benchmarks/bench_nn.py measures it with and without).
    "THP_MEM_ALLOC_ENABLE": "1",
}


def apply_torch_env() -> dict[str, str]:
    """Set each of TORCH_ENV's variables the user has not set; returns what the process now has (for Ray workers)."""
    for name, value in TORCH_ENV.items():
        os.environ.setdefault(name, value)
    return {name: os.environ[name] for name in TORCH_ENV}
