"""`make demo` without Fashion-MNIST and without network: it trains on scikit-learn's digits and says so."""

from __future__ import annotations

import os
import socket
import subprocess
from dataclasses import replace
from pathlib import Path

import pytest

from fasweep.datasets import DATASETS
from fasweep.demo import demo_data

REPO = Path(__file__).resolve().parents[1]
QUICKSTART = REPO / "sweeps" / "quickstart.yaml"


@pytest.fixture
def bare_machine(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """No Fashion-MNIST package, no copy or cache where fasweep.data looks, no network (name lookups fail)."""
    no_package = replace(DATASETS["fashion_mnist"], apt_dir=str(tmp_path / "no-package"))
    monkeypatch.setitem(DATASETS, "fashion_mnist", no_package)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("FASWEEP_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("FASWEEP_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)

    def offline(*args: object, **kwargs: object) -> None:
        raise socket.gaierror(socket.EAI_NONAME, "no network in this test")

    monkeypatch.setattr(socket, "getaddrinfo", offline)
    return tmp_path


def test_demo_uses_digits_without_fashion_mnist_or_network(
    bare_machine: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert demo_data(QUICKSTART) == "digits"
    out, err = capsys.readouterr()
    assert out == ""
    assert err.splitlines() == [
        "demo data: digits from scikit-learn; fashion_mnist is neither here nor downloadable "
        "(`fasweep train --dataset fashion_mnist` says why)"
    ]


def test_demo_uses_fashion_mnist_when_installed(fashion_mnist_root: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert demo_data(QUICKSTART) == "fashion_mnist"
    [line] = capsys.readouterr().err.splitlines()
    assert line.startswith("demo data: fashion_mnist (/")  # the copy found, e.g. the package's folder


@pytest.mark.slow
def test_make_demo_runs_offline_on_digits(tmp_path: Path) -> None:
    """The whole `make demo` (3 conditions, 1 epoch, 1 seed here) with a spec whose Fashion-MNIST is nowhere."""
    hidden = f"limit_train: 10000, root: {tmp_path}/none, download: false}}"
    text = QUICKSTART.read_text().replace("limit_train: 10000}", hidden)
    text = text.replace("epochs: 3", "epochs: 1").replace("seeds: [0, 1]", "seeds: [0]") + f"storage: {tmp_path}/runs\n"
    spec = tmp_path / "quickstart.yaml"
    spec.write_text(text)
    env = {**os.environ, "HOME": str(tmp_path), "FASWEEP_CACHE_DIR": str(tmp_path / "cache")}
    args = ["make", "-o", ".venv/.installed", "demo", f"DEMO_SPEC={spec}", f"DEMO_DIR={tmp_path / 'demo'}"]
    done = subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "demo data: digits from scikit-learn; fashion_mnist is neither here nor downloadable" in done.stderr
    assert "quickstart: test_acc per condition" in done.stdout
    assert (tmp_path / "demo" / "report" / "report.html").is_file()
