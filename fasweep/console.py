"""The `fasweep` console command: where `fasweep.torch_env` re-runs the process for MKL's AVX-512 path, before the
CLI and its imports load (so a re-run costs an interpreter start, not the CLI's imports twice)."""

from __future__ import annotations

from fasweep.torch_env import with_mkl_avx512


def main() -> None:
    """Entry point of the `fasweep` script: `with_mkl_avx512`, then `fasweep.cli.main`."""
    with_mkl_avx512()
    from fasweep.cli import main as cli_main

    cli_main()
