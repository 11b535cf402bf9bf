"""The public Python API (`fasweep/__init__.py`) used as a researcher would: from a script, on real runs.

The slow test is also examples/plugin end to end: a script calls `fasweep.launch` on its spec, whose rule, model and
data set live only in examples/plugin (not on the workers' path): a local Ray with two workers imports them from
the spec's `code:` (runtime_env), MLflow records the rule's angles, `fasweep.runs` tables them, `fasweep.report`
reports them.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch
from mlflow import MlflowClient

import fasweep
from fasweep.nn import FALinear

REPO = Path(__file__).resolve().parents[1]
SPEC = REPO / "examples" / "plugin" / "sweep.yaml"


def test_importing_fasweep_loads_neither_torch_nor_ray() -> None:
    code = "import sys, fasweep; print(sorted({'torch', 'ray', 'mlflow'} & set(sys.modules)), fasweep.__all__)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO)
    assert out.stdout.strip() == "[] ['fa', 'launch', 'report', 'runs', 'train']"


def test_train_and_fa_from_python(tmp_path: Path) -> None:
    config = {"data": {"name": "digits", "limit_train": 300}, "model": {"arch": "DSR1"}, "train": {"epochs": 2}}
    result = fasweep.train(config)
    assert result.status == "finished" and [h["epoch"] for h in result.history] == [1.0, 2.0]
    path = tmp_path / "trial.yaml"
    path.write_text(json.dumps(config))  # JSON is YAML
    again = fasweep.train(path)
    assert [h["test_loss"] for h in again.history] == [h["test_loss"] for h in result.history]
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.ReLU(), torch.nn.Linear(5, 3))
    weights = [p.detach().clone() for p in net.parameters()]
    assert fasweep.fa(net, mode="sign_concordant", concordance=0.5) is net
    assert all(isinstance(net[i], FALinear) and net[i].rule.concordance == 0.5 for i in (0, 2))
    assert all(torch.equal(a, b) for a, b in zip(weights, net.parameters(), strict=True))


SCRIPT = """\
import sys

import fasweep

spec, uri = sys.argv[1], sys.argv[2]
trial = {"data": {"name": "digits", "limit_train": 300}, "model": {"arch": "DSR1"}, "train": {"epochs": 1}}
alone = fasweep.train(trial)
print("train", alone.status, len(alone.history))
result = fasweep.launch(spec, tracking_uri=uri, num_cpus=2)
print("launch", result.status, result.counts)
table = fasweep.runs("plugin_example", tracking_uri=uri)
table.to_csv("runs.csv", index=False)
print(fasweep.report("plugin_example", tracking_uri=uri, out="report"))
"""


@pytest.mark.slow
def test_a_script_launches_the_example_plugin_on_ray_and_tables_and_reports_it(tmp_path: Path) -> None:
    (tmp_path / "script.py").write_text(SCRIPT)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    env = {**os.environ, "PYTHONPATH": str(REPO)}  # fasweep only: the workers get fasweep_example from `code:`
    run = subprocess.run(
        [sys.executable, "script.py", str(SPEC), uri], cwd=tmp_path, env=env, capture_output=True, text=True
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert "train finished 1\n" in run.stdout and "\nlaunch finished {'finished': 6" in run.stdout, run.stdout[-2000:]
    table = pd.read_csv(tmp_path / "runs.csv")
    assert len(table) == 12 and set(table["epoch"]) == {1, 2}  # 6 trials x 2 epochs
    modes = {"bp", "random", "fasweep_example.rules:ScaledSign"}
    assert set(table["feedback.mode"]) == modes and set(table["seed"]) == {0, 1}
    last = table[table["epoch"] == 2].groupby("feedback.mode")[["bw_angle/fc1", "angle/fc1", "angle/fc3"]].mean()
    assert last.loc["bp"].max() < 1e-3  # B is W (up to rounding in acos); fc3 learns with its exact gradient
    assert 80 < last.loc["random", "bw_angle/fc1"] < 100 and last.loc["random", "angle/fc3"] < 1e-3
    sign = last.loc["fasweep_example.rules:ScaledSign"]  # B shares W's signs: far nearer W than a random B
    assert 0 < sign["bw_angle/fc1"] < 60 and 0 < sign["angle/fc1"] < last.loc["random", "angle/fc1"]
    client = MlflowClient(uri)
    trials = client.search_runs(
        [client.get_experiment_by_name("plugin_example").experiment_id], "tags.`fasweep.role` = 'trial'"
    )
    assert len(trials) == 6 and all("angle/features.0" in r.data.metrics for r in trials)
    assert {r.data.params["model.arch"] for r in trials} == {"fasweep_example.models:lenet"}
    report = run.stdout.split("\nlaunch finished", 1)[1]
    assert all(f"mode={m}" in report for m in ("bp", "random")) and "ScaledSign" in report
    assert (tmp_path / "report" / "report.html").is_file() and (tmp_path / "report" / "angles.png").is_file()


def test_the_example_plugin_runs_as_a_users_spec_would_be_validated() -> None:
    """`fasweep validate` on the example spec from another folder: its `code:` is relative to the spec."""
    out = subprocess.run(
        [sys.executable, "-c", "from fasweep.cli import main; main()", "validate", str(SPEC)],
        capture_output=True,
        text=True,
        cwd="/",
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    assert (out.returncode, out.stderr) == (0, ""), out.stderr
    assert out.stdout == f"ok {SPEC}: 6 trials (3 conditions × 2 seeds)\n"
