"""fasweep.faults (fast): one line for an environment fault, from the exception or from its text alone; a bad
address (tracking store, Ray cluster) fails in seconds with one line, through the real CLI."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import traceback
from pathlib import Path

import pytest

from fasweep.faults import describe_fault, describe_fault_text, free_space


def test_a_full_disk_reads_the_same_from_its_exception_and_from_its_traceback(tmp_path: Path) -> None:
    storage = str(tmp_path)
    with pytest.raises(OSError) as caught, open("/dev/full", "wb", buffering=0) as full:  # a real ENOSPC
        full.write(b"x")
    want = (
        f"{storage}: ENOSPC (No space left on device, {free_space(storage)}); "
        "free some space or point `storage:` (--set storage=...) at a larger disk"
    )
    assert describe_fault(caught.value, storage) == want
    text = "".join(traceback.format_exception(caught.value))  # what a retried trial's error says
    assert describe_fault_text(text, storage) == want


def test_a_fault_named_only_in_words_and_no_fault() -> None:
    text = "OSError: When uploading part for key 'a/b': AWS Error UNKNOWN: Read-only file system"  # pyarrow: no errno
    assert describe_fault_text(text) == (
        f"storage: EROFS (Read-only file system, {free_space('storage')}); "
        "point `storage:` (--set storage=...) at a writable disk"
    )
    assert describe_fault_text("ValueError: loss is nan", "/tmp") is None


# --- bad addresses: one line in seconds, before any client library retries them ------------------------------

CLI = [sys.executable, "-c", "from fasweep.cli import main; main()"]


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(*args: str, cwd: Path) -> tuple[int, float, list[str]]:
    """A `fasweep` command in its own process: exit code, seconds, console lines."""
    started = time.monotonic()
    done = subprocess.run([*CLI, *args], capture_output=True, text=True, cwd=cwd, timeout=120)
    return done.returncode, time.monotonic() - started, (done.stdout + done.stderr).splitlines()


def test_every_bad_tracking_store_fails_in_seconds_with_one_line(tmp_path: Path) -> None:
    folder, junk, port = tmp_path / "a-folder", tmp_path / "junk.db", _closed_port()
    folder.mkdir()
    junk.write_text("not a database\n")
    fix = "start the store or pass a reachable --tracking-uri (or set MLFLOW_TRACKING_URI)"
    sqlite_fix = "pass --tracking-uri sqlite:///PATH/mlflow.db, a database file in a writable folder"
    cases = {
        f"sqlite:///{folder}": f"{folder} is a directory, not an SQLite database file); {sqlite_fix}",
        f"sqlite:///{junk}": f"{junk} is not an SQLite database); {sqlite_fix}",
        f"http://127.0.0.1:{port}": f"connection refused: nothing listens on 127.0.0.1:{port}); {fix}",
        "http://nowhere.invalid:5000": "host nowhere.invalid does not resolve: ",
        f"postgresql://user@127.0.0.1:{port}/db": f"connection refused: nothing listens on 127.0.0.1:{port}); {fix}",
    }
    for uri, reason in cases.items():
        for command in ("status", "report x") if uri.startswith("sqlite") else ("status",):
            code, seconds, lines = _run(*command.split(), "--tracking-uri", uri, cwd=tmp_path)
            assert code == 2 and seconds < 15 and len(lines) == 1, (command, uri, seconds, lines)
            assert lines[0].startswith(f"error: tracking URI: got '{uri}'; expected a reachable MLflow store ("), lines
            assert reason in lines[0], lines
    assert junk.read_text() == "not a database\n" and list(folder.iterdir()) == []  # nothing written to either


def test_a_ray_address_where_nothing_listens_fails_in_seconds_with_one_line(tmp_path: Path) -> None:
    port = _closed_port()
    spec = Path(__file__).resolve().parents[1] / "sweeps" / "quickstart.yaml"
    for address, reason in [
        (f"127.0.0.1:{port}", f"connection refused: nothing listens on 127.0.0.1:{port}"),
        ("nowhere.invalid:6379", "host nowhere.invalid does not resolve: "),
    ]:
        code, seconds, lines = _run(
            "launch", str(spec), "--address", address, "--set", "base.data.name=digits", cwd=tmp_path
        )
        assert code == 2 and seconds < 15 and len(lines) == 1, (address, seconds, lines)
        assert lines[0].startswith(f"error: --address: got '{address}'; expected the GCS address of a running Ray")
        assert reason in lines[0] and "`ray start --head`" in lines[0], lines
    assert not (tmp_path / "mlflow.db").exists() and not (tmp_path / "fasweep-runs").exists()


def test_sigint_while_a_store_keeps_silent_exits_at_once_with_a_line(tmp_path: Path) -> None:
    """A server that accepts the connection and never answers: the check waits for it; Ctrl+C ends the wait."""
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        uri = f"http://127.0.0.1:{silent.getsockname()[1]}"
        proc = subprocess.Popen(
            [*CLI, "status", "--tracking-uri", uri],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            cwd=tmp_path,
        )
        time.sleep(3)  # the interpreter and the check are up: it waits on the silent server
        assert proc.poll() is None
        os.kill(proc.pid, signal.SIGINT)
        started = time.monotonic()
        out, _ = proc.communicate(timeout=30)
    assert proc.returncode == 130 and time.monotonic() - started < 2, out
    assert out.splitlines() == ["interrupted"], out
