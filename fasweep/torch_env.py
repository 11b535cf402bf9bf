"""The process environment torch reads once (at load or its first CPU allocation): set before torch loads.

- `TORCH_ENV`: variables set unless the user has set them (passed to a cluster's workers too).
- MKL's AVX-512 path on AMD CPUs: MKL (torch's BLAS on x86, behind every `bmm`/`mm` on the CPU) takes its AVX-512
  kernels only on CPUs it identifies as Intel's, and its AVX2 ones on an AMD CPU with AVX-512 (Zen 4 on). Its own
  check, `mkl_serv_intel_cpu_true`, is a dynamic symbol: a one-function library preloaded ahead of torch answers it
  (the widely used workaround), and MKL then picks its kernels by the CPU's feature flags. `with_mkl_avx512` re-runs
  the process that way, where it applies: Linux on x86-64, an AMD CPU with avx512f, a C compiler to build the library
  once (cached). `FASWEEP_MKL_AVX512=0` turns it off. benchmarks/bench_nn.py measures it both ways.
"""

from __future__ import annotations

import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from fasweep.runs.layout import cache_dir

TORCH_ENV = {
    # CPU tensors of 2 MiB or more are 2 MiB-aligned and advised as transparent huge pages (where the kernel's THP
    # mode is `madvise` or `always`): an untied layer's weight gradient, a fresh 88 MB at every PG-Untie step, then
    # costs 512x fewer page faults (benchmarks/bench_nn.py measures it with and without).
    "THP_MEM_ALLOC_ENABLE": "1",
}
MKL_AVX512_VAR = "FASWEEP_MKL_AVX512"  # "0": leave MKL's choice of kernels alone
_SHIM_SOURCE = "int mkl_serv_intel_cpu_true(void) { return 1; }\n"
_SHIM_NAME = "libfasweep_mkl_avx512.so"


def apply_torch_env() -> dict[str, str]:
    """Set each of TORCH_ENV's variables the user has not set; returns what the process now has (for Ray workers)."""
    for name, value in TORCH_ENV.items():
        os.environ.setdefault(name, value)
    return {name: os.environ[name] for name in TORCH_ENV}


def mkl_avx512_applies(cpuinfo: str, machine: str, system: str) -> bool:
    """Whether MKL would leave AVX-512 unused: Linux on x86-64 with an AMD CPU whose flags include avx512f."""
    if system != "Linux" or machine != "x86_64":
        return False
    fields = [line.partition(":") for line in cpuinfo.splitlines()]
    vendor = next((value.strip() for key, _, value in fields if key.strip() == "vendor_id"), "")
    flags = next((value.split() for key, _, value in fields if key.strip() == "flags"), [])
    return vendor == "AuthenticAMD" and "avx512f" in flags


def mkl_avx512_library() -> tuple[Path | None, str]:
    """The preload library, built once with the system C compiler (`$CC`, else `cc`) into `layout.cache_dir()`, and a
    phrase saying so; None and why where it does not apply, is turned off, or cannot be built (MKL keeps its choice)."""
    if os.environ.get(MKL_AVX512_VAR) == "0":
        return None, f"off ({MKL_AVX512_VAR}=0)"
    try:
        cpuinfo = Path("/proc/cpuinfo").read_text()
    except OSError:
        cpuinfo = ""
    if not mkl_avx512_applies(cpuinfo, platform.machine(), platform.system()):
        return None, "not needed (not an AMD CPU with AVX-512 on Linux)"
    library = cache_dir() / _SHIM_NAME
    if library.is_file():
        return library, f"preloaded ({library})"
    compiler = shutil.which(os.environ.get("CC", "cc"))
    if compiler is None:
        return None, "not built: no C compiler (cc or $CC)"
    try:
        library.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=library.parent) as tmp:
            source, built = Path(tmp, "shim.c"), Path(tmp, _SHIM_NAME)
            source.write_text(_SHIM_SOURCE)
            command = [compiler, "-shared", "-fPIC", "-O2", "-o", str(built), str(source)]
            done = subprocess.run(command, capture_output=True, text=True, timeout=60)
            if done.returncode != 0:
                last = (done.stderr.strip().splitlines() or ["no message"])[-1]
                return None, f"not built: {compiler} failed ({last})"
            built.replace(library)  # atomic: concurrent builders each rename a whole file
    except (OSError, subprocess.SubprocessError) as exc:
        return None, f"not built: {exc}"
    return library, f"preloaded ({library})"


def with_mkl_avx512() -> None:
    """Re-run this process (same pid, same command line) with the MKL library preloaded, where it applies and is not
    preloaded yet; call first thing, before torch loads. A local Ray's workers inherit the preload."""
    library, _ = mkl_avx512_library()
    preload = os.environ.get("LD_PRELOAD", "")
    if library is None or str(library) in re.split(r"[:\s]+", preload):
        return
    os.environ["LD_PRELOAD"] = f"{library} {preload}".strip()
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(sys.executable, sys.orig_argv)
