"""The fault matrix: a real local Ray, a real MLflow store, a real driver process, and one fault per row.

Each row asserts the exit code, a bounded console, every MLflow run's status (none left running), no metric lost
or doubled, and, where it applies, that `--resume` continues from the checkpoints (epochs trained again counted).
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections import Counter
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

    def __init__(
        self,
        tmp_path: Path,
        uri: str,
        address: str,
        *extra: str,
        env: dict[str, str] | None = None,
        spec: Path = QUICKSTART,
        sets: list[str] = SETS,
    ):
        self.log = tmp_path / f"driver-{time.monotonic_ns()}.log"
        command = [sys.executable, "-c", "from fasweep.cli import main; main()", "launch", str(spec)]
        self.proc = subprocess.Popen(
            [*command, "--tracking-uri", uri, "--address", address, *sets, *extra],
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


def role_runs(uri: str, role: str, experiment: str = "quickstart") -> list:
    """Every run of `role` (parent, condition, trial) in the experiment (all pages)."""
    client = MlflowClient(uri)
    found = client.get_experiment_by_name(experiment)
    if found is None:
        return []
    runs, token = [], None
    while True:
        page = client.search_runs([found.experiment_id], f"tags.`fasweep.role` = '{role}'", page_token=token)
        runs += page
        token = page.token
        if not token:
            return runs


def trial_runs(uri: str, experiment: str = "quickstart") -> list:
    return role_runs(uri, "trial", experiment)


def parent_runs(uri: str, experiment: str = "quickstart") -> list:
    return role_runs(uri, "parent", experiment)


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


def assert_no_run_running(uri: str, experiment: str = "quickstart") -> None:
    for role in ("parent", "condition", "trial"):
        for run in role_runs(uri, role, experiment):
            assert run.data.tags["fasweep.status"] != "running" and run.info.status != "RUNNING", run.info.run_name


def assert_every_series_once(uri: str) -> None:
    """Every metric of every trial and condition run has each epoch exactly once (no driver wrote one twice)."""
    client = MlflowClient(uri)
    for run in [*trial_runs(uri), *role_runs(uri, "condition")]:
        for key in run.data.metrics:
            steps = sorted(m.step for m in client.get_metric_history(run.info.run_id, key))
            assert steps == list(range(1, EPOCHS + 1)), (run.info.run_name, key, steps)


def row(name: str, code: int, seconds: float, lines: int) -> None:
    """A fault-matrix row as measured (printed: `pytest -s` shows them)."""
    print(f"\nFAULT ROW | {name} | exit {code} | {seconds:.1f} s | {lines} lines")


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


def test_a_full_storage_stops_the_launch_once_with_one_line(ray_address, uri, tmp_path, small_storage):
    driver = Driver(tmp_path, uri, ray_address, "--set", f"storage={small_storage}")
    code, seconds = driver.wait()
    errors = [line for line in driver.lines() if line.startswith("error:")]
    assert code == 2 and seconds < 120, driver.output()
    assert len(errors) == 1 and str(small_storage) in errors[0] and "ENOSPC" in errors[0], driver.output()
    assert "free" in errors[0] and "storage" in errors[0]
    assert len(driver.lines()) <= MAX_LINES and "Traceback" not in driver.output(), driver.output()
    assert_no_run_running(uri)


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


# --- one driver per sweep: the lease is exclusive, and a takeover marks what the old driver left ----------------

FAST_LEASE = {"FASWEEP_LEASE_HEARTBEAT_S": "1"}  # a driver notices a takeover within a second


def test_a_forced_takeover_stops_the_live_driver_and_every_step_is_logged_once(ray_address, uri, tmp_path):
    one_by_one = ("--set", "base.train.batch_size=2", "--set", "max_concurrent=1")  # lasts past the new one's start
    old = Driver(tmp_path, uri, ray_address, *one_by_one, env=FAST_LEASE)
    wait_for(old, mid_way(uri, 1), "a trial was mid-way")
    new = Driver(tmp_path, uri, ray_address, *one_by_one, "--resume", "--force", env=FAST_LEASE)
    code, seconds = old.wait(120)
    lines = old.lines()
    (launch_id,) = {r.data.tags["fasweep.launch"] for r in parent_runs(uri)}
    holder = f"launch {launch_id} (host {socket.gethostname()}, pid {new.proc.pid}, started "
    assert code == 3 and lines[-1].startswith(f"taken over: quickstart: the lease was taken over by {holder}"), lines
    assert "stopped its trials (their checkpoints kept) and wrote nothing more" in lines[-1]
    assert len(lines) <= MAX_LINES and "Traceback" not in old.output()
    row("lease taken by force (the old driver)", code, seconds, len(lines))
    code, seconds = new.wait()
    said = new.lines()
    assert code == 0 and any(line.startswith("taking the lease of quickstart from launch") for line in said), said
    assert any(line.startswith("took over the lease of quickstart from launch") for line in said), said
    row("lease taken by force (the taking driver)", code, seconds, len(said))
    assert_every_series_once(uri)  # the old driver wrote nothing once the new one did
    assert_every_epoch_once(uri)
    assert_no_run_running(uri)
    assert len(parent_runs(uri)) == 1


def test_a_plain_relaunch_after_a_sigkill_marks_the_dead_launch_interrupted(ray_address, uri, tmp_path):
    dead = Driver(tmp_path, uri, ray_address)
    wait_for(dead, mid_way(uri, 1), "a trial was mid-way")
    dead.kill(signal.SIGKILL)
    (gone,) = parent_runs(uri)
    driver = Driver(tmp_path, uri, ray_address)  # no --resume: a new launch takes the stale lease
    code, seconds = driver.wait()
    lines = driver.lines()
    assert code == 0 and any(line.startswith("took over the lease of quickstart from launch") for line in lines)
    assert len(lines) <= MAX_LINES, lines
    row("plain relaunch after SIGKILL", code, seconds, len(lines))
    old_id = gone.data.tags["fasweep.launch"]
    for run in parent_runs(uri):
        mine = run.data.tags["fasweep.launch"] == old_id
        assert run.data.tags["fasweep.status"] == ("interrupted" if mine else "finished"), run.info.run_name
    assert_no_run_running(uri)
    stopped = [r for r in trial_runs(uri) if r.data.tags["fasweep.launch"] == old_id]
    assert stopped and {r.data.tags["fasweep.status"] for r in stopped} <= {"interrupted", "finished"}


# --- a signal with a write backlog: the grace period writes first -----------------------------------------------

BACKLOG = """\
name: backlog
base:
  data: {name: digits}
  model: {arch: Dense10}
  train: {epochs: 1, batch_size: 256}
sample:
  train.lr: {loguniform: [1.0e-4, 1.0e-2]}
num_samples: 300
resources: {cpu: 0.5, gpu: 0}
max_concurrent: 4
"""


def test_a_signal_with_a_write_backlog_writes_first_and_the_console_agrees_with_mlflow(ray_address, uri, tmp_path):
    """Hundreds of one-epoch trials end faster than their runs are written; SIGINT mid-way: within the grace
    period the driver writes what it holds, trials' ends first, marks the parent and what still ran interrupted,
    and the console's counts are MLflow's (any trial it could not record is named and counted)."""
    spec = tmp_path / "backlog.yaml"
    spec.write_text(BACKLOG)
    driver = Driver(tmp_path, uri, ray_address, spec=spec, sets=[])

    trained = tmp_path / "fasweep-runs" / "backlog"  # each trial's checkpoint folder: its epoch is trained
    backlog: list[int] = []

    def behind() -> bool:  # trials trained but not yet recorded finished: the writer's backlog
        recorded = sum(r.data.tags["fasweep.status"] == "finished" for r in _safe(trial_runs, uri, "backlog"))
        backlog[:] = [len(list(trained.glob("*/_checkpoints/*/epoch-*"))) - recorded, recorded]
        return recorded >= 20 and backlog[0] >= 40

    wait_for(driver, behind, "a backlog of 40 trials", timeout=300)
    driver.kill(signal.SIGINT)
    code, seconds = driver.wait(60)
    lines = driver.lines()
    assert code == 130 and seconds < 30 and "Traceback" not in driver.output(), (seconds, lines)
    assert len(lines) <= MAX_LINES and lines[-1].startswith("continue with: fasweep launch"), lines
    row(
        f"signal with a backlog ({backlog[0]} trials trained, not recorded; {backlog[1]} recorded)",
        code,
        seconds,
        len(lines),
    )
    (parent,) = parent_runs(uri, "backlog")
    assert parent.data.tags["fasweep.status"] == "interrupted" and parent.info.status == "KILLED"
    assert_no_run_running(uri, "backlog")
    stored = Counter(r.data.tags["fasweep.status"] for r in trial_runs(uri, "backlog"))
    closing = next(line for line in lines if line.startswith("backlog @ ") and " interrupted: " in line)
    shown = {status: int(n) for n, status in re.findall(r"(\d+) (\w+)", closing.split(": ", 1)[1].split(";")[0])}
    assert shown == dict(stored), (closing, stored)  # the closing counts are MLflow's
    said = [line for line in lines if line.startswith("[main]")][-1]  # the driver's last count
    progress = {status: int(n) for n, status in re.findall(r"(\d+) (finished|error)", said)}
    late = next((line for line in lines if "could not be recorded in MLflow" in line), "")
    unrecorded = {status: int(n) for n, status in re.findall(r"(\d+) (finished|error)", late.split("(", 1)[-1])}
    assert progress["finished"] == stored["finished"] + unrecorded.get("finished", 0), (said, stored, late)
    assert stored["finished"] >= backlog[1]
    resumed = Driver(tmp_path, uri, ray_address, "--resume", spec=spec, sets=[])
    code, seconds = resumed.wait(600)
    assert code == 0, resumed.output()
    row("--resume after the signal with a backlog", code, seconds, len(resumed.lines()))
    runs = trial_runs(uri, "backlog")
    assert len(runs) == 300 and {r.data.tags["fasweep.status"] for r in runs} == {"finished"}
    client = MlflowClient(uri)
    for run in runs:  # each trial's one epoch, logged once, whichever driver logged it
        assert [m.step for m in client.get_metric_history(run.info.run_id, "test_acc")] == [1], run.info.run_name


def _safe(read: Callable[..., list], *args: str) -> list:
    """`read(*args)`, or nothing while the store is being created."""
    try:
        return read(*args)
    except Exception:
        return []


# --- a report during a launch ---------------------------------------------------------------------------------


def test_a_report_during_a_launch_leaves_the_main_report_to_the_launch(ray_address, uri, tmp_path):
    driver = Driver(tmp_path, uri, ray_address, *SLOWER)
    wait_for(driver, mid_way(uri, 1), "a trial was mid-way")
    command = [sys.executable, "-c", "from fasweep.cli import main; main()", "report", "quickstart"]
    started = time.monotonic()
    report = subprocess.run([*command, "--tracking-uri", uri], capture_output=True, text=True, cwd=tmp_path)
    seconds = time.monotonic() - started
    assert report.returncode == 0, report.stderr
    (parent,) = parent_runs(uri)
    said = [line for line in report.stderr.splitlines() if "mlflow.store.db.utils" not in line]
    launch_id = parent.data.tags["fasweep.launch"]
    assert said == [
        f"not logged on the parent run: launch {launch_id} is still running and logs its main report when it ends; "
        "--log logs this one as report-running/"
    ], said
    row("report during a launch", report.returncode, seconds, len(said) + len(report.stdout.splitlines()))
    client = MlflowClient(uri)
    assert [a.path for a in client.list_artifacts(parent.info.run_id) if a.is_dir] == []
    code, _ = driver.wait()
    logged = f"report: logged as artifacts report/ on parent run {parent.info.run_id} (tables; `fasweep report "
    assert code == 0 and any(line.startswith(logged) for line in driver.lines()), driver.output()
    table = Path(client.download_artifacts(parent.info.run_id, "report/report.md", str(tmp_path))).read_text()
    assert all(f"| {condition} | " in table for condition in ("DS0", "DSR1", "DSR2-U")), table  # every condition
