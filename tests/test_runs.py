"""The run-record contract (fasweep.runs): layout round trips, the one "best", the idempotent writer and the
launch lease, on a real SQLite MLflow store. Fast: no Ray, no training."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from mlflow.tracking import MlflowClient

from fasweep.config import TrialConfig, set_path
from fasweep.errors import UserError
from fasweep.runs import lease as lease_module
from fasweep.runs.conditions import ConditionInfo, ParentInfo, aggregate
from fasweep.runs.layout import (
    Best,
    LaunchStatus,
    Tag,
    TrialStatus,
    best_epoch,
    condition_run_names,
    epoch_marker,
    lower_is_better,
    marked_epoch,
    selection_metric,
    trial_dirname,
    trial_key,
    trial_run_name,
    trial_status,
)
from fasweep.runs.lease import Holder, Lease
from fasweep.runs.reader import best_trial, find_launches, launch_trials, running_runs
from fasweep.runs.status import sweep_summaries
from fasweep.runs.writer import RunWriter
from fasweep.spec.plan import PlannedTrial, parse_spec


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


def test_selection_metric_is_the_validation_one_where_there_is_a_split() -> None:
    assert selection_metric("test_acc", True) == "val_acc" and selection_metric("test_loss", True) == "val_loss"
    assert selection_metric("test_acc", False) == "test_acc"
    assert selection_metric("train_loss", True) == "train_loss" and selection_metric("val_acc", True) == "val_acc"
    assert lower_is_better("val_loss") and not lower_is_better("val_acc")
    history = [(1, 0.5), (2, 0.9), (3, math.nan), (4, 0.9), (5, 0.1)]
    assert best_epoch(history, "val_acc") == 2  # ties: the earliest; non-finite never best
    assert best_epoch(history, "val_loss") == 5
    assert best_epoch([(1, math.nan)], "val_acc") is None


def test_init_from_chooses_its_source_run_on_validation_data(uri: str) -> None:
    """The launch's choice (`best_trial` by `Best(init.metric, init.mode)`) on records the writer wrote and the
    reader read back: the run with the best validation accuracy, not the one with the best test accuracy."""
    plan = parse_spec(
        "name: sel\nbase: {data: {name: digits, val_fraction: 0.1}, model: {arch: Dense32 Dense10}}\nseeds: [0, 1]\n"
        "stages:\n  - {name: pre, conditions: {A: {}}}\n  - {name: fine, init_from: {stage: pre, condition: A}}\n"
    )
    init = next(t.init_from for t in plan.trials if t.init_from)
    writer = RunWriter(uri, "sel", "sel")
    writer.open_parent("L1", {Tag.PLAN_HASH.value: plan.hash}, "name: sel\n")
    finals = {"pre/A/s0": {"val_acc": 0.9, "test_acc": 0.7}, "pre/A/s1": {"val_acc": 0.8, "test_acc": 0.75}}
    for key, last in finals.items():
        writer.trial_started(_info(key, epochs=1))
        writer.trial_epoch(key, {"epoch": 1.0, **last})
        writer.trial_ended(key, last={"epoch": 1.0, **last, "diverged": 0.0})
    writer.flush()
    writer.finish_parent(LaunchStatus.FINISHED)
    writer.close()
    (launch,) = find_launches(MlflowClient(uri), "sel")
    records = launch_trials(MlflowClient(uri), launch)
    chosen = best_trial(records, Best(init["metric"], init["mode"]))
    assert init["metric"] == "val_acc" and chosen is not None and chosen.key == "pre/A/s0"
    assert best_trial(records, Best("test_acc")).key == "pre/A/s1"  # on test data it would be the other run


def _info(key: str, epochs: int = 3) -> PlannedTrial:
    stage, condition, seed = key.split("/")
    config = set_path(TrialConfig().model_dump(mode="json"), "train.epochs", epochs)  # a full config, as planned
    return PlannedTrial(key, stage, condition, int(seed[1:]), {}, config, {"cpu": 1.0, "gpu": 0.0})


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
    got: list[Holder | None] = []
    said: list[str] = []
    forcing = threading.Thread(target=lambda: got.append(forcer.acquire(force=True, say=said.append)))
    forcing.start()
    deadline = time.monotonic() + 10
    while taker.lost_to is None and time.monotonic() < deadline:  # the old holder notices at its next beat
        time.sleep(0.1)
    assert taker.lost_to is not None and taker.lost_to.launch_id == "L9"
    time.sleep(0.5)
    assert forcing.is_alive() and not got  # the taking driver waits until the old one has let go
    assert said and said[0].startswith("taking the lease of sw from launch L0") and "waiting for its driver" in said[0]
    taker.release()  # letting go of a lost lease leaves the new holder's alone and says so
    forcing.join(5)
    assert got and got[0] is not None and taker._me.same(got[0])
    holder = forcer.holder()
    assert holder is not None and holder.launch_id == "L9"
    forcer.release()


def test_a_driver_whose_lease_is_taken_is_told_and_the_taker_waits_at_most_until_it_is_stale(
    uri: str, monkeypatch
) -> None:
    """`on_lost` runs once the heartbeat finds the lease taken; a holder that never lets go (hung, or on another
    machine) is waited for only until its heartbeat is stale; the old holder's heartbeat writing over the
    taker's lease while it waits is undone."""
    monkeypatch.setattr(lease_module, "HEARTBEAT_S", 0.2)
    mlflow = MlflowClient(uri)
    experiment = mlflow.create_experiment("lease-wait")
    lost: list[Holder] = []
    old = Lease(mlflow, experiment, "sw", "L1", on_lost=lost.append)
    old.acquire()
    monkeypatch.setattr(lease_module, "STALE_S", 1.5)
    new = Lease(mlflow, experiment, "sw", "L2")
    clobbered = threading.Timer(0.7, lambda: old._write(old._me))  # an old heartbeat landing after the take
    clobbered.start()
    started = time.monotonic()
    assert new.acquire(force=True) is not None
    assert 0.5 < time.monotonic() - started < 5  # until stale: the old holder never said it let go
    assert new.holder() is not None and new.holder().launch_id == "L2"  # written back over the old beat
    deadline = time.monotonic() + 5
    while not lost and time.monotonic() < deadline:
        time.sleep(0.05)
    assert [h.launch_id for h in lost] == ["L2"] and old.lost_to is not None
    old.release()
    new.release()


def test_a_lease_whose_heartbeat_stopped_is_stale(monkeypatch) -> None:
    now = time.time()
    remote = Holder("L1", "another-host", 1, now - 1000, now - 5)
    assert not remote.stale(now)
    monkeypatch.setattr(lease_module, "STALE_S", 2.0)
    assert remote.stale(now)


# --- condition runs -------------------------------------------------------------------------------------------


def test_condition_run_names_keep_what_varies_shortest_and_unique() -> None:
    grid = "concordance={},magnitude={},batchnorm=false"
    names = condition_run_names(
        [("main", grid.format(c, m)) for c in ("1.0", "0.5") for m in ("uniform", "batch_random", "random")]
    )
    assert names["main", grid.format("1.0", "uniform")] == "concordance=1 magnitude=uniform"
    assert names["main", grid.format("0.5", "batch_random")] == "concordance=0.5 magnitude=batch"
    assert names["main", grid.format("0.5", "random")] == "concordance=0.5 magnitude=random"
    assert condition_run_names([("main", "DS0,loss=hinge"), ("main", "DSR1,loss=hinge")]) == {
        ("main", "DS0,loss=hinge"): "DS0",
        ("main", "DSR1,loss=hinge"): "DSR1",
    }
    staged = condition_run_names([("pre", "bp"), ("post", "bp"), ("post", "random")])
    assert staged == {("pre", "bp"): "pre/bp", ("post", "bp"): "post/bp", ("post", "random"): "post/random"}
    assert condition_run_names([("main", "base")]) == {("main", "base"): "base"}
    listed = condition_run_names([("main", "layers=[1,2]"), ("main", "layers=[1,3]")])
    assert listed == {("main", "layers=[1,2]"): "layers=[1,2]", ("main", "layers=[1,3]"): "layers=[1,3]"}
    assert trial_run_name("concordance=1 magnitude=uniform", 0) == "concordance=1 magnitude=uniform s0"


def _histories(mlflow: MlflowClient, run_id: str) -> dict[int, dict[str, float]]:
    """A run's metrics by step, every logged value kept (a repeated step would show as a list)."""
    out: dict[int, dict[str, list[float]]] = {}
    for key in mlflow.get_run(run_id).data.metrics:
        for m in mlflow.get_metric_history(run_id, key):
            out.setdefault(m.step, {}).setdefault(key, []).append(m.value)
    assert all(len(v) == 1 for row in out.values() for v in row.values()), "a step was logged twice"
    return {step: {k: v[0] for k, v in row.items()} for step, row in out.items()}


def check_condition_runs(uri: str, experiment: str) -> list:
    """Recompute every condition run's per-epoch mean, sd and n from its trial runs (MLflow client, numpy) and
    compare: errored trials left out, a diverged one carried at its last epoch, epochs written once no trial can
    change them (all planned trials have runs, each ended or past the epoch); the condition runs, checked."""
    mlflow = MlflowClient(uri)
    exp = mlflow.get_experiment_by_name(experiment).experiment_id
    conditions = mlflow.search_runs([exp], "tags.`fasweep.role` = 'condition'")
    assert conditions
    for cond in conditions:
        trials = mlflow.search_runs([exp], f"tags.`mlflow.parentRunId` = '{cond.info.run_id}'")
        assert trials and {t.data.tags["fasweep.role"] for t in trials} == {"trial"}
        assert {t.data.tags["fasweep.condition"] for t in trials} == {cond.data.tags["fasweep.condition"]}
        kept = [(t.data.tags["fasweep.status"], _histories(mlflow, t.info.run_id)) for t in trials]
        kept = [(status, h) for status, h in kept if status != "error" and h]
        running = [max(h) for status, h in kept if status in ("running", "interrupted")]
        planned = int(cond.data.tags["fasweep.n_trials"])
        through = 0 if len(trials) < planned else min(running, default=max(max(h) for _, h in kept))
        expected: dict[int, dict[str, float]] = {}
        for epoch in range(1, through + 1):
            rows = [h[epoch] if epoch in h else h[max(h)] for s, h in kept if epoch in h or s == "diverged"]
            if not rows:
                continue
            expected[epoch] = {"n": float(len(rows))}
            for key in {k for row in rows for k in row} - {"epoch"}:
                values = np.array([row[key] for row in rows if key in row and np.isfinite(row[key])])
                expected[epoch][key] = float(values.mean())
                if len(values) > 1:
                    expected[epoch][f"{key}_sd"] = float(values.std(ddof=1))
        got = _histories(mlflow, cond.info.run_id)
        assert sorted(got) == sorted(expected), cond.info.run_name
        for epoch, row in expected.items():
            assert got[epoch] == pytest.approx(row, rel=1e-9, abs=1e-12), (cond.info.run_name, epoch)
    return conditions


def _declared(keys: dict[str, list[int]], epochs: int = 4) -> ParentInfo:
    conditions = tuple(
        ConditionInfo("main", c, c, tuple(f"main/{c}/s{s}" for s in seeds), {"feedback.mode": "bp"}, epochs)
        for c, seeds in keys.items()
    )
    return ParentInfo({"feedback.mode": "bp", "train.seed": "[0, 1, 2]"}, "compares A and B", conditions, Best())


def _epoch(epoch: int, acc: float, **extra: float) -> dict[str, float]:
    return {"epoch": float(epoch), "test_acc": acc, "train_loss": 1.0 / epoch, **extra}


def test_a_condition_logs_its_test_metrics_first_and_n_last() -> None:
    """MLflow keeps a run's metrics in the order of its first batch, and its Compare page opens on the first one."""
    history = {1: {"epoch": 1.0, "angle/dense0": 60.0, "train_loss": 0.5, "test_loss": 0.4, "test_acc": 0.8}}
    assert list(aggregate([("finished", history), ("finished", history)], 1)) == [
        "test_acc", "test_acc_sd", "test_loss", "test_loss_sd", "angle/dense0", "angle/dense0_sd", "train_loss",
        "train_loss_sd", "n",
    ]  # fmt: skip


def test_condition_runs_average_their_trials_through_errors_divergence_and_a_resume(uri: str) -> None:
    declared = _declared({"A": [0, 1, 2], "B": [0, 1]})
    writer = RunWriter(uri, "cond", "cond")
    writer.open_parent("L1", {}, "name: cond\n", parent=declared)
    for key in ("main/A/s0", "main/A/s1", "main/A/s2", "main/B/s0"):
        writer.trial_started(_info(key, epochs=4))
    for epoch in (1, 2, 3):
        writer.trial_epoch("main/A/s0", _epoch(epoch, 0.5 + 0.1 * epoch))
        writer.trial_epoch("main/A/s2", _epoch(epoch, 0.4 + 0.1 * epoch, angle=30.0))
        if epoch < 3:
            writer.trial_epoch("main/B/s0", _epoch(epoch, 0.3 * epoch))
    writer.trial_epoch("main/A/s1", _epoch(1, 0.45))
    writer.flush()
    mlflow = MlflowClient(uri)
    (a_run,) = mlflow.search_runs(
        [writer.experiment_id], "tags.`fasweep.role` = 'condition' and tags.`fasweep.condition` = 'A'"
    )
    assert a_run.info.run_name == "A" and a_run.data.params["feedback.mode"] == "bp"
    assert a_run.data.tags["mlflow.parentRunId"] == writer.parent_id
    assert sorted(m.step for m in mlflow.get_metric_history(a_run.info.run_id, "n")) == [1]  # s1 reported epoch 1
    diverged = _epoch(2, 0.47, diverged=1.0, train_loss=math.nan)  # evaluated with the weights before the bad step
    writer.trial_epoch("main/A/s1", diverged)
    writer.trial_ended("main/A/s1", last=diverged)
    writer.trial_epoch("main/A/s0", _epoch(4, 0.9))
    writer.trial_ended("main/A/s0", last=_epoch(4, 0.9))
    writer.trial_ended("main/A/s2", error="RuntimeError: worker died")  # counted at epochs 1-3 until now
    writer.flush()
    writer.finish_parent(LaunchStatus.INTERRUPTED)  # B/s0 still running, B/s1 never started
    writer.close()
    a_first = check_condition_runs(uri, "cond")
    assert {c.data.tags["fasweep.condition"]: c.data.tags["fasweep.status"] for c in a_first} == {
        "A": "error",
        "B": "running",
    }
    assert all(c.info.run_id != a_run.info.run_id for c in a_first)  # A was replaced when s2 errored
    running = running_runs(mlflow, writer.experiment_id, "L1")  # what a stopped driver leaves to mark interrupted
    assert sorted(mlflow.get_run(r).info.run_name for r in running) == ["B", "B s0"]

    resumed = RunWriter(uri, "cond", "cond")
    (launch,) = find_launches(mlflow, "cond")
    resumed.open_parent("L1", {}, "name: cond\n", run_id=launch.run_id, parent=declared)
    for key in ("main/A/s2", "main/B/s0", "main/B/s1"):
        resumed.trial_started(_info(key, epochs=4))
    resumed.trial_epoch("main/A/s2", _epoch(4, 0.8, angle=20.0))
    resumed.trial_ended("main/A/s2", last=_epoch(4, 0.8, angle=20.0))
    for epoch in (1, 2, 3, 4):
        resumed.trial_epoch("main/B/s1", _epoch(epoch, 0.2 * epoch))
        if epoch > 2:
            resumed.trial_epoch("main/B/s0", _epoch(epoch, 0.3 * epoch - 0.2))
    resumed.trial_ended("main/B/s1", last=_epoch(4, 0.8))
    resumed.trial_ended("main/B/s0", last=_epoch(4, 1.0))
    resumed.flush()
    resumed.finish_parent(LaunchStatus.FINISHED)
    resumed.close()

    conditions = check_condition_runs(uri, "cond")
    assert len(conditions) == 2  # replaced runs are deleted, never duplicated
    assert {c.data.tags["fasweep.status"] for c in conditions} == {"finished"}
    by_name = {c.info.run_name: c for c in conditions}
    assert by_name["A"].data.metrics["n"] == 3 and by_name["B"].data.metrics["n"] == 2
    trials = launch_trials(mlflow, launch)
    assert len(trials) == 5 and {t.name for t in trials} >= {"A s0", "B s1"}
    parent = mlflow.get_run(launch.run_id)
    a_final = mlflow.get_metric_history(by_name["A"].info.run_id, "test_acc")[-1]
    assert (a_final.step, a_final.value) == (4, pytest.approx(np.mean([0.9, 0.47, 0.8])))  # s1 counts as it ended
    assert parent.data.tags["fasweep.best_condition"] == "B"
    assert parent.data.metrics["best_test_acc"] == pytest.approx(0.9)
    assert parent.data.metrics["best_test_acc_sd"] == pytest.approx(np.std([0.8, 1.0], ddof=1))
    assert parent.data.metrics["best_n"] == 2
    note = parent.data.tags["mlflow.note.content"]
    assert note.startswith("compares A and B") and "**Best condition:** B" in note
    assert parent.data.params == {"feedback.mode": "bp", "train.seed": "[0, 1, 2]"}
    (summary,) = sweep_summaries(uri, "cond")
    assert sum(summary.counts.values()) == 5  # status counts trials only


def test_condition_runs_stay_exact_when_an_epoch_arrives_late_or_an_errored_trial_restarts(
    uri: str, tmp_path: Path
) -> None:
    """A trial's epoch backfilled below the condition's written epochs (from its checkpoint's history) and a trial
    that errored before its first epoch, resumed: the condition run is rewritten, never left with stale epochs."""
    declared = _declared({"C": [0, 1, 2]}, epochs=3)
    writer = RunWriter(uri, "late", "late")
    writer.open_parent("L1", {}, "name: late\n", parent=declared)
    for key in ("main/C/s0", "main/C/s1", "main/C/s2"):
        writer.trial_started(_info(key))
    writer.trial_ended("main/C/s2", error="RuntimeError: no GPU")  # before its first epoch: settled, not counted
    late = [_epoch(epoch, 0.4 + 0.1 * epoch) for epoch in (1, 2, 3)]
    for epoch in (1, 2, 3):
        writer.trial_epoch("main/C/s0", _epoch(epoch, 0.5 + 0.1 * epoch))
        if epoch != 2:  # s1's epoch 2 never reached the driver: epoch 2 is written with s0 alone
            writer.trial_epoch("main/C/s1", late[epoch - 1])
    writer.flush()
    first = check_condition_runs(uri, "late")
    checkpoint = tmp_path / "ckpt" / "checkpoint.pt"
    checkpoint.parent.mkdir()
    checkpoint.write_bytes(b"weights")
    (checkpoint.parent / "history.json").write_text(json.dumps(late))
    writer.trial_ended("main/C/s0", last=_epoch(3, 0.8))
    writer.trial_ended("main/C/s1", fetch_checkpoint=lambda _: checkpoint)  # backfills epoch 2
    writer.flush()
    writer.finish_parent(LaunchStatus.INTERRUPTED)
    writer.close()
    (replaced,) = check_condition_runs(uri, "late")
    assert replaced.info.run_id != first[0].info.run_id and replaced.data.tags["fasweep.status"] == "error"

    mlflow = MlflowClient(uri)
    (launch,) = find_launches(mlflow, "late")
    resumed = RunWriter(uri, "late", "late")
    resumed.open_parent("L1", {}, "name: late\n", run_id=launch.run_id, parent=declared)
    resumed.trial_started(_info("main/C/s2"))  # running again, no epoch yet: no epoch of C is settled
    resumed.flush()
    (waiting,) = mlflow.search_runs([resumed.experiment_id], "tags.`fasweep.role` = 'condition'")
    assert waiting.data.metrics == {}
    for epoch in (1, 2, 3):
        resumed.trial_epoch("main/C/s2", _epoch(epoch, 0.6))
    resumed.trial_ended("main/C/s2", last=_epoch(3, 0.6))
    resumed.flush()
    resumed.finish_parent(LaunchStatus.FINISHED)
    resumed.close()
    (final,) = check_condition_runs(uri, "late")
    assert final.data.metrics["n"] == 3 and final.data.tags["fasweep.status"] == "finished"


def test_a_read_only_sqlite_store_is_refused_at_the_reachability_check(tmp_path: Path) -> None:
    from fasweep.runs.store import check_reachable

    source, folder = tmp_path / "rw", tmp_path / "ro"
    source.mkdir()
    folder.mkdir()
    MlflowClient(f"sqlite:///{source / 'mlflow.db'}").search_experiments()
    if subprocess.run(["mount", "--bind", str(source), str(folder)], capture_output=True).returncode:
        pytest.skip("cannot bind-mount here")
    try:
        subprocess.run(["mount", "-o", "remount,bind,ro", str(folder)], check=True)
        started = time.monotonic()
        with pytest.raises(UserError, match=r"^tracking URI: got .*(is read-only|not writable)"):
            check_reachable(f"sqlite:///{folder / 'mlflow.db'}")
        assert time.monotonic() - started < 10
    finally:
        subprocess.run(["umount", "-l", str(folder)], check=False)
