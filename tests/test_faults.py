"""The fault matrix: a real local Ray, a real MLflow store, a real driver process, and one fault per row.

Each row asserts the exit code, a bounded console, every MLflow run's status (none left running), no metric lost
or doubled, and, where it applies, that `--resume` continues from the checkpoints (epochs trained again counted).
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import requests
from mlflow.tracking import MlflowClient

REPO = Path(__file__).resolve().parents[1]
QUICKSTART = REPO / "sweeps" / "quickstart.yaml"
EPOCHS = 5
SETS = [
    *("--set", "base.data.name=digits", "--set", "resources.gpu=0", "--set", f"base.train.epochs={EPOCHS}"),
    *("--set", "seeds=[0]", "--set", "max_concurrent=2", "--set", "base.train.batch_size=8"),
    *("--set", "max_retries=1"),
]
SLOWER = ("--set", "base.train.batch_size=4")  # twice the steps per epoch: a longer window mid-way
MAX_LINES = 25  # a driver's whole console for one of these launches
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def ray_address():
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="ERROR")
    yield ray.get_runtime_context().gcs_address
    ray.shutdown()


class Driver:
    """`fasweep launch` in its own process (its own session, so a signal reaches it alone)."""

    def __init__(self, tmp_path: Path, uri: str, address: str, *extra: str, env: dict[str, str] | None = None):
        self.log = tmp_path / f"driver-{time.monotonic_ns()}.log"
        command = [sys.executable, "-c", "from fasweep.cli import main; main()", "launch", str(QUICKSTART)]
        self.proc = subprocess.Popen(
            [*command, "--tracking-uri", uri, "--address", address, *SETS, *extra],
            cwd=tmp_path,
            env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})},
            stdout=self.log.open("w"),
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def output(self) -> str:
        return self.log.read_text()

    def lines(self) -> list[str]:
        """The console, less MLflow's own store-creation INFO lines."""
        return [line for line in self.output().splitlines() if "mlflow.store.db.utils" not in line]

    def wait(self, timeout: float = 240) -> tuple[int, float]:
        started = time.monotonic()
        try:
            code = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(f"driver still running after {timeout}s:\n{self.output()}") from None
        return code, time.monotonic() - started

    def kill(self, sig: int = signal.SIGKILL) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, sig) if sig == signal.SIGKILL else os.kill(self.proc.pid, sig)
        if sig == signal.SIGKILL:
            self.proc.wait()


def trial_runs(uri: str) -> list:
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("quickstart")
    return client.search_runs([experiment.experiment_id], "tags.`fasweep.role` = 'trial'") if experiment else []


def parent_runs(uri: str) -> list:
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("quickstart")
    return client.search_runs([experiment.experiment_id], "tags.`fasweep.role` = 'parent'") if experiment else []


def wait_for(driver: Driver, condition: Callable[[], bool], what: str, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert driver.proc.poll() is None, f"launch ended before {what}:\n{driver.output()}"
        assert time.monotonic() < deadline, f"timed out waiting for {what}:\n{driver.output()}"
        time.sleep(0.3)


def mid_way(uri: str, n: int = 1) -> Callable[[], bool]:
    """Whether `n` trials are running past their second epoch."""

    def check() -> bool:
        try:
            runs = trial_runs(uri)
        except Exception:  # the store is being created
            return False
        running = [
            r for r in runs if r.data.tags["fasweep.status"] == "running" and r.data.metrics.get("epoch", 0) >= 2
        ]
        return len(running) >= n

    return check


def assert_no_run_running(uri: str) -> None:
    for run in [*parent_runs(uri), *trial_runs(uri)]:
        assert run.data.tags["fasweep.status"] != "running" and run.info.status != "RUNNING", run.info.run_name


def assert_every_epoch_once(uri: str) -> None:
    client = MlflowClient(uri)
    runs = trial_runs(uri)
    assert len(runs) == 3
    for run in runs:
        steps = sorted(m.step for m in client.get_metric_history(run.info.run_id, "test_acc"))
        assert steps == list(range(1, EPOCHS + 1)), (run.info.run_name, steps)
        assert run.data.tags["fasweep.status"] == "finished"


def resume_and_check(tmp_path: Path, uri: str, address: str, *extra: str) -> dict[str, int]:
    """`--resume` (with the launch's `extra` flags) finishes the launch: every epoch once; returns trial -> epoch it
    continued from."""
    before = {r.data.tags["fasweep.trial_key"]: r.data.tags["fasweep.status"] for r in trial_runs(uri)}
    driver = Driver(tmp_path, uri, address, *extra, "--resume")
    code, _ = driver.wait()
    assert code == 0, driver.output()
    assert len(driver.lines()) <= MAX_LINES, driver.output()
    assert_every_epoch_once(uri)
    resumed = {}
    for run in trial_runs(uri):
        tags = run.data.tags
        if before.get(tags["fasweep.trial_key"]) == "finished":
            assert "fasweep.resumed_from" not in tags  # not run again
            continue
        resumed[tags["fasweep.trial_key"]] = int(tags["fasweep.resumed_from"])
        assert int(tags["fasweep.epochs_run"]) == EPOCHS - resumed[tags["fasweep.trial_key"]]
    return resumed


@pytest.fixture
def uri(tmp_path: Path) -> str:
    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    MlflowClient(store).search_experiments()
    return store


@pytest.mark.parametrize(("sig", "code"), [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_driver_signal_stops_marks_interrupted_and_resumes(ray_address, uri, tmp_path, sig, code):
    driver = Driver(tmp_path, uri, ray_address, *SLOWER)  # two trials must be seen mid-way together
    wait_for(driver, mid_way(uri, 2), "two trials were mid-way")
    driver.kill(sig)
    got, seconds = driver.wait(60)
    assert got == code and seconds < 30, driver.output()
    lines = driver.lines()
    assert len(lines) <= MAX_LINES and "--resume" in lines[-1] and "Traceback" not in driver.output(), lines
    (parent,) = parent_runs(uri)
    assert parent.data.tags["fasweep.status"] == "interrupted" and parent.info.status == "KILLED"
    assert_no_run_running(uri)
    assert {r.data.tags["fasweep.status"] for r in trial_runs(uri)} <= {"interrupted", "finished"}
    resumed = resume_and_check(tmp_path, uri, ray_address, *SLOWER)
    assert sum(epoch >= 2 for epoch in resumed.values()) >= 2  # the mid-way trials continued


def test_driver_sigkill_leaves_nothing_running_once_status_looks_and_resumes(ray_address, uri, tmp_path):
    driver = Driver(tmp_path, uri, ray_address)
    wait_for(driver, mid_way(uri, 1), "a trial was mid-way")
    driver.kill(signal.SIGKILL)
    status = subprocess.run(
        [sys.executable, "-c", "from fasweep.cli import main; main()", "status", "quickstart", "--tracking-uri", uri],
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert status.returncode == 0, status.stderr
    assert_no_run_running(uri)
    resumed = resume_and_check(tmp_path, uri, ray_address)
    assert max(resumed.values()) >= 2


def kill_trial_workers() -> None:
    """SIGKILL every Ray worker process running a trial (of this test's Ray only, not another on the machine)."""
    import psutil

    workers = psutil.Process().children(recursive=True)
    pids = [p.pid for p in workers if p.cmdline()[:1] and p.cmdline()[0].startswith("ray::ImplicitFunc")]
    assert pids, "no Ray worker runs a trial"
    for pid in pids:
        os.kill(pid, signal.SIGKILL)


def assert_retried_cleanly(driver: Driver, uri: str) -> list[int]:
    """The launch finished after Tune's retries: exit 0, a bounded console, every epoch once, nothing running; the
    epoch each retried trial continued from."""
    code, _ = driver.wait()
    assert code == 0, driver.output()
    assert len(driver.lines()) <= MAX_LINES, driver.output()
    assert_every_epoch_once(uri)
    assert_no_run_running(uri)
    return [int(r.data.tags["fasweep.resumed_from"]) for r in trial_runs(uri) if "fasweep.resumed_from" in r.data.tags]


def test_a_killed_worker_process_is_retried_from_its_checkpoint(ray_address, uri, tmp_path):
    driver = Driver(tmp_path, uri, ray_address)
    wait_for(driver, mid_way(uri, 1), "a trial was mid-way")
    kill_trial_workers()  # every trial's worker, the mid-way one among them
    resumed = assert_retried_cleanly(driver, uri)
    assert resumed and max(resumed) >= 1  # the retry continued from a checkpoint, not from epoch 0


def test_a_killed_pack_is_retried_and_every_member_continues_from_its_own_checkpoint(ray_address, uri, tmp_path):
    one_pack = ("--set", "conditions={DS0: {model.arch: DS0}}", "--set", "seeds=[0, 1, 2]", "--set", "pack=3")
    one_pack += ("--set", "max_concurrent=1")  # one slot: the 3 trials stay one pack (not cut to fill 2 slots)
    driver = Driver(tmp_path, uri, ray_address, *one_pack)
    wait_for(driver, mid_way(uri, 3), "the pack's members were mid-way")
    kill_trial_workers()
    resumed = assert_retried_cleanly(driver, uri)
    assert len(resumed) == 3 and min(resumed) >= 2, resumed  # each member after the epoch it had reported


def test_a_full_storage_stops_the_launch_once_with_one_line(ray_address, uri, tmp_path):
    small = tmp_path / "small"
    small.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(small)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here: {mounted.stderr.decode().strip()}")
    try:
        driver = Driver(tmp_path, uri, ray_address, "--set", f"storage={small}")
        code, seconds = driver.wait()
        errors = [line for line in driver.lines() if line.startswith("error:")]
        assert code == 2 and seconds < 120, driver.output()
        assert len(errors) == 1 and str(small) in errors[0] and "ENOSPC" in errors[0], driver.output()
        assert "free" in errors[0] and "storage" in errors[0]
        assert len(driver.lines()) <= MAX_LINES and "Traceback" not in driver.output(), driver.output()
        assert_no_run_running(uri)
    finally:
        subprocess.run(["umount", "-l", str(small)], check=False)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_an_unreachable_store_fails_at_start_in_seconds(ray_address, tmp_path):
    driver = Driver(tmp_path, f"http://127.0.0.1:{free_port()}", ray_address)
    code, seconds = driver.wait(60)
    lines = driver.lines()
    assert code == 2 and seconds < 30 and len(lines) == 1 and lines[0].startswith("error: tracking URI"), lines
    assert not (tmp_path / "fasweep-runs").exists()


def test_a_store_lost_mid_run_fails_loudly_and_resume_completes(ray_address, tmp_path):
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    command = [sys.executable, "-m", "mlflow", "server", "--port", str(port), "--workers", "1"]
    command += ["--backend-store-uri", f"sqlite:///{tmp_path / 'server.db'}"]
    command += ["--artifacts-destination", str(tmp_path / "artifacts")]

    def serve() -> subprocess.Popen:
        server = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            with contextlib.suppress(requests.RequestException):
                if requests.get(f"{url}/health", timeout=1).ok:
                    return server
            time.sleep(0.5)
        raise AssertionError("mlflow server did not start")

    server = serve()
    try:
        driver = Driver(tmp_path, url, ray_address, env={"FASWEEP_TRACKING_RETRY_S": "5"})
        wait_for(driver, mid_way(url, 1), "a trial was mid-way")
        os.killpg(server.pid, signal.SIGKILL)
        server.wait()
        code, _ = driver.wait()
        errors = [line for line in driver.lines() if line.startswith("error:")]
        assert code == 2 and len(errors) == 1 and url in errors[0] and "--resume" in errors[0], driver.output()
        assert len(driver.lines()) <= MAX_LINES, driver.output()
        server = serve()
        status = subprocess.run(
            [
                sys.executable,
                "-c",
                "from fasweep.cli import main; main()",
                "status",
                "quickstart",
                "--tracking-uri",
                url,
            ],
            capture_output=True,
            text=True,
        )
        assert status.returncode == 0, status.stderr
        assert_no_run_running(url)  # the store back, the dead launch is marked interrupted
        resume_and_check(tmp_path, url, ray_address)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(server.pid, signal.SIGKILL)
        server.wait()
