"""fasweep launch/status end to end: a real local Ray, a real MLflow SQLite store, real train() on digits."""

from __future__ import annotations

import contextlib
import io
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient
from rich.console import Console

from fasweep.checkpoints import find_checkpoints
from fasweep.cli import main
from fasweep.config import TrialConfig, set_path, validate_trial
from fasweep.launch import ERRORS_LOG, launch
from fasweep.preflight import preflight
from fasweep.runs.layout import CHECKPOINTS_DIR, LaunchStatus, epoch_marker, trial_checkpoints
from fasweep.runs.store import TrackingError
from fasweep.runs.writer import RunWriter
from fasweep.spec.plan import PlannedTrial, load_spec
from fasweep.train import train

REPO = Path(__file__).resolve().parents[1]
SIGN_CONCORDANCE = REPO / "sweeps" / "sign_concordance.yaml"
QUICKSTART = REPO / "sweeps" / "quickstart.yaml"
TINY = ["--set", "base.data.name=digits", "--set", "resources.gpu=0", "--set", "max_retries=0"]


@pytest.fixture(scope="module")
def ray_address():
    """One local Ray for the module (launch() reuses it); its GCS address for drivers in subprocesses."""
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="ERROR")
    yield ray.get_runtime_context().gcs_address
    ray.shutdown()


@pytest.fixture(scope="module")
def store_db(tmp_path_factory) -> str:
    """One SQLite MLflow store for the module (each test uses its own experiment; creating a store takes seconds).

    Created here, once: two processes creating the same SQLite store at the same time collide in its migrations.
    """
    uri = f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}"
    MlflowClient(uri).search_experiments()
    return uri


@pytest.fixture
def store(store_db, tmp_path, monkeypatch) -> str:
    """The module's MLflow store; tmp_path is the working directory (the Tune storage goes there)."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    return store_db


def runs(uri: str, experiment: str, role: str) -> list:
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(experiment)
    return client.search_runs([exp.experiment_id], f"tags.`fasweep.role` = '{role}'") if exp else []


def steps(uri: str, run, key: str = "test_acc") -> list[int]:
    return sorted(m.step for m in MlflowClient(uri).get_metric_history(run.info.run_id, key))


def cli(*args: str) -> int:
    """Run the CLI in this process; its exit code."""
    try:
        main(list(args))
    except SystemExit as exc:
        return int(exc.code or 0)
    return 0


def write_spec(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_small_grid_gives_the_planned_child_runs_and_resume_adds_nothing(ray_address, store, tmp_path, capsys):
    sets = [
        *TINY,
        *("--set", "base.model.arch=Dense64 Dense10", "--set", "base.train.epochs=2"),
        *("--set", "grid.feedback.concordance=[1.0, 0.0]", "--set", "grid.feedback.magnitude=[uniform]"),
        *("--set", "grid.model.batchnorm=[false]", "--set", "grid.train.batch_manhattan=[false]"),
        *("--set", "seeds=[0, 1]", "--set", "max_concurrent=2"),
    ]
    assert cli("launch", str(SIGN_CONCORDANCE), "--tracking-uri", store, *sets) == 0
    *_, closing, tracked, said, pages = capsys.readouterr().out.strip().splitlines()
    best_key, best_value = closing.split("; best ")[1].split()
    assert tracked.startswith("MLflow: experiment 'sign_concordance', parent run ")
    assert pages == f"its pages in the MLflow UI: fasweep ui sign_concordance --tracking-uri {store}"
    parents, children = runs(store, "sign_concordance", "parent"), runs(store, "sign_concordance", "trial")
    assert len(parents) == 1 and parents[0].data.tags["fasweep.status"] == "finished"
    parent = parents[0]
    launch_id = parent.data.tags["fasweep.launch"]
    assert parent.info.run_name == f"sign_concordance@{launch_id}"
    assert parent.data.tags["fasweep.n_trials"] == "4"
    assert "feedback.concordance" in parent.data.tags["fasweep.axes"]
    client = MlflowClient(store)
    assert [a.path for a in client.list_artifacts(parent.info.run_id)] == ["report", "spec.yaml"]
    assert said == (  # the main report's tables
        f"report: logged as artifacts report/ on parent run {parent.info.run_id} (tables; `fasweep report "
        "sign_concordance` adds the plots)"
    )
    table = Path(client.download_artifacts(parent.info.run_id, "report/report.md", str(tmp_path))).read_text()
    assert "| concordance=1.0," in table and "| concordance=0.0," in table

    keys = sorted(c.data.tags["fasweep.trial_key"] for c in children)
    grid = "concordance={},magnitude=uniform,batchnorm=false,batch_manhattan=false"
    assert keys == sorted(f"main/{grid.format(c)}/s{s}" for c in ("1.0", "0.0") for s in (0, 1))
    for child in children:
        tags, params = child.data.tags, child.data.params
        condition = client.get_run(tags["mlflow.parentRunId"])
        assert condition.data.tags["fasweep.role"] == "condition"
        assert condition.data.tags["mlflow.parentRunId"] == parent.info.run_id
        assert tags["fasweep.launch_run"] == parent.info.run_id
        assert tags["fasweep.launch"] == launch_id and tags["fasweep.status"] == "finished"
        assert child.info.run_name == f"{condition.info.run_name} s{tags['fasweep.seed']}"
        assert condition.info.run_name in ("concordance=1", "concordance=0")
        assert params["feedback.mode"] == "sign_concordant" and params["data.name"] == "digits"
        assert params["feedback.concordance"] == tags["fasweep.condition"].split(",")[0].split("=")[1]
        assert params["train.seed"] == tags["fasweep.seed"]
        assert steps(store, child) == [1, 2] and steps(store, child, "train_loss") == [1, 2]
        assert any(k.startswith("angle/") for k in child.data.metrics)
        assert {a.path for a in client.list_artifacts(child.info.run_id)} == {"checkpoint", "curves.png"}
    accuracy = {c.data.tags["fasweep.condition"].split(",")[0]: c.data.metrics["test_acc"] for c in children}
    assert accuracy["concordance=1.0"] > 0.5  # digits, 2 epochs: clearly learning (chance is 0.1)
    assert (tmp_path / "fasweep-runs" / "sign_concordance" / launch_id / "main").is_dir()

    capsys.readouterr()
    assert cli("launch", str(SIGN_CONCORDANCE), "--tracking-uri", store, "--resume", *sets, "--set", "seeds=[0]") == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "they differ: seeds: [0,1] -> [0]" in err, err
    assert cli("launch", str(SIGN_CONCORDANCE), "--tracking-uri", store, "--resume", *sets) == 0
    assert "nothing to resume" in capsys.readouterr().out
    assert len(runs(store, "sign_concordance", "parent")) == 1
    assert len(runs(store, "sign_concordance", "trial")) == 4

    assert cli("status", "sign_concordance", "--tracking-uri", store) == 0
    shown = capsys.readouterr().out
    assert launch_id in shown and "4 finished" in shown
    assert f"best test_acc {best_value}: {best_key}\n" in shown  # status names the launch's best trial
    top = max(
        children, key=lambda c: (c.data.metrics["test_acc"], [-ord(ch) for ch in c.data.tags["fasweep.trial_key"]])
    )
    assert best_key == top.data.tags["fasweep.trial_key"]  # the best final test_acc (ties: the smaller key)


def test_diverging_condition_is_recorded_as_diverged_while_the_rest_finish(ray_address, store, tmp_path):
    spec = write_spec(
        tmp_path / "div.yaml",
        """
name: divergence
base:
  data: {name: digits}
  model: {arch: Dense32 Dense10}
  train: {optimizer: sgd, lr: 0.05, epochs: 3, alignment_every: 0}
conditions:
  sane: {train.lr: 0.05}
  huge: {train.lr: 1.0e+20}
seeds: [0]
max_retries: 0
""",
    )
    result = launch(spec, tracking_uri=store)
    assert result.status == "finished" and result.counts == {"diverged": 1, "finished": 1}
    by_condition = {c.data.tags["fasweep.condition"]: c for c in runs(store, "divergence", "trial")}
    huge, sane = by_condition["huge"], by_condition["sane"]
    assert huge.data.tags["fasweep.status"] == "diverged" and huge.data.metrics["diverged"] == 1.0
    assert steps(store, huge, "train_loss") == [1]
    assert sane.data.tags["fasweep.status"] == "finished" and steps(store, sane) == [1, 2, 3]
    assert sane.data.metrics["diverged"] == 0.0 and sane.data.metrics["test_acc"] > 0.5


PACKED = """
name: packed
base:
  data: {name: digits}
  model: {arch: Dense32 Dense10}
  train: {optimizer: adam, lr: 1.0e-3, epochs: 2, alignment_every: 0}
conditions:
  a: {train.lr: 1.0e-3}
  b: {train.lr: 3.0e-3}
seeds: [0, 1, 2, 3]
max_retries: 0
"""


def test_a_packed_sweep_gives_every_member_its_own_run_and_the_solo_metrics(ray_address, store, tmp_path):
    spec = write_spec(tmp_path / "packed.yaml", PACKED)
    finals = {}
    for pack in (4, 1):
        experiment = f"packed-{pack}"
        result = launch(spec, sets={"pack": pack, "experiment": experiment}, tracking_uri=store)
        assert result.status == "finished" and result.counts == {"finished": 8}
        children = runs(store, experiment, "trial")
        assert len(children) == 8
        for child in children:
            assert child.data.tags["fasweep.status"] == "finished" and child.info.status == "FINISHED"
            assert steps(store, child) == [1, 2] and steps(store, child, "train_loss") == [1, 2]
            assert "checkpoint" in {a.path for a in MlflowClient(store).list_artifacts(child.info.run_id)}
        finals[pack] = {c.data.tags["fasweep.trial_key"]: c.data.metrics["test_acc"] for c in children}
        found = find_checkpoints(result.storage, sorted(finals[pack]))
        assert found == {  # a member's checkpoints are in the folder it has alone
            key: [f"{trial_checkpoints(result.storage, key)}/{epoch_marker(e)}" for e in (2, 1)] for key in finals[pack]
        }
    assert finals[4].keys() == finals[1].keys()
    for key, value in finals[1].items():
        assert abs(finals[4][key] - value) <= 1e-6, key


def test_a_diverging_pack_member_is_diverged_while_the_others_finish_unchanged(ray_address, store, tmp_path):
    spec = write_spec(tmp_path / "div.yaml", PACKED.replace("b: {train.lr: 3.0e-3}", "b: {train.lr: 1.0e+20}"))
    sane = {}
    for pack in (8, 1):
        experiment = f"packdiv-{pack}"
        result = launch(spec, sets={"pack": pack, "seeds": [0, 1], "experiment": experiment}, tracking_uri=store)
        assert result.status == "finished" and result.counts == {"diverged": 2, "finished": 2}
        for child in runs(store, experiment, "trial"):
            tags = child.data.tags
            if tags["fasweep.condition"] == "b":
                assert tags["fasweep.status"] == "diverged" and child.data.metrics["diverged"] == 1.0
                assert steps(store, child, "train_loss") == [1]
            else:
                assert tags["fasweep.status"] == "finished" and steps(store, child) == [1, 2]
                sane.setdefault(tags["fasweep.trial_key"], []).append(child.data.metrics["test_acc"])
    assert len(sane) == 2 and all(abs(packed - alone) <= 1e-6 for packed, alone in sane.values()), sane


def test_resume_continues_a_member_packed_or_alone(ray_address, store, tmp_path, capsys):
    spec = write_spec(tmp_path / "resume.yaml", PACKED.replace("name: packed", "name: packres"))
    sets = {"seeds": [0, 1], "pack": 4}
    first = launch(spec, sets=sets, tracking_uri=store)
    assert first.status == "finished"
    client = MlflowClient(store)
    before = {c.data.tags["fasweep.trial_key"]: c.data.metrics["test_acc"] for c in runs(store, "packres", "trial")}
    for pack in (1, 4):  # packed checkpoints resumed alone, then solo ones resumed as a pack
        client.set_tag(first.parent_run_id, "fasweep.status", "interrupted")
        children = sorted(runs(store, "packres", "trial"), key=lambda c: c.data.tags["fasweep.trial_key"])
        for child in children[:2]:
            client.set_tag(child.info.run_id, "fasweep.status", "interrupted")
        capsys.readouterr()
        result = launch(spec, sets={**sets, "pack": pack}, tracking_uri=store, resume=True)
        out = capsys.readouterr().out
        assert result.status == "finished" and result.counts == {"finished": 4}, out
        assert "[main] 2 trials continue after epoch 2\n" in out, out
        for child in runs(store, "packres", "trial"):
            key = child.data.tags["fasweep.trial_key"]
            assert child.data.tags["fasweep.status"] == "finished" and steps(store, child) == [1, 2]
            assert child.data.metrics["test_acc"] == before[key]
        assert len(runs(store, "packres", "trial")) == 4


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("uri", ["http://127.0.0.1:{port}", "sqlite:////nonexistent-dir/mlflow.db"])
def test_unreachable_tracking_store_fails_fast_before_any_trial(store, tmp_path, capsys, uri):
    uri = uri.format(port=free_port())
    start = time.monotonic()
    assert cli("launch", str(QUICKSTART), "--tracking-uri", uri, *TINY) == 2
    assert time.monotonic() - start < 20
    err = capsys.readouterr().err
    assert err.startswith("error: tracking URI") and uri in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "fasweep-runs").exists()


def test_a_trial_larger_than_the_local_ray_fails_fast_instead_of_waiting(ray_address, store, tmp_path, capsys):
    assert cli("launch", str(QUICKSTART), "--tracking-uri", store, *TINY, "--set", "resources.gpu=1") == 2
    err = capsys.readouterr().err
    assert err.startswith("error: resources.gpu: got 1") and "--set resources.gpu=0" in err
    assert len(err.strip().splitlines()) == 1
    assert runs(store, "quickstart", "parent") == []


def test_a_net_larger_than_a_workers_memory_is_refused_before_any_trial(ray_address, store, tmp_path, capsys):
    """40 GB of weights (and as much again for gradients, twice for Adam's moments), measured without allocating."""
    big = "conditions={big: {model.arch: Dense100000 Dense100000 Dense10}}"
    started = time.monotonic()
    assert cli("launch", str(QUICKSTART), "--tracking-uri", store, *TINY, "--set", big, "--set", "seeds=[0]") == 2
    assert time.monotonic() - started < 30
    err = capsys.readouterr().err
    assert err.startswith("error: model.arch: got 'Dense100000 Dense100000 Dense10'; expected a net whose training")
    assert "main/big/s0 needs 160.1 GB (state 40.0 GB, gradients 40.0 GB, optimizer moments 80.1 GB)" in err, err
    assert "of the largest Ray node" in err and len(err.strip().splitlines()) == 1
    assert runs(store, "quickstart", "parent") == []


def test_the_free_space_warning_counts_the_real_checkpoints(tmp_path, small_storage):
    """The plan's checkpoints estimated from each net's state and optimizer moments (on the data's own input shape)
    match the checkpoints train() writes, and a storage with less free space says so once."""
    plan = load_spec(QUICKSTART, {"base.data.name": "digits", "storage": str(small_storage), "seeds": [0, 1]})
    real = 0
    for trial in plan.trials:
        config = validate_trial(trial.config | {"train": {**trial.config["train"], "epochs": 1}})
        train(config, checkpoint_dir=tmp_path / trial.key)
        real += next((tmp_path / trial.key).rglob("checkpoint.pt")).stat().st_size * plan.spec.checkpoint.keep
    console = Console(file=io.StringIO(), width=400)
    preflight(plan, console)
    warning = console.file.getvalue().splitlines()[-1]
    need = re.search(r"the plan's checkpoints may need ([\d.]+) MB \(2 per trial\)$", warning)
    assert warning.startswith(f"warning: storage {small_storage} has ") and need, warning
    assert float(need.group(1)) == pytest.approx(real / 1e6, rel=0.01), (real, warning)


def test_two_stage_spec_starts_the_second_stage_from_the_best_first_stage_checkpoint(ray_address, store, tmp_path):
    spec = write_spec(
        tmp_path / "staged.yaml",
        """
name: staged
base:
  data: {name: digits, val_fraction: 0.2}
  model: {arch: Dense32 Dense10}
  train: {epochs: 2, alignment_every: 0}
seeds: [0, 1]
max_retries: 0
stages:
  - name: pre
    conditions:
      A: {train.lr: 0.003}
  - name: fine
    seeds: [0]
    conditions:
      B: {model.arch: Dense32 Dense10(R)}
    init_from: {stage: pre, condition: A, layers: [0], freeze: true, select: best}
""",
    )
    result = launch(spec, tracking_uri=store)
    assert result.status == "finished" and result.counts == {"finished": 3}
    children = runs(store, "staged", "trial")
    pre = [c for c in children if c.data.tags["fasweep.stage"] == "pre"]
    (fine,) = [c for c in children if c.data.tags["fasweep.stage"] == "fine"]
    best = max(pre, key=lambda c: c.data.metrics["val_acc"])  # chosen on the validation split, not on test data
    source = f"runs:/{best.info.run_id}/checkpoint/checkpoint.pt"
    assert fine.data.params["model.init_from.checkpoint"] == source
    assert fine.data.params["model.init_from.freeze"] == "True"

    def weights(run) -> dict[str, torch.Tensor]:
        path = MlflowClient(store).download_artifacts(run.info.run_id, "checkpoint/checkpoint.pt", str(tmp_path))
        return torch.load(path, weights_only=True)["model"]

    loaded, trained = weights(best), weights(fine)
    assert torch.equal(trained["dense0.weight"], loaded["dense0.weight"])  # copied, then frozen
    assert torch.equal(trained["dense0.bias"], loaded["dense0.bias"])
    worst = min(pre, key=lambda c: c.data.metrics["val_acc"])
    assert not torch.equal(weights(worst)["dense0.weight"], loaded["dense0.weight"])  # seeds differ: a real choice


@pytest.mark.slow
def test_a_running_launch_holds_the_sweep_and_a_killed_one_resumes_without_repeating_an_epoch(
    ray_address, store, tmp_path, capsys
):
    """While a driver runs, a second launch and a --resume are refused in seconds; SIGKILLed with trials mid-way,
    --resume takes its lease over and continues every unfinished trial from its newest readable checkpoint (the
    newest one of a trial truncated: from the one before): proven from the epochs each trial trained again."""
    epochs = 10
    sets = [*TINY, "--set", f"base.train.epochs={epochs}", "--set", "seeds=[0, 1]", "--set", "max_concurrent=2"]
    sets += ["--set", "base.train.batch_size=8"]
    command = [sys.executable, "-c", "from fasweep.cli import main; main()", "launch", str(QUICKSTART)]
    driver = subprocess.Popen(
        [*command, "--tracking-uri", store, "--address", ray_address, *sets],
        cwd=tmp_path,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        stdout=(tmp_path / "driver.log").open("w"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    log = (tmp_path / "driver.log").read_text

    def wait_for(condition, what: str) -> list:
        deadline = time.monotonic() + 240
        while True:
            assert driver.poll() is None and time.monotonic() < deadline, f"launch ended before {what}:\n{log()}"
            time.sleep(0.2)
            try:
                found = condition(runs(store, "quickstart", "trial"))
            except Exception:  # the store is being created by the driver
                continue
            if found:
                return found

    try:
        wait_for(lambda children: children, "a trial started")
        for extra in ([], ["--resume"]):
            started = time.monotonic()
            assert cli("launch", str(QUICKSTART), "--tracking-uri", store, *extra, *sets) == 2
            err = capsys.readouterr().err
            assert time.monotonic() - started < 15
            assert "already running as launch" in err and f"pid {driver.pid}" in err, err
            assert len(err.strip().splitlines()) == 1
        wait_for(
            lambda children: [
                c
                for c in children
                if c.data.tags["fasweep.status"] == "running" and c.data.metrics.get("epoch", 0) >= 2
            ][1:],
            "two trials were mid-way",
        )
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(driver.pid, signal.SIGKILL)  # the driver and anything it started
        driver.wait()
    before = {c.data.tags["fasweep.trial_key"]: c for c in runs(store, "quickstart", "trial")}
    assert cli("status", "quickstart", "--tracking-uri", store) == 0  # finds the driver gone: marks the truth
    (parent,) = runs(store, "quickstart", "parent")
    assert parent.data.tags["fasweep.status"] == "interrupted" and parent.info.status == "KILLED"
    for child in runs(store, "quickstart", "trial"):
        was = before[child.data.tags["fasweep.trial_key"]].data.tags["fasweep.status"]
        assert child.data.tags["fasweep.status"] == ("interrupted" if was == "running" else was)
    root = tmp_path / "fasweep-runs" / "quickstart" / parent.data.tags["fasweep.launch"]
    unfinished = [k for k, c in before.items() if c.data.tags["fasweep.status"] == "running"]
    found = find_checkpoints(str(root), unfinished)
    assert len(found) >= 2, (found, log())
    truncated, intact = sorted(found, key=lambda k: -len(found[k]))[:2]
    assert len(found[truncated]) >= 2
    newest = Path(found[truncated][0]) / "checkpoint.pt"
    newest.write_bytes(newest.read_bytes()[: newest.stat().st_size // 2])
    fallback = int(torch.load(Path(found[truncated][1]) / "checkpoint.pt", weights_only=True)["epoch"])
    logged = {k: max(steps(store, c), default=0) for k, c in before.items()}

    capsys.readouterr()
    result = launch(QUICKSTART, sets=_sets(sets), tracking_uri=store, resume=True)
    out = capsys.readouterr().out
    assert result.status == "finished" and result.counts == {"finished": 6}, out
    assert "took over the lease of quickstart" in out
    children = {c.data.tags["fasweep.trial_key"]: c for c in runs(store, "quickstart", "trial")}
    assert sorted(children) == sorted(f"main/{c}/s{s}" for c in ("DS0", "DSR1", "DSR2-U") for s in (0, 1))
    for key, child in children.items():
        assert steps(store, child) == list(range(1, epochs + 1)), key  # every epoch logged once
        tags = child.data.tags
        earlier = before.get(key)
        if earlier is not None:
            assert earlier.info.run_id == child.info.run_id  # the run was continued, not duplicated
        if earlier is not None and earlier.data.tags["fasweep.status"] == "finished":
            assert earlier.info.end_time == child.info.end_time  # a finished trial was not run again
            assert "fasweep.resumed_from" not in tags
            continue
        resumed_from = int(tags["fasweep.resumed_from"])
        assert int(tags["fasweep.epochs_run"]) == epochs - resumed_from, key  # no finished epoch ran twice
        if key == truncated:
            assert resumed_from == fallback  # the newest checkpoint was unreadable: the one before it
        elif key in found:
            assert resumed_from >= max(1, logged[key]), key  # the newest checkpoint: at least what was logged
        else:
            assert resumed_from == 0  # never checkpointed: starts over
    assert intact in found and int(children[intact].data.tags["fasweep.resumed_from"]) >= 2
    epochs = sorted(e for c in children.values() if (e := int(c.data.tags.get("fasweep.resumed_from", 0))))
    span = f"epoch {epochs[0]}" if epochs[0] == epochs[-1] else f"epochs {epochs[0]}-{epochs[-1]}"
    digest = [line for line in out.splitlines() if line.startswith("[main]") and " continue" in line]
    assert digest == [f"[main] {len(epochs)} trials continue after {span}"], out  # one line for them all


def _sets(flags: list[str]) -> dict:
    from fasweep.cli import parse_sets

    return parse_sets(flags[1::2])


@pytest.mark.slow
def test_writes_survive_a_tracking_server_restart_and_a_store_that_stays_down_fails_loudly(tmp_path, monkeypatch):
    """Queued writes are retried while the MLflow server is down and land once it is back; past its retry
    budget a writer raises a TrackingError naming the store and how to recover."""
    import requests

    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    port = free_port()
    uri = f"http://127.0.0.1:{port}"
    command = [sys.executable, "-m", "mlflow", "server", "--port", str(port), "--workers", "1"]
    command += ["--backend-store-uri", f"sqlite:///{tmp_path / 'server.db'}"]
    command += ["--artifacts-destination", str(tmp_path / "artifacts")]

    servers: list[subprocess.Popen] = []

    def serve() -> None:
        servers.append(
            subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        )
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                if requests.get(f"{uri}/health", timeout=1).ok:
                    return
            except requests.RequestException:  # not listening yet, or busy starting
                time.sleep(0.5)
        raise AssertionError("mlflow server did not start")

    def stop() -> None:
        for server in servers:  # the server and its uvicorn and job-runner children
            with contextlib.suppress(ProcessLookupError):
                os.killpg(server.pid, signal.SIGKILL)
            server.wait()

    def tracker(name: str, budget_s: float) -> RunWriter:
        t = RunWriter(uri, name, name, budget_s=budget_s)
        t.open_parent("L1", {"fasweep.plan_hash": "x"}, spec_yaml=f"name: {name}\n")
        config = set_path(TrialConfig().model_dump(mode="json"), "train.epochs", 3)
        t.trial_started(PlannedTrial("main/A/s0", "main", "A", 0, {}, config, {"cpu": 1.0, "gpu": 0.0}))
        t.trial_epoch("main/A/s0", {"epoch": 1.0, "test_acc": 0.5})
        t.flush()
        return t

    try:
        serve()
        patient, impatient = tracker("restart", 120), tracker("down", 2)
        stop()
        for t in (patient, impatient):
            t.trial_epoch("main/A/s0", {"epoch": 2.0, "test_acc": 0.6})
            t.trial_epoch("main/A/s0", {"epoch": 3.0, "test_acc": 0.7})
            t.trial_ended("main/A/s0", last={"epoch": 3.0, "test_acc": 0.7, "diverged": 0.0})
        with pytest.raises(TrackingError, match=r"--resume"):
            impatient.flush()
        impatient.close()
        serve()  # the patient writer has been retrying all along
        patient.flush()
        patient.finish_parent(LaunchStatus.FINISHED)
        patient.close()
        (child,) = runs(uri, "restart", "trial")
        assert child.data.tags["fasweep.status"] == "finished"
        history = MlflowClient(uri).get_metric_history(child.info.run_id, "test_acc")
        assert sorted((m.step, m.value) for m in history) == [(1, 0.5), (2, 0.6), (3, 0.7)]
    finally:
        stop()


def test_missing_data_fails_in_seconds_before_any_trial(store, tmp_path, capsys):
    spec = write_spec(
        tmp_path / "nodata.yaml",
        "name: nodata\nbase:\n  data: {name: cifar10, root: ./no-such-copy, download: false}\n"
        "  model: {arch: Dense16 Dense10}\nseeds: [0, 1, 2]\n",
    )
    started = time.monotonic()
    assert cli("launch", str(spec), "--tracking-uri", store) == 2
    assert time.monotonic() - started < 30
    captured = capsys.readouterr()
    lines = (captured.out + captured.err).strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: data.name='cifar10'"), lines
    assert str(tmp_path / "no-such-copy") in lines[0] and "Traceback" not in captured.err
    assert runs(store, "nodata", "parent") == []  # no launch, no trial


def _image_folder(root: Path, classes: int = 10) -> None:
    """A tiny image folder data set: train/<class>/*.png and test/<class>/*.png, 8x8 RGB."""
    from PIL import Image

    rng = torch.Generator().manual_seed(0)
    for split, n in (("train", 4), ("test", 2)):
        for c in range(classes):
            folder = root / split / f"c{c}"
            folder.mkdir(parents=True)
            for i in range(n):
                pixels = torch.randint(0, 256, (8, 8, 3), generator=rng, dtype=torch.uint8).numpy()
                Image.fromarray(pixels).save(folder / f"{i}.png")


def test_relative_data_root_resolves_against_the_launch_directory(ray_address, store, tmp_path, capsys):
    _image_folder(tmp_path / "imgs")
    spec = write_spec(
        tmp_path / "rel.yaml",
        "name: relroot\nbase:\n  data: {name: imagefolder, root: ./imgs}\n"
        "  model: {arch: Dense16 Dense10}\n  train: {epochs: 1}\nseeds: [0]\nmax_retries: 0\n",
    )
    assert cli("launch", str(spec), "--tracking-uri", store) == 0, capsys.readouterr()
    (child,) = runs(store, "relroot", "trial")
    assert child.data.tags["fasweep.status"] == "finished"
    assert child.data.params["data.root"] == str(tmp_path / "imgs")  # absolute, the same on every worker


def test_a_user_error_in_every_trial_is_one_digest_line_and_not_retried(ray_address, store, tmp_path, capsys):
    sets = [*TINY[:4], "--set", "base.train.device=cuda", "--set", "max_retries=2", "--set", "experiment=usererr"]
    assert cli("launch", str(QUICKSTART), "--tracking-uri", store, *sets) == 1
    out = capsys.readouterr().out
    digest = [line for line in out.splitlines() if "trials failed:" in line]
    assert len(digest) == 1 and digest[0].startswith("6 trials failed: train.device: got 'cuda'"), out
    assert "Traceback" not in out and "retry the failed trials" not in out  # a retry would fail the same way
    log = next((tmp_path / "fasweep-runs" / "quickstart").glob(f"*/{ERRORS_LOG}"))
    assert log.read_text().count("=== main/") == 6
    children = runs(store, "usererr", "trial")
    assert len(children) == 6
    for child in children:
        assert child.data.tags["fasweep.status"] == "error" and "train.device" in child.data.tags["fasweep.error"]
        assert child.info.status == "FAILED"


@pytest.mark.slow
def test_a_40_trial_sweep_prints_few_lines_and_keeps_few_checkpoints(ray_address, store, tmp_path):
    spec = write_spec(
        tmp_path / "forty.yaml",
        "name: forty\nbase:\n  data: {name: digits, limit_train: 200}\n  model: {arch: Dense16 Dense10}\n"
        "  train: {epochs: 4, alignment_every: 0}\n"
        "grid:\n  train.lr: [0.001, 0.002, 0.003, 0.004, 0.005, 0.006, 0.007, 0.008, 0.009, 0.01]\n"
        "  feedback.mode: [bp, random]\nseeds: [0, 1]\nmax_retries: 0\ncheckpoint: {keep: 2}\n",
    )
    command = [sys.executable, "-c", "from fasweep.cli import main; main()", "launch", str(spec)]
    done = subprocess.run(
        [*command, "--tracking-uri", store, "--address", ray_address],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        timeout=600,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    lines = [line for line in (done.stdout + done.stderr).splitlines() if "mlflow.store.db.utils" not in line]
    assert len(lines) <= 40, "\n".join(lines)
    assert len(runs(store, "forty", "trial")) == 40
    trial_dirs = list((tmp_path / "fasweep-runs" / "forty").glob(f"*/{CHECKPOINTS_DIR}/*"))
    assert len(trial_dirs) == 40
    for folder in trial_dirs:  # written every epoch, the newest 2 kept, nothing else
        assert sorted(p.name for p in folder.iterdir()) == [epoch_marker(3), epoch_marker(4)], folder
