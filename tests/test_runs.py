"""The run-record contract (fasweep.runs): layout round trips, the one "best", the idempotent writer and the
launch lease, on a real SQLite MLflow store. Fast: no Ray, no training."""

from __future__ import annotations

import math
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from fasweep.errors import UserError
from fasweep.runs import lease as lease_module
from fasweep.runs.layout import (
    Best,
    LaunchStatus,
    Tag,
    TrialStatus,
    epoch_marker,
    marked_epoch,
    trial_dirname,
    trial_key,
    trial_status,
)
from fasweep.runs.lease import Holder, Lease
from fasweep.runs.reader import best_trial, find_launches, launch_trials, sweep_summaries
from fasweep.runs.writer import RunWriter, TrialInfo


@pytest.fixture(scope="module")
def uri(tmp_path_factory: pytest.TempPathFactory) -> str:
    store = f"sqlite:///{tmp_path_factory.mktemp('runs') / 'mlflow.db'}"
    MlflowClient(store).search_experiments()
    return store


def test_trial_dirnames_are_one_per_key_even_with_underscores_and_long_names() -> None:
    keys = [
        trial_key("main", "a_b", 0),
        trial_key("main", "a:b", 0),
        trial_key("main", "a_b", 1),
        trial_key("main", "x" * 200, 1),
        trial_key("main", "x" * 200, 2),
        "main/concordance=1.0,magnitude=uniform/s0",
    ]
    names = [trial_dirname(k) for k in keys]
    assert len(set(names)) == len(keys)
    assert all(len(n) <= 71 and "/" not in n for n in names)
    assert trial_dirname(keys[0]) == trial_dirname(keys[0])  # stable: found again on --resume


def test_epoch_markers_round_trip_and_reject_other_names() -> None:
    for epoch in (0, 1, 42, 999_999, 1_000_000):
        assert marked_epoch(epoch_marker(epoch)) == epoch
    for name in ("checkpoint.pt", "history.json", "epoch-1", "epoch-000001.tmp", "xepoch-000001"):
        assert marked_epoch(name) is None


def test_trial_status_reads_the_history() -> None:
    assert trial_status([], 3) == TrialStatus.ERROR
    assert trial_status([{"epoch": 1.0}, {"epoch": 3.0}], 3) == TrialStatus.FINISHED
    assert trial_status([{"epoch": 2.0}], 3) == TrialStatus.STOPPED
    assert trial_status([{"epoch": 1.0}, {"epoch": 2.0, "diverged": 1.0}], 3) == TrialStatus.DIVERGED


def test_best_is_the_final_value_among_healthy_trials_ties_to_the_smaller_key() -> None:
    candidates = [
        ("b", TrialStatus.FINISHED, {"test_acc": 0.9, "test_loss": 0.3}),
        ("a", TrialStatus.RUNNING, {"test_acc": 0.9, "test_loss": 0.5}),
        ("c", TrialStatus.DIVERGED, {"test_acc": 0.99, "test_loss": 0.1}),
        ("d", TrialStatus.ERROR, {"test_acc": 0.98}),
        ("e", TrialStatus.FINISHED, {"test_acc": math.nan}),
        ("f", TrialStatus.FINISHED, {"test_acc": 0.95, "diverged": 1.0}),
        ("g", TrialStatus.STOPPED, {"test_acc": 0.5, "test_loss": 0.2}),
    ]
    assert Best().choose(candidates) == ("a", 0.9)
    assert Best("test_loss", "min").choose(candidates) == ("g", 0.2)
    assert Best("val_acc").choose(candidates) is None


def _info(key: str, epochs: int = 3) -> TrialInfo:
    stage, condition, seed = key.split("/")
    return TrialInfo(key, stage, condition, int(seed[1:]), {"train": {"epochs": epochs}, "feedback": {"mode": "bp"}})


def test_writer_is_idempotent_and_the_reader_reads_what_it_wrote(uri: str, tmp_path: Path) -> None:
    writer = RunWriter(uri, "idem", "idem")
    writer.open_parent("L1", {Tag.PLAN_HASH.value: "p1"}, "name: idem\n")
    for key in ("main/A/s0", "main/B/s0"):
        writer.trial_started(_info(key))
        writer.trial_started(_info(key))  # a retried start finds the run
    for epoch, acc in ((1, 0.5), (2, 0.6), (1, 0.5), (2, 0.6), (3, 0.7)):  # a retry reports epochs again
        writer.trial_epoch("main/A/s0", {"epoch": float(epoch), "test_acc": acc})
    writer.trial_epoch("main/B/s0", {"epoch": 1.0, "test_acc": 0.8})
    history = tmp_path / "ckpt" / "history.json"
    history.parent.mkdir()
    history.write_text('[{"epoch": 1.0, "test_acc": 0.8}, {"epoch": 2.0, "test_acc": 0.9}]')
    (history.parent / "checkpoint.pt").write_bytes(b"weights")
    writer.trial_ended("main/A/s0", last={"epoch": 3.0, "test_acc": 0.7, "diverged": 0.0})
    writer.trial_ended("main/B/s0", fetch_checkpoint=lambda _: history.parent / "checkpoint.pt")  # backfills epoch 2
    writer.flush()
    writer.finish_parent(LaunchStatus.FINISHED)
    writer.close()

    mlflow = MlflowClient(uri)
    (launch,) = find_launches(mlflow, "idem")
    assert (launch.launch_id, launch.status, launch.plan_hash) == ("L1", "finished", "p1")
    trials = launch_trials(mlflow, launch)
    assert [t.key for t in trials] == ["main/A/s0", "main/B/s0"]  # one run per key
    a, b = trials
    assert [(m.step, m.value) for m in mlflow.get_metric_history(a.run_id, "test_acc")] == [
        (1, 0.5),
        (2, 0.6),
        (3, 0.7),
    ]
    assert sorted(m.step for m in mlflow.get_metric_history(b.run_id, "test_acc")) == [1, 2]
    assert (a.status, b.status) == (TrialStatus.FINISHED, TrialStatus.STOPPED)  # B ran 2 of its 3 epochs
    assert mlflow.get_run(a.run_id).info.status == "FINISHED"
    assert best_trial(trials, Best()).key == "main/B/s0"
    (summary,) = sweep_summaries(uri, "idem")
    assert summary.best is not None and summary.best.key == "main/B/s0"
    assert summary.counts == {"finished": 1, "stopped": 1}


def test_lease_refuses_a_second_driver_in_one_line_and_frees_on_release(uri: str) -> None:
    mlflow = MlflowClient(uri)
    experiment = mlflow.create_experiment("lease-refuse")
    first = Lease(mlflow, experiment, "sw", "L1")
    assert first.acquire() is None
    second = Lease(mlflow, experiment, "sw", "L2")
    started = time.monotonic()
    with pytest.raises(UserError) as refused:
        second.acquire()
    assert time.monotonic() - started < 5
    message = str(refused.value)
    assert "\n" not in message and "launch L1" in message and f"pid {os.getpid()}" in message and "--force" in message
    first.release()
    assert first.holder() is None
    assert second.acquire() is None  # free again
    second.release()


def test_a_dead_drivers_lease_is_taken_over_and_force_takes_a_live_one(uri: str, monkeypatch) -> None:
    monkeypatch.setattr(lease_module, "HEARTBEAT_S", 0.2)
    mlflow = MlflowClient(uri)
    experiment = mlflow.create_experiment("lease-steal")
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    pid = int(dead.stdout)  # a process that has exited: as a SIGKILLed driver on this host
    ghost = Lease(mlflow, experiment, "sw", "L0")
    ghost._me = Holder("L0", ghost._me.host, pid, time.time(), time.time())
    ghost._write(ghost._me)
    taker = Lease(mlflow, experiment, "sw", "L0")  # a --resume of the dead launch
    taken = taker.acquire()
    assert taken is not None and taken.pid == pid

    forcer = Lease(mlflow, experiment, "sw", "L9")
    with pytest.raises(UserError, match="already running as launch L0"):
        forcer.acquire()
    assert forcer.acquire(force=True) is not None
    deadline = time.monotonic() + 10
    while taker.lost_to is None and time.monotonic() < deadline:  # the old holder notices at its next beat
        time.sleep(0.1)
    assert taker.lost_to is not None and taker.lost_to.launch_id == "L9"
    taker.release()  # releasing a lost lease leaves the new holder's alone
    holder = forcer.holder()
    assert holder is not None and holder.launch_id == "L9"
    forcer.release()


def test_a_lease_whose_heartbeat_stopped_is_stale(monkeypatch) -> None:
    now = time.time()
    remote = Holder("L1", "another-host", 1, now - 1000, now - 5)
    assert not remote.stale(now)
    monkeypatch.setattr(lease_module, "STALE_S", 2.0)
    assert remote.stale(now)
