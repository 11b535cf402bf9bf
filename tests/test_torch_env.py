"""fasweep.torch_env's MKL preload: where it applies, that the console command re-runs itself once with it, and
that the untied layer's tests pass on the kernels it selects (benchmarks/bench_nn.py measures the speed)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from fasweep.torch_env import MKL_AVX512_VAR, mkl_avx512_applies, mkl_avx512_library

REPO = Path(__file__).resolve().parents[1]
AMD = "processor\t: 0\nvendor_id\t: AuthenticAMD\nflags\t\t: fpu sse2 avx2 avx512f avx512bw\n"


@pytest.mark.parametrize(
    ("cpuinfo", "machine", "system", "applies"),
    [
        (AMD, "x86_64", "Linux", True),
        (AMD.replace("AuthenticAMD", "GenuineIntel"), "x86_64", "Linux", False),  # MKL uses AVX-512 there anyway
        (AMD.replace(" avx512f avx512bw", ""), "x86_64", "Linux", False),  # Zen 3: AVX2 is the best there is
        (AMD.replace("avx512f", "avx512fx"), "x86_64", "Linux", False),  # a flag is a whole word
        (AMD, "aarch64", "Linux", False),
        (AMD, "x86_64", "Darwin", False),
        ("", "x86_64", "Linux", False),
    ],
)
def test_the_preload_applies_to_amd_cpus_with_avx512_on_linux_only(
    cpuinfo: str, machine: str, system: str, applies: bool
) -> None:
    assert mkl_avx512_applies(cpuinfo, machine, system) is applies


def _env(tmp_path: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", MKL_AVX512_VAR)}
    return {**env, "FASWEEP_CACHE_DIR": str(tmp_path / "cache"), **extra}


def _library_here(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("FASWEEP_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv(MKL_AVX512_VAR, raising=False)
    library, why = mkl_avx512_library()
    if library is None:
        pytest.skip(f"MKL preload: {why}")
    return library


def test_the_console_command_reruns_itself_once_with_the_preload_unless_turned_off(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The library is built into the cache; `fasweep` (`fasweep.console.main`) re-runs its own command line once with it
    preloaded, keeps the user's preloads, and `FASWEEP_MKL_AVX512=0` leaves the process alone."""
    library = _library_here(tmp_path, monkeypatch)
    assert library.parent == tmp_path / "cache" and library.stat().st_size > 0
    probe = (
        "import os, sys\nprint('run', os.environ.get('LD_PRELOAD', ''), flush=True)\n"
        "sys.argv = ['fasweep', 'validate', '--help']\nfrom fasweep.console import main\nmain()"
    )
    command = [sys.executable, "-c", probe]
    done = subprocess.run(command, capture_output=True, text=True, env=_env(tmp_path), timeout=120)
    runs = [line for line in done.stdout.splitlines() if line.startswith("run")]
    assert (done.returncode, runs) == (0, ["run ", f"run {library}"]), done.stdout + done.stderr
    user = _env(tmp_path, LD_PRELOAD="libm.so.6")
    done = subprocess.run(command, capture_output=True, text=True, env=user, timeout=120)
    runs = [line for line in done.stdout.splitlines() if line.startswith("run")]
    assert runs == ["run libm.so.6", f"run {library} libm.so.6"], done.stdout + done.stderr
    off = _env(tmp_path, **{MKL_AVX512_VAR: "0"})
    done = subprocess.run(command, capture_output=True, text=True, env=off, timeout=120)
    assert [line for line in done.stdout.splitlines() if line.startswith("run")] == ["run "]


def test_the_untied_layer_tests_pass_with_mkl_preloaded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """MKL answered as on an Intel CPU (the preloaded symbol wins the lookup) then picks other kernels: the untied
    layer still equals its explicit loop, the tied conv and the dense form, fp64 and fp32 (tests/test_nn.py)."""
    library = _library_here(tmp_path, monkeypatch)
    env = _env(tmp_path, LD_PRELOAD=str(library))
    check = "import ctypes\nprint(ctypes.CDLL(None).mkl_serv_intel_cpu_true())"
    done = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True, env=env, timeout=60)
    assert done.stdout.strip() == "1", done.stderr
    tests = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_nn.py", "-k", "untied"]
    done = subprocess.run(tests, capture_output=True, text=True, env=env, cwd=REPO, timeout=300)
    assert done.returncode == 0 and " passed" in done.stdout, done.stdout[-3000:] + done.stderr[-2000:]


def test_without_a_compiler_mkl_keeps_its_choice_and_the_reason_is_said(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _library_here(tmp_path / "first", monkeypatch)  # skips where the preload does not apply
    monkeypatch.setenv("FASWEEP_CACHE_DIR", str(tmp_path / "empty"))
    monkeypatch.setenv("CC", "no-such-compiler")
    assert mkl_avx512_library() == (None, "not built: no C compiler (cc or $CC)")
    monkeypatch.setenv("CC", "false")  # a compiler that fails
    library, why = mkl_avx512_library()
    assert library is None and why.startswith("not built: ") and "false failed" in why
    assert not (tmp_path / "empty" / "libfasweep_mkl_avx512.so").exists()
