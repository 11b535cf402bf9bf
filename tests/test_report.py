"""fasweep report on real MLflow stores: one filled by writing runs in the agreed layout, one by a real sweep.

Every number the report prints is recomputed here independently from `mlflow.search_runs` / metric histories.
"""

from __future__ import annotations

import base64
import html
import json
import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import pandas as pd
import pytest
import yaml
from matplotlib.image import imread
from mlflow import MlflowClient
from mlflow.entities import Metric, Param

from fasweep.cli import main

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
EPOCHS = 4
CONCORDANCE = [0.0, 0.5, 1.0]
MAGNITUDE = ["uniform", "batch_random"]
GRID_SPEC = {
    "name": "grid",
    "base": {"data": {"name": "digits"}, "feedback": {"mode": "sign_concordant"}, "train": {"epochs": EPOCHS}},
    "grid": {"feedback.concordance": CONCORDANCE, "feedback.magnitude": MAGNITUDE},
    "seeds": [0, 1, 2],
    "reference": {"concordance=1.0,magnitude=uniform": {"test_acc": 0.8}},
}
TABLE_SPEC = {
    "name": "dense_table",
    "base": {"data": {"name": "digits"}, "train": {"epochs": EPOCHS}},
    "conditions": {"DS0": {"model.arch": "DS0"}, "DSR1": {"model.arch": "DSR1"}},
    "grid": {"train.loss": ["cross_entropy", "hinge"]},
    "seeds": [0, 1],
    "reference": {"DSR1,loss=hinge": {"test_acc": 0.4883}},
}


def write_sweep(
    uri: str,
    root: Path,
    spec: dict[str, Any],
    launch: str,
    trials: list[dict[str, Any]],
    *,
    axes: list[str],
    start: int = 0,
    plan_hash: str = "",
) -> str:
    """Write one launch of a sweep in the MLflow layout of fasweep.runs.layout; return the parent id.

    Each trial dict: condition, seed, params, metrics {key: [value per epoch]}, optional status and stage.
    """
    client = MlflowClient(uri)
    name = spec["name"]
    exp = client.get_experiment_by_name(name)
    exp_id = exp.experiment_id if exp else client.create_experiment(name, artifact_location=(root / name).as_uri())
    t0 = 1_800_000_000_000 + start
    tags = {"fasweep.sweep": name, "fasweep.launch": launch}
    parent = client.create_run(
        exp_id,
        start_time=t0,
        run_name=f"{name}@{launch}",
        tags={
            **tags,
            "fasweep.role": "parent",
            "fasweep.status": "finished",
            "fasweep.axes": json.dumps(axes),
            "fasweep.n_trials": str(len(trials)),
            "fasweep.plan_hash": plan_hash,
        },
    ).info.run_id
    spec_dir = root / "specs" / f"{name}-{launch}"
    spec_dir.mkdir(parents=True)
    (spec_dir / "spec.yaml").write_text(yaml.safe_dump(spec))
    client.log_artifact(parent, str(spec_dir / "spec.yaml"))
    for i, trial in enumerate(trials):
        status, stage = trial.get("status", "finished"), trial.get("stage", "main")
        run = client.create_run(
            exp_id,
            start_time=t0 + 1 + i,
            run_name=f"{trial['condition']}-s{trial['seed']}",
            tags={
                **tags,
                "mlflow.parentRunId": parent,
                "fasweep.role": "trial",
                "fasweep.stage": stage,
                "fasweep.condition": trial["condition"],
                "fasweep.seed": str(trial["seed"]),
                "fasweep.trial_key": f"{stage}/{trial['condition']}/s{trial['seed']}",
                "fasweep.status": status,
            },
        ).info.run_id
        metrics = [
            Metric(key, float(v), t0 + 100 * epoch, epoch)
            for key, values in trial["metrics"].items()
            for epoch, v in enumerate(values, start=1)
        ]
        client.log_batch(run, metrics=metrics, params=[Param(k, str(v)) for k, v in trial["params"].items()])
        if status != "running":
            client.set_terminated(run, "FAILED" if status == "error" else "FINISHED")
    return parent


STAGED_SPEC = {
    "name": "staged",
    "base": {"data": {"name": "digits"}, "model": {"arch": "Dense32 Dense10"}, "train": {"epochs": EPOCHS}},
    "seeds": [0, 1],
    "stages": [
        {"name": "pre", "conditions": {"bp": {"feedback.mode": "bp"}}},
        {"name": "post", "conditions": {"bp": {"feedback.mode": "bp"}, "random": {"feedback.mode": "random"}}},
    ],
    "reference": {"post/random": {"test_acc": 0.5}, "bp": {"test_acc": 0.7}},
}


def _curves(rng: np.random.Generator, epochs: int = EPOCHS) -> dict[str, list[float]]:
    """Random (not monotone) curves, so the best epoch differs from the final one."""
    return {
        "test_acc": rng.uniform(0.2, 0.9, epochs).tolist(),
        "train_acc": rng.uniform(0.2, 0.9, epochs).tolist(),
        "train_loss": rng.uniform(0.5, 2.0, epochs).tolist(),
        "test_loss": rng.uniform(0.5, 2.0, epochs).tolist(),
        "angle/dense0": rng.uniform(20, 90, epochs).tolist(),
        "angle/dense2": rng.uniform(20, 90, epochs).tolist(),
    }


def grid_trials(seeds: list[int], rng: np.random.Generator, *, odd: bool = False) -> list[dict[str, Any]]:
    """concordance × magnitude × seeds; with `odd`, one trial diverged (3 epochs, NaN loss) and one running."""
    out = []
    for c in CONCORDANCE:
        for m in MAGNITUDE:
            for s in seeds:
                params = {"feedback.mode": "sign_concordant", "feedback.concordance": c, "feedback.magnitude": m}
                trial = {"condition": f"concordance={c},magnitude={m}", "seed": s, "metrics": _curves(rng)}
                trial["params"] = {**params, "train.seed": s, "train.epochs": EPOCHS, "train.loss": "cross_entropy"}
                out.append(trial)
    if odd:
        diverged, running = out[1], out[2 * len(seeds)]
        diverged["status"] = "diverged"
        diverged["metrics"] = {k: v[:3] for k, v in diverged["metrics"].items()}
        diverged["metrics"]["train_loss"][-1] = math.nan
        running["status"] = "running"
        running["metrics"] = {k: v[:2] for k, v in running["metrics"].items()}
    return out


def table_trials(rng: np.random.Generator) -> list[dict[str, Any]]:
    """A seed-report table sweep: conditions DS0/DSR1 × train.loss axis, 2 seeds, started in reverse order."""
    trials = [
        {
            "condition": f"{arch},loss={loss}",
            "seed": s,
            "metrics": _curves(rng),
            "params": {"model.arch": arch, "train.loss": loss, "train.seed": s, "train.epochs": EPOCHS},
        }
        for arch in ("DS0", "DSR1")
        for loss in ("cross_entropy", "hinge")
        for s in (0, 1)
    ]
    return trials[::-1]  # started in reverse: the report must still follow the plan's order


def staged_trials(rng: np.random.Generator) -> list[dict[str, Any]]:
    """Two stages (pre: bp; post: bp, random), 2 seeds; the second post/random seed stopped by the scheduler."""
    out = [
        {
            "stage": stage,
            "condition": mode,
            "seed": s,
            "metrics": _curves(rng),
            "params": {"feedback.mode": mode, "train.seed": s, "train.epochs": EPOCHS},
        }
        for stage, modes in (("pre", ["bp"]), ("post", ["bp", "random"]))
        for mode in modes
        for s in (0, 1)
    ]
    out[-1]["status"] = "stopped"
    out[-1]["metrics"] = {k: v[:2] for k, v in out[-1]["metrics"].items()}
    return out


@pytest.fixture(scope="module")
def layout_store(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A SQLite store with sweep `grid` (launch A: 3 seeds; newer launch B: 2 seeds, one diverged, one
    running), the table sweep `dense_table` (a train.loss axis) and the two-stage sweep `staged`."""
    root = tmp_path_factory.mktemp("layout")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    rng = np.random.default_rng(0)
    axes = ["feedback.concordance", "feedback.magnitude"]
    write_sweep(uri, root, GRID_SPEC, "launch-A", grid_trials([0, 1, 2], rng), axes=axes)
    write_sweep(uri, root, GRID_SPEC, "launch-B", grid_trials([0, 1], rng, odd=True), axes=axes, start=10_000)
    write_sweep(uri, root, TABLE_SPEC, "launch-T", table_trials(rng), axes=["model.arch", "train.loss"])
    write_sweep(uri, root, STAGED_SPEC, "launch-S", staged_trials(rng), axes=["feedback.mode"])
    return uri


def run_cli(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    """The real CLI in-process: (exit code, stdout, stderr)."""
    try:
        main(["report", *args])
        code = 0
    except SystemExit as exc:
        code = int(exc.code or 0)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def report_json(capsys: pytest.CaptureFixture[str], uri: str, *args: str) -> dict[str, Any]:
    code, out, err = run_cli(capsys, *args, "--tracking-uri", uri, "--format", "json", "--no-log")
    assert code == 0, err
    return json.loads(out)


def trial_runs(uri: str, sweep: str, launches: list[str] | None = None) -> pd.DataFrame:
    """The sweep's child runs straight from mlflow.search_runs (the independent side of every check)."""
    mlflow.set_tracking_uri(uri)
    df = mlflow.search_runs(experiment_names=[sweep], filter_string="tags.`fasweep.role` = 'trial'")
    return df if launches is None else df[df["tags.fasweep.launch"].isin(launches)]


def by_condition(records: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {r["condition"]: r for r in records}


def test_condition_table_equals_search_runs(layout_store: str, capsys: pytest.CaptureFixture[str]) -> None:
    body = report_json(capsys, layout_store, "grid")
    assert body["launches"] == ["launch-B"]
    [table] = body["tables"]
    rows = by_condition(table["records"])
    df = trial_runs(layout_store, "grid", ["launch-B"])
    assert set(rows) == set(df["tags.fasweep.condition"])
    for cond, group in df.groupby("tags.fasweep.condition"):
        acc = group["metrics.test_acc"]
        row = rows[cond]
        assert row["n"] == len(acc) == 2
        assert row["mean"] == pytest.approx(acc.mean(), abs=1e-12)
        assert row["sd"] == pytest.approx(acc.std(ddof=1), abs=1e-12)
        assert row["diverged"] == int((group["tags.fasweep.status"] == "diverged").sum())
        assert row["partial"] == int((group["tags.fasweep.status"] == "running").sum())
        assert row["final_epoch"] == EPOCHS  # every condition has a seed that ran all epochs
    assert sum(r["diverged"] for r in rows.values()) == 1
    assert rows["concordance=0.0,magnitude=uniform"]["diverged"] == 1


def test_best_epoch_and_value_equal_metric_history(layout_store: str, capsys: pytest.CaptureFixture[str]) -> None:
    rows = by_condition(report_json(capsys, layout_store, "grid", "--at", "best")["tables"][0]["records"])
    client = MlflowClient(layout_store)
    df = trial_runs(layout_store, "grid", ["launch-B"])
    for cond, group in df.groupby("tags.fasweep.condition"):
        histories = [{m.step: m.value for m in client.get_metric_history(r, "test_acc")} for r in group["run_id"]]
        best = [max(h.values()) for h in histories]
        assert rows[cond]["mean"] == pytest.approx(sum(best) / len(best), abs=1e-12)
        assert rows[cond]["final_epoch"] == max(max(h) for h in histories)
        mean_curve = {e: np.mean([h[e] for h in histories if e in h]) for e in set().union(*histories)}
        assert rows[cond]["best_epoch"] == max(mean_curve, key=mean_curve.get)


VAL_SPEC = {
    "name": "held_out",
    "base": {"data": {"name": "digits", "val_fraction": 0.1}, "train": {"epochs": EPOCHS}},
    "conditions": {"A": {"train.lr": 0.001}},
    "seeds": [0, 1],
}
# val and test peak at different epochs: seed 0 at val epoch 2 / test epoch 3, seed 1 at val 3 / test 1;
# the seed-mean val curve peaks at epoch 2, the test one at epoch 3
VAL_TRIALS = [
    {"seed": 0, "val_acc": [0.5, 0.9, 0.6, 0.7], "test_acc": [0.6, 0.7, 0.95, 0.8], "val_loss": [2, 1, 3, 4]},
    {"seed": 1, "val_acc": [0.4, 0.5, 0.7, 0.6], "test_acc": [0.9, 0.6, 0.65, 0.7], "val_loss": [3, 2, 1, 4]},
]


def _formats(folder: Path) -> dict[str, str]:
    return {fmt: (folder / f"report.{fmt}").read_text() for fmt in ("md", "csv", "json", "html")}


def test_best_is_chosen_on_validation_and_reports_test_there(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    trials = [
        {
            "condition": "A",
            "seed": t["seed"],
            "params": {"train.seed": t["seed"], "data.val_fraction": 0.1, "train.epochs": EPOCHS},
            "metrics": {k: v for k, v in t.items() if k != "seed"} | {"test_loss": [1.0] * EPOCHS},
        }
        for t in VAL_TRIALS
    ]
    write_sweep(uri, tmp_path, VAL_SPEC, "launch-V", trials, axes=[])
    code, _, err = run_cli(capsys, "held_out", "--tracking-uri", uri, "--at", "best", "--out", str(tmp_path / "r"))
    assert code == 0, err
    files = _formats(tmp_path / "r")
    (table,) = json.loads(files["json"])["tables"]
    (row,) = table["records"]
    assert [v["value"] for v in row["values"]] == [
        0.7,
        0.65,
    ]  # test_acc at each seed's best val_acc epoch (2, 3), not 0.95, 0.9
    assert row["mean"] == pytest.approx(0.675)
    assert row["best_epoch"] == 2 and row["best_epoch_on"] == "val_acc" and row["selection_note"] is None
    note = "best epoch chosen on val_acc (validation split); test_acc reported at that epoch"
    assert note in table["footnotes"] and note in files["md"] and note in files["html"]
    assert all("chosen on test data" not in text for text in files.values())
    assert "best_epoch_on" in files["csv"].splitlines()[0] and ",val_acc," in files["csv"]
    (loss,) = report_json(capsys, uri, "held_out", "--at", "best", "--metric", "test_loss")["tables"][0]["records"]
    assert loss["best_epoch_on"] == "val_loss" and loss["best_epoch"] == 2  # mean val_loss: 2.5, 1.5, 2, 4


def test_best_chosen_on_test_data_says_so(
    layout_store: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, _, err = run_cli(capsys, "grid", "--tracking-uri", layout_store, "--at", "best", "--out", str(tmp_path))
    assert code == 0, err
    files = _formats(tmp_path)
    note = "best epoch chosen on test data (no validation split): optimistic"
    assert all(note in text for text in files.values())
    records = json.loads(files["json"])["tables"][0]["records"]
    assert all(r["best_epoch_on"] == "test_acc" and r["selection_note"] == note for r in records)


def t2_interval(values: pd.Series) -> tuple[float, float]:
    """95% Student t interval of a 2-seed mean: t(0.975, 1 df) is the Cauchy quantile tan(0.475π)."""
    assert len(values) == 2
    half = math.tan(0.475 * math.pi) * values.std(ddof=1) / math.sqrt(2)
    return values.mean() - half, values.mean() + half


def side_of(ref: float, interval: tuple[float, float]) -> str:
    return "above" if ref > interval[1] else "below" if ref < interval[0] else "inside"


def test_reference_and_delta(layout_store: str, capsys: pytest.CaptureFixture[str]) -> None:
    rows = by_condition(report_json(capsys, layout_store, "grid")["tables"][0]["records"])
    ref_row = rows["concordance=1.0,magnitude=uniform"]
    assert ref_row["reference"] == 0.8 and ref_row["reference_epoch"] == EPOCHS and ref_row["reason"] is None
    assert ref_row["delta"] == pytest.approx(ref_row["mean"] - 0.8, abs=1e-12)
    df = trial_runs(layout_store, "grid", ["launch-B"])
    side = side_of(
        0.8, t2_interval(df[df["tags.fasweep.condition"] == "concordance=1.0,magnitude=uniform"]["metrics.test_acc"])
    )
    assert ref_row["verdict"] == side
    assert all(
        r["reference"] is None and r["delta"] is None for c, r in rows.items() if c not in GRID_SPEC["reference"]
    )
    code, out, _ = run_cli(capsys, "grid", "--tracking-uri", layout_store, "--no-log")
    assert code == 0
    line = next(x for x in out.splitlines() if x.startswith("| concordance=1.0,magnitude=uniform"))
    assert f"| 0.8000 | {ref_row['mean'] - 0.8:+.4f} (ref {side} CI) |" in line


def test_pivot_by_two_axes(layout_store: str, capsys: pytest.CaptureFixture[str]) -> None:
    args = ("grid", "--by", "feedback.concordance", "--by", "feedback.magnitude", "--launch", "all")
    body = report_json(capsys, layout_store, *args)
    records = body["tables"][0]["records"]
    df = trial_runs(layout_store, "grid")
    assert len(records) == len(CONCORDANCE) * len(MAGNITUDE)
    for (c, m), group in df.groupby(["params.feedback.concordance", "params.feedback.magnitude"]):
        [rec] = [r for r in records if r["feedback.concordance"] == c and r["feedback.magnitude"] == m]
        assert rec["n"] == len(group) == 5  # 3 seeds of launch A + 2 of launch B, pooled
        assert rec["mean"] == pytest.approx(group["metrics.test_acc"].mean(), abs=1e-12)
        assert rec["sd"] == pytest.approx(group["metrics.test_acc"].std(ddof=1), abs=1e-12)
    code, out, _ = run_cli(capsys, *args, "--tracking-uri", layout_store, "--no-log")
    assert code == 0
    header = next(x for x in out.splitlines() if x.startswith("| feedback.concordance"))
    assert header.split("|")[2:4] == [" magnitude=uniform ", " magnitude=batch_random "]
    first_col = [x.split("|")[1].strip() for x in out.splitlines() if x.startswith("| ") and x != header]
    assert first_col == ["0.0", "0.5", "1.0"]


def test_by_takes_the_short_axis_names_condition_names_use(
    layout_store: str, capsys: pytest.CaptureFixture[str]
) -> None:
    full = report_json(capsys, layout_store, "grid", "--by", "feedback.concordance", "--by", "feedback.magnitude")
    short = report_json(capsys, layout_store, "grid", "--by", "concordance", "--by", "magnitude")
    assert short == full and full["tables"][0]["records"]


def test_pivot_pools_other_axes(layout_store: str, capsys: pytest.CaptureFixture[str]) -> None:
    records = report_json(capsys, layout_store, "grid", "--by", "feedback.magnitude")["tables"][0]["records"]
    df = trial_runs(layout_store, "grid", ["launch-B"])
    for m, group in df.groupby("params.feedback.magnitude"):
        [rec] = [r for r in records if r["feedback.magnitude"] == m]
        assert rec["n"] == len(group) == 6
        assert rec["mean"] == pytest.approx(group["metrics.test_acc"].mean(), abs=1e-12)


def test_launch_selection(layout_store: str, capsys: pytest.CaptureFixture[str]) -> None:
    pooled = report_json(capsys, layout_store, "grid", "--launch", "all")
    assert sorted(pooled["launches"]) == ["launch-A", "launch-B"]
    assert {r["n"] for r in pooled["tables"][0]["records"]} == {5}
    older = report_json(capsys, layout_store, "grid", "--launch", "launch-A")
    assert {r["n"] for r in older["tables"][0]["records"]} == {3}
    assert {r["partial"] for r in older["tables"][0]["records"]} == {0}
    code, _, err = run_cli(capsys, "grid", "--tracking-uri", layout_store, "--launch", "nope", "--no-log")
    assert code == 2
    assert "launch-A" in err and "launch-B" in err and len(err.strip().splitlines()) == 1


def test_launch_all_never_pools_launches_of_different_plans(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    rng = np.random.default_rng(1)
    axes = ["feedback.concordance", "feedback.magnitude"]
    write_sweep(uri, tmp_path, GRID_SPEC, "old", grid_trials([0, 1, 2], rng), axes=axes, plan_hash="h-old")
    write_sweep(uri, tmp_path, GRID_SPEC, "new1", grid_trials([0], rng), axes=axes, start=10, plan_hash="h-new")
    write_sweep(uri, tmp_path, GRID_SPEC, "new2", grid_trials([1], rng), axes=axes, start=20, plan_hash="h-new")
    pooled = report_json(capsys, uri, "grid", "--launch", "all")
    assert sorted(pooled["launches"]) == ["new1", "new2"]
    assert {r["n"] for r in pooled["tables"][0]["records"]} == {2}  # never the 3 seeds of the other plan
    code, out, _ = run_cli(capsys, "grid", "--tracking-uri", uri, "--launch", "all", "--no-log")
    assert code == 0 and "different plan: old" in out
    older = report_json(capsys, uri, "grid", "--launch", "old")
    assert {r["n"] for r in older["tables"][0]["records"]} == {3}


def test_partial_rows_marked(layout_store: str, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run_cli(capsys, "grid", "--tracking-uri", layout_store, "--no-log")
    assert code == 0
    df = trial_runs(layout_store, "grid", ["launch-B"])
    running = df[df["tags.fasweep.status"] == "running"]
    [cond] = running["tags.fasweep.condition"]
    marked = [x for x in out.splitlines() if x.startswith("| ") and "*" in x.split("|")[2]]
    assert [x.split("|")[1].strip() for x in marked] == [cond]
    assert "* partial: 1 trial(s) still running" in out
    rows = by_condition(report_json(capsys, layout_store, "grid")["tables"][0]["records"])
    assert rows[cond]["partial"] == 1
    assert running["metrics.test_acc"].iloc[0] in [v["value"] for v in rows[cond]["values"]]  # epoch 2 of 4 counts


def test_loss_variants_side_by_side(layout_store: str, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run_cli(capsys, "dense_table", "--tracking-uri", layout_store, "--no-log")
    assert code == 0
    lines = out.splitlines()
    header = next(x for x in lines if x.startswith("| condition | cross_entropy"))
    assert [h.strip() for h in header.split("|")[1:-1]] == [
        "condition",
        "cross_entropy",
        "reference cross_entropy",
        "delta cross_entropy",
        "hinge",
        "reference hinge",
        "delta hinge",
    ]
    assert [x.split("|")[1].strip() for x in lines if x.startswith("| DS")][:2] == ["DS0", "DSR1"]
    df = trial_runs(layout_store, "dense_table")
    dsr1 = next(x for x in lines if x.startswith("| DSR1 |")).split("|")
    hinge = df[(df["params.model.arch"] == "DSR1") & (df["params.train.loss"] == "hinge")]["metrics.test_acc"]
    assert dsr1[5].strip() == f"{hinge.mean():.4f} ± {hinge.std():.4f} (2)"
    assert dsr1[6].strip() == "0.4883"
    assert dsr1[7].strip() == f"{hinge.mean() - 0.4883:+.4f} (ref {side_of(0.4883, t2_interval(hinge))} CI)"


EPOCH_SPEC = {
    **TABLE_SPEC,
    "name": "early",
    "reference": {
        "DSR1,loss=hinge": {"test_acc": 0.5, "test_acc@3": 0.4, "test_acc@4": 0.45},
        "DS0,loss=cross_entropy": {"test_acc@3": 0.3},
        "DS0,loss=hinge": {"train_loss@2": 1.0},
    },
}


def test_references_at_earlier_epochs(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`<metric>@<N>` references: the metric at epoch N over the trials that reached it, beside reference and delta."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    trials = table_trials(np.random.default_rng(1))
    short = [t for t in trials if t["condition"] == "DSR1,loss=hinge"]  # neither seed reaches epoch 4
    for trial, status, epochs in zip(short, ("running", "stopped"), (2, 3), strict=True):
        trial["status"], trial["metrics"] = status, {k: v[:epochs] for k, v in trial["metrics"].items()}
    write_sweep(uri, tmp_path, EPOCH_SPEC, "launch-E", trials, axes=["model.arch", "train.loss"])
    body = report_json(capsys, uri, "early")
    loss_layout, per_condition = body["tables"]
    client = MlflowClient(uri)
    df = trial_runs(uri, "early")
    for cond, group in df.groupby("tags.fasweep.condition"):
        histories = [{m.step: m.value for m in client.get_metric_history(r, "test_acc")} for r in group["run_id"]]
        [side] = [r for r in loss_layout["records"] if r["condition"] == cond]
        for rec in (by_condition(per_condition["records"])[cond], side):
            for epoch in (3, 4):
                at = [h[epoch] for h in histories if epoch in h]
                ref = EPOCH_SPEC["reference"].get(cond, {}).get(f"test_acc@{epoch}")
                assert rec[f"test_acc@{epoch}.n"] == len(at)
                got = sorted(v["value"] for v in rec[f"test_acc@{epoch}.values"])
                assert got == pytest.approx(sorted(at), abs=1e-12)
                assert rec[f"test_acc@{epoch}.mean"] == (pytest.approx(np.mean(at), abs=1e-12) if at else None)
                assert rec[f"test_acc@{epoch}.sd"] == (pytest.approx(np.std(at, ddof=1)) if len(at) > 1 else None)
                assert rec[f"test_acc@{epoch}.reference"] == ref
                delta = rec[f"test_acc@{epoch}.delta"]
                assert delta == (None if ref is None or not at else pytest.approx(np.mean(at) - ref, abs=1e-12))
                unreached = ref is not None and not at
                assert rec[f"test_acc@{epoch}.reason"] == (f"ran 3 of {epoch} epochs" if unreached else None)
    short = by_condition(per_condition["records"])["DSR1,loss=hinge"]  # `test_acc`: the planned final epoch, 4
    assert short["reference"] == 0.5 and short["reference_epoch"] == EPOCHS
    assert short["delta"] is None and short["verdict"] is None and short["reason"] == "ran 3 of 4 epochs"
    assert not any(k.startswith("train_loss@") for r in per_condition["records"] for k in r)  # another metric's
    code, out, _ = run_cli(capsys, "early", "--tracking-uri", uri, "--no-log")
    assert code == 0
    lines = out.splitlines()
    header = [h.strip() for h in next(x for x in lines if x.startswith("| condition | test_acc")).split("|")[1:-1]]
    assert header[-6:] == [
        "test_acc@3",
        "reference test_acc@3",
        "delta test_acc@3",
        "test_acc@4",
        "reference test_acc@4",
        "delta test_acc@4",
    ]
    row = [c.strip() for c in next(x for x in lines if x.startswith("| DSR1,loss=hinge |")).split("|")[1:-1]]
    stopped_id = df[df["tags.fasweep.status"] == "stopped"]["run_id"].iloc[0]
    at3 = {m.step: m.value for m in client.get_metric_history(stopped_id, "test_acc")}[3]  # the running seed: 2 epochs
    assert row[-6:] == [
        f"{at3:.4f} (1)",
        "0.4000",
        f"{at3 - 0.4:+.4f}",  # one seed: no interval, no verdict
        "— (0)",
        "0.4500",
        "ran 3 of 4 epochs",
    ]
    side_header = next(x for x in lines if x.startswith("| condition | cross_entropy"))
    assert (
        "| hinge | reference hinge | delta hinge | hinge@3 | reference hinge@3 | delta hinge@3 | hinge@4 |"
        in side_header
    )
    code, csv_text, _ = run_cli(capsys, "early", "--tracking-uri", uri, "--no-log", "--format", "csv")
    assert code == 0 and "test_acc@4.delta" in csv_text.splitlines()[0]
    code, page, _ = run_cli(capsys, "early", "--tracking-uri", uri, "--no-log", "--format", "html")
    assert code == 0 and "<th>delta test_acc@4</th>" in page
    train_loss = report_json(capsys, uri, "early", "--metric", "train_loss")["tables"][-1]["records"]
    assert [r["train_loss@2.reference"] for r in train_loss if r["condition"] == "DS0,loss=hinge"] == [1.0]


def paired_1df(x: list[float], y: list[float]) -> tuple[float, tuple[float, float], float]:
    """Paired t on 2 seeds (1 df, Cauchy): mean difference, its 95% CI, two-sided p = 1 − 2·atan(|t|)/π."""
    d = np.subtract(x, y)
    se = d.std(ddof=1) / math.sqrt(2)
    half = math.tan(0.475 * math.pi) * se
    return d.mean(), (d.mean() - half, d.mean() + half), 1 - 2 * math.atan(abs(d.mean() / se)) / math.pi


def p_better(x: list[float], y: list[float]) -> float:
    return sum((a > b) + 0.5 * (a == b) for a in x for b in y) / (len(x) * len(y))


def test_json_intervals_and_paired_comparison(layout_store: str, capsys: pytest.CaptureFixture[str]) -> None:
    """Every record has ci_low/ci_high; with --baseline and --pairing seed every other condition has the paired
    difference, its CI, p, the Holm p over the table and P(X>Y), recomputed from search_runs (the launch's running
    and diverged trials count with their latest value)."""
    base = "concordance=1.0,magnitude=uniform"
    body = report_json(capsys, layout_store, "grid", "--baseline", base, "--pairing", "seed")
    rows = by_condition(body["tables"][0]["records"])
    df = trial_runs(layout_store, "grid", ["launch-B"])
    value = {
        (c, int(s)): v
        for c, s, v in zip(df["tags.fasweep.condition"], df["params.train.seed"], df["metrics.test_acc"], strict=True)
    }
    y = [value[base, s] for s in (0, 1)]
    p: dict[str, float] = {}
    for cond, group in df.groupby("tags.fasweep.condition"):
        rec = rows[cond]
        assert (rec["ci_low"], rec["ci_high"]) == pytest.approx(t2_interval(group["metrics.test_acc"]), rel=1e-9)
        if cond == base:
            assert "diff" not in rec and "p" not in rec
            continue
        x = [value[cond, s] for s in (0, 1)]
        diff, ci, p[cond] = paired_1df(x, y)
        assert rec["baseline"] == base and rec["pairing"] == "seed"
        assert rec["diff"] == pytest.approx(diff, abs=1e-12)
        assert (rec["diff_ci_low"], rec["diff_ci_high"]) == pytest.approx(ci, rel=1e-9)
        assert rec["p"] == pytest.approx(p[cond], rel=1e-9)
        assert rec["p_improve"] == pytest.approx(p_better(x, y))
    assert len(p) == 5
    running = 0.0
    for rank, cond in enumerate(sorted(p, key=p.__getitem__)):
        running = max(running, min(1.0, (len(p) - rank) * p[cond]))
        assert rows[cond]["p_holm"] == pytest.approx(running, rel=1e-9)
    footnotes = " ".join(body["tables"][0]["footnotes"])
    assert "Holm over the 5 tests of this table: an ad-hoc family" in footnotes
    assert "pairing by seed: the paired CIs" in footnotes
    code, out, _ = run_cli(capsys, "grid", "--tracking-uri", layout_store, "--no-log", "--baseline", base)
    assert code == 0
    header = next(x for x in out.splitlines() if x.startswith("| condition"))
    assert "| 95% CI | n |" in header and f"| diff vs {base} [95% CI] | p | p (Holm) | P(X>Y) |" in header
    assert next(x for x in out.splitlines() if x.startswith(f"| {base} |")).split("|")[10].strip() == "baseline"
    code, csv_text, _ = run_cli(capsys, "grid", "--tracking-uri", layout_store, "--no-log", "--format", "csv")
    assert code == 0 and {"ci_low", "ci_high"} <= set(csv_text.splitlines()[0].split(","))


def test_bootstrap_refused_below_ten_seeds(layout_store: str, capsys: pytest.CaptureFixture[str]) -> None:
    """`--ci bootstrap` on 3 seeds: one line saying why (a percentile interval at n = 3 covers at most 75%)."""
    for extra in ((), ("--by", "feedback.concordance")):
        code, out, err = run_cli(
            capsys,
            "grid",
            "--launch",
            "launch-A",
            "--ci",
            "bootstrap",
            *extra,
            "--tracking-uri",
            layout_store,
            "--no-log",
        )
        assert code == 2 and out == "" and err.count("\n") == 1
        assert "--ci: got 'bootstrap'; expected t:" in err and "< 10 seeds" in err and "at n = 3 at most 75%" in err
    assert "concordance=0.0 has n = 6 < 10 seeds" in err  # --by: a pivot cell pools its seeds


def test_spec_compare_to_per_stage(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`compare_to` from the parent's spec.yaml: the spec's (bp) in stage pre, the stage's own (random, paired by
    seed) in stage post; Holm over the one test leaves p unchanged."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    spec = {**STAGED_SPEC, "name": "compared", "compare_to": "bp"}
    spec["stages"] = [spec["stages"][0], {**spec["stages"][1], "compare_to": "random", "pairing": "seed"}]
    trials = staged_trials(np.random.default_rng(2))
    write_sweep(uri, tmp_path, spec, "launch-C", trials, axes=["feedback.mode"])
    body = report_json(capsys, uri, "compared")
    [table] = [t for t in body["tables"] if t["title"] == "compared: declared contrasts (test_acc)"]
    assert [(r["x"], r["y"]) for r in table["records"]] == [("post/bp", "post/random")]  # pre/bp is the baseline
    post = table["records"][0]
    df = trial_runs(uri, "compared")
    value = {
        (t, int(s)): v
        for t, s, v in zip(df["tags.fasweep.trial_key"], df["params.train.seed"], df["metrics.test_acc"], strict=True)
    }
    x, y = ([value[f"post/{c}/s{s}", s] for s in (0, 1)] for c in ("bp", "random"))
    diff, ci, p = paired_1df(x, y)
    assert post["pairing"] == "seed" and post["n_pairs"] == 2
    assert post["diff"] == pytest.approx(diff, abs=1e-12)
    assert (post["diff_ci_low"], post["diff_ci_high"]) == pytest.approx(ci, rel=1e-9)
    assert post["p"] == pytest.approx(p, rel=1e-9) and post["p_holm"] == pytest.approx(p, rel=1e-9)
    assert post["p_improve"] == pytest.approx(p_better(x, y))
    code, _, err = run_cli(capsys, "compared", "--tracking-uri", uri, "--no-log", "--baseline", "nope")
    assert code == 2 and "--baseline: got 'nope'; expected a condition of the sweep" in err and err.count("\n") == 1


CONTRAST_SPEC = {
    "name": "contrasted",
    "base": {"data": {"name": "digits"}, "train": {"epochs": EPOCHS}},
    "conditions": {a: {"model.arch": a} for a in ("DS0", "DSR1", "DSR2")},
    "grid": {"train.loss": ["cross_entropy", "hinge"]},
    "seeds": [0, 1],
    "compare": {"model.arch": "DS0"},
    "contrasts": [["DSR2", "DSR1"], ["DS0,loss=hinge", "DS0,loss=cross_entropy"]],
    "pairing": "seed",
    "equivalence_margin": 0.3,
}


def cauchy_cdf(t: float) -> float:
    return 0.5 + math.atan(t) / math.pi


def holm_by_hand(p: dict[str, float]) -> dict[str, float]:
    out, running = {}, 0.0
    for rank, name in enumerate(sorted(p, key=p.__getitem__)):
        running = max(running, min(1.0, (len(p) - rank) * p[name]))
        out[name] = running
    return out


@pytest.fixture(scope="module")
def contrast_store(tmp_path_factory: pytest.TempPathFactory) -> str:
    """Sweep `contrasted`: DS0/DSR1/DSR2 × loss, 2 seeds, started in reverse order, declaring `compare` and two
    contrasts (DSR2 − DSR1 per loss, so DSR2 is X twice; DS0 hinge − CE), paired by seed, with a TOST margin."""
    root = tmp_path_factory.mktemp("contrasts")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    rng = np.random.default_rng(5)
    trials = [
        {
            "condition": f"{arch},loss={loss}",
            "seed": s,
            "metrics": _curves(rng),
            "params": {"model.arch": arch, "train.loss": loss, "train.seed": s, "train.epochs": EPOCHS},
        }
        for arch in ("DS0", "DSR1", "DSR2")
        for loss in ("cross_entropy", "hinge")
        for s in (0, 1)
    ][::-1]
    write_sweep(uri, root, CONTRAST_SPEC, "launch-K", trials, axes=["model.arch", "train.loss"])
    return uri


def contrast_rows(body: dict[str, Any]) -> tuple[dict[str, Any], list[tuple[str, str]]]:
    """The table of declared contrasts in a report.json, and its (X, Y) rows in order."""
    [table] = [t for t in body["tables"] if t["title"] == "contrasted: declared contrasts (test_acc)"]
    return table, [(r["x"], r["y"]) for r in table["records"]]


def test_declared_contrasts_hold_the_loss_fixed_and_are_the_holm_family(
    contrast_store: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """`compare: {model.arch: DS0}` compares each condition with DS0 of the same loss; the bare contrast DSR2 − DSR1
    holds the loss fixed (hinge with hinge), making DSR2 X of two comparisons per loss; DS0 hinge − DS0 CE crosses the
    grid by full names. Every declared comparison is a row of the contrasts table; Holm (p and TOST p) runs over
    exactly these 7, checked against Holm computed here; each paired t and TOST is recomputed by hand from
    search_runs (2 seeds: 1 df, Cauchy)."""
    body = report_json(capsys, contrast_store, "contrasted")
    table, pairs = contrast_rows(body)
    df = trial_runs(contrast_store, "contrasted")
    value = {
        (c, int(s)): v
        for c, s, v in zip(df["tags.fasweep.condition"], df["params.train.seed"], df["metrics.test_acc"], strict=True)
    }
    losses = ("cross_entropy", "hinge")
    declared = [(f"{a},loss={loss}", f"DS0,loss={loss}") for a in ("DSR1", "DSR2") for loss in losses]
    declared += [(f"DSR2,loss={loss}", f"DSR1,loss={loss}") for loss in losses]
    declared += [("DS0,loss=hinge", "DS0,loss=cross_entropy")]
    assert sorted(pairs[:4]) == sorted(declared[:4]) and pairs[4:] == declared[4:]
    assert ("DSR2,loss=hinge", "DSR1,loss=hinge") in pairs and (
        "DSR2,loss=hinge",
        "DSR1,loss=cross_entropy",
    ) not in pairs
    rows = {(r["x"], r["y"]): r for r in table["records"]}
    p, p_tost = {}, {}
    for pair in declared:
        rec = rows[pair]
        x, y = ([value[c, s] for s in (0, 1)] for c in pair)
        diff, ci, p[pair] = paired_1df(x, y)
        assert rec["pairing"] == "seed" and rec["n_pairs"] == 2 and rec["margin"] == 0.3
        assert (rec["diff_ci_low"], rec["diff_ci_high"]) == pytest.approx(ci, rel=1e-9)
        assert rec["diff"] == pytest.approx(diff, abs=1e-12) and rec["p"] == pytest.approx(p[pair], rel=1e-9)
        assert rec["p_improve"] == pytest.approx(p_better(x, y))
        assert [v["value"] for v in rec["x_values"]] == x and [v["seed"] for v in rec["y_values"]] == [0, 1]
        se = abs(x[0] - y[0] - (x[1] - y[1])) / 2  # sd of two differences / √2
        p_tost[pair] = max(1 - cauchy_cdf((diff + 0.3) / se), cauchy_cdf((diff - 0.3) / se))
        assert rec["p_tost"] == pytest.approx(p_tost[pair], rel=1e-9)
        assert rec["holm_family"] == "declared: 7 contrasts"
    assert len(p) == len(table["records"]) == 7
    for pair, adjusted in holm_by_hand(p).items():
        assert rows[pair]["p_holm"] == pytest.approx(adjusted, rel=1e-9)
    for pair, adjusted in holm_by_hand(p_tost).items():
        rec = rows[pair]
        assert rec["p_tost_holm"] == pytest.approx(adjusted, rel=1e-9)
        expected = "equivalent within ±0.3" if adjusted < 0.05 else "different" if rec["p_holm"] < 0.05 else "undecided"
        assert rec["diff_verdict"] == expected
    notes = table["footnotes"]
    assert any("Holm over the 7 declared contrasts (the spec's compare, contrasts" in n for n in notes)
    assert any("equivalence (TOST, margin ±0.3 test_acc)" in n for n in notes)
    [per_condition] = [t for t in body["tables"] if t["title"].endswith("per condition")]
    assert not any("p" in r for r in per_condition["records"])  # one place shows each declared comparison
    code, out, _ = run_cli(capsys, "contrasted", "--tracking-uri", contrast_store, "--no-log")
    assert code == 0 and "Holm over the 7 declared contrasts" in out and "### contrasted: declared contrasts" in out
    header = next(x for x in out.splitlines() if x.startswith("| X |"))
    assert header == (
        "| X | Y | n pairs | diff X − Y [95% CI] | p | p (Holm) | P(X>Y) | p TOST | p TOST (Holm) | verdict |"
    )
    lines = [x for x in out.splitlines() if x.startswith("| DSR2,loss=hinge |")][-2:]  # the contrasts table's
    assert [x.split("|")[2].strip() for x in lines] == ["DS0,loss=hinge", "DSR1,loss=hinge"]
    assert rows["DSR2,loss=hinge", "DSR1,loss=hinge"]["diff_verdict"] in lines[1]
    for fmt in ("csv", "html"):
        code, text, _ = run_cli(capsys, "contrasted", "--tracking-uri", contrast_store, "--no-log", "--format", fmt)
        assert code == 0 and "contrasted: declared contrasts (test_acc)" in text
    code, text, _ = run_cli(capsys, "contrasted", "--tracking-uri", contrast_store, "--no-log", "--format", "csv")
    assert {"x", "y", "n_pairs", "p_holm", "x_values"} <= set(text.splitlines()[0].split(","))
    margin = report_json(capsys, contrast_store, "contrasted", "--margin", "0.01")
    assert {r.get("margin") for r in contrast_rows(margin)[0]["records"]} == {0.01}


def test_json_values_carry_seeds_and_redo_a_paired_test(
    contrast_store: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """From report.json alone: values sorted by seed with their launch; scipy's paired t on them gives the file's p."""
    from scipy import stats

    table, _ = contrast_rows(report_json(capsys, contrast_store, "contrasted"))
    rec = next(r for r in table["records"] if (r["x"], r["y"]) == ("DSR2,loss=hinge", "DS0,loss=hinge"))
    x, y = rec["x_values"], rec["y_values"]
    assert [v["seed"] for v in x] == [0, 1] and {v["launch"] for v in x + y} == {"launch-K"}
    p = stats.ttest_rel([v["value"] for v in x], [v["value"] for v in y]).pvalue
    assert rec["p"] == pytest.approx(p, rel=1e-9)


def test_adhoc_baseline_says_its_family_in_every_format(
    contrast_store: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """`--baseline` replaces the declared family: md/json/html notes and the csv's holm_family say it is ad hoc."""
    args = ("contrasted", "--tracking-uri", contrast_store, "--no-log", "--baseline", "DS0,loss=hinge")
    outputs = {fmt: run_cli(capsys, *args, "--format", fmt) for fmt in ("md", "json", "html", "csv")}
    assert all(code == 0 for code, _, _ in outputs.values())
    for fmt in ("md", "json", "html"):
        assert "an ad-hoc family (the comparisons with --baseline DS0,loss=hinge)" in outputs[fmt][1], fmt
    assert "declared contrasts" not in outputs["md"][1]
    assert "holm_family" in outputs["csv"][1].splitlines()[0] and "ad-hoc family" in outputs["csv"][1]


def test_plots_html_and_artifacts(layout_store: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "report"
    code, printed, err = run_cli(capsys, "grid", "--tracking-uri", layout_store, "--out", str(out), "--format", "html")
    assert code == 0, err
    assert "logged as artifacts report/ on parent run" in err
    pngs = sorted(p.name for p in out.glob("*.png"))
    assert pngs == ["angles.png", "curves.png", "test_acc_vs_feedback.concordance.png"]
    page = (out / "report.html").read_text()
    for name in pngs:
        data = (out / name).read_bytes()
        assert data.startswith(PNG_SIGNATURE)
        image = imread(out / name)
        assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100
        assert base64.b64encode(data).decode() in page
    assert "<table>" in page and "concordance=1.0,magnitude=uniform" in page
    assert printed.strip() == page.strip()
    code, printed, _ = run_cli(capsys, "grid", "--tracking-uri", layout_store, "--format", "html", "--no-log")
    assert code == 0 and printed.count("data:image/png;base64,") == len(pngs)  # html always embeds the plots
    assert {"report.md", "report.csv", "report.json"} <= {p.name for p in out.iterdir()}
    client = MlflowClient(layout_store)
    parent = client.search_runs(
        [client.get_experiment_by_name("grid").experiment_id],
        "tags.`fasweep.role` = 'parent' and tags.`fasweep.launch` = 'launch-B'",
    )[0]
    logged = {Path(a.path).name for a in client.list_artifacts(parent.info.run_id, "report")}
    assert set(pngs) | {"report.html", "report.md"} <= logged


def test_only_the_main_report_is_logged_unless_asked(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    parent = write_sweep(uri, tmp_path, GRID_SPEC, "L", grid_trials([0, 1], np.random.default_rng(1)), axes=[])
    client = MlflowClient(uri)

    def logged() -> list[str]:
        return sorted(a.path for a in client.list_artifacts(parent) if a.is_dir)

    adhoc = [("--by", "feedback.concordance"), ("--metric", "test_loss"), ("--at", "best"), ("--margin", "0.01")]
    for flag, value in adhoc:
        code, _, err = run_cli(capsys, "grid", "--tracking-uri", uri, "--format", "csv", flag, value)
        assert code == 0 and f"not logged on the parent run: an ad-hoc report ({flag} {value})" in err
    code, _, err = run_cli(capsys, "grid", "--tracking-uri", uri, "--out", str(tmp_path / "r"), "--by", "feedback.mode")
    assert code == 0 and (tmp_path / "r" / "report.html").is_file() and logged() == []  # --out only
    code, _, err = run_cli(capsys, "grid", "--tracking-uri", uri, "--format", "csv", "--no-log")
    assert code == 0 and "logged" not in err and logged() == []
    code, _, err = run_cli(capsys, "grid", "--tracking-uri", uri, "--format", "csv")  # the main report
    assert code == 0 and f"logged as artifacts report/ on parent run {parent}" in err
    code, _, err = run_cli(capsys, "grid", "--tracking-uri", uri, "--at", "best", "--by", "feedback.magnitude", "--log")
    assert code == 0 and "logged as artifacts report-at_best-by_feedback.magnitude/" in err
    assert logged() == ["report", "report-at_best-by_feedback.magnitude"]  # the main report is left as it was


def test_a_running_launch_keeps_its_main_report_for_its_end(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """While the launch's driver holds the lease, `report` logs nothing as the main report: it says the launch is
    still running, and `--log` logs a partial report under a name of its own."""
    from fasweep.runs.lease import Lease

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    parent = write_sweep(uri, tmp_path, GRID_SPEC, "L", grid_trials([0, 1], np.random.default_rng(1)), axes=[])
    client = MlflowClient(uri)
    client.set_tag(parent, "fasweep.status", "running")
    lease = Lease(client, client.get_run(parent).info.experiment_id, "grid", "L", uri)
    lease.acquire()
    try:
        code, _, err = run_cli(capsys, "grid", "--tracking-uri", uri, "--format", "csv")
        assert code == 0 and err.splitlines()[-1:] == [
            "not logged on the parent run: launch L is still running and logs its main report when it ends; --log "
            "logs this one as report-running/"
        ]
        code, _, err = run_cli(capsys, "grid", "--tracking-uri", uri, "--format", "csv", "--log")
        assert code == 0 and f"logged as artifacts report-running/ on parent run {parent}" in err
    finally:
        lease.release()
    assert sorted(a.path for a in client.list_artifacts(parent) if a.is_dir) == ["report-running"]
    code, _, err = run_cli(capsys, "grid", "--tracking-uri", uri, "--format", "csv")  # its driver is gone
    assert code == 0 and f"logged as artifacts report/ on parent run {parent}" in err


def test_spec_file_gives_name_and_reference(
    layout_store: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    spec = {**GRID_SPEC, "reference": {"concordance=0.0,magnitude=batch_random": {"test_acc": 0.25}}}
    path = tmp_path / "grid.yaml"
    path.write_text(yaml.safe_dump(spec))
    rows = by_condition(report_json(capsys, layout_store, str(path))["tables"][0]["records"])
    assert rows["concordance=0.0,magnitude=batch_random"]["reference"] == 0.25  # the file wins over the artifact
    assert rows["concordance=1.0,magnitude=uniform"]["reference"] is None
    code, _, err = run_cli(capsys, str(tmp_path / "missing.yaml"), "--tracking-uri", layout_store)
    assert code == 2 and "missing.yaml" in err and err.count("\n") == 1
    # --set gives the spec file the launch's overrides: here a reference number set on the command line
    ref = 'reference={"concordance=1.0,magnitude=uniform": {test_acc: 0.5}}'
    code, out, err = run_cli(capsys, str(path), "--tracking-uri", layout_store, "--format", "json", "--set", ref)
    assert code == 0, err
    rows = by_condition(json.loads(out)["tables"][0]["records"])
    assert rows["concordance=1.0,magnitude=uniform"]["reference"] == 0.5
    code, _, err = run_cli(capsys, "grid", "--tracking-uri", layout_store, "--set", "seeds=[0]")
    assert code == 2 and err.startswith("error: --set: got ['seeds']; expected a spec file") and err.count("\n") == 1


def test_stages_and_stopped_trials(layout_store: str, capsys: pytest.CaptureFixture[str]) -> None:
    body = report_json(capsys, layout_store, "staged")
    [table] = body["tables"]
    labels = [f"{r['stage']}/{r['condition']}" for r in table["records"]]
    assert labels == ["pre/bp", "post/bp", "post/random"]  # the plan's order: stages, then conditions
    refs = {label: r["reference"] for label, r in zip(labels, table["records"], strict=True)}
    assert refs == {"pre/bp": 0.7, "post/bp": 0.7, "post/random": 0.5}  # `stage/condition` key beats `condition`
    df = trial_runs(layout_store, "staged")
    for label, rec in zip(labels, table["records"], strict=True):
        stage, cond = label.split("/")
        group = df[(df["tags.fasweep.stage"] == stage) & (df["tags.fasweep.condition"] == cond)]
        assert rec["mean"] == pytest.approx(group["metrics.test_acc"].mean(), abs=1e-12)
    assert any("1 trial(s) stopped early by the scheduler" in n for n in table["footnotes"])
    pivot = report_json(capsys, layout_store, "staged", "--by", "feedback.mode")["tables"][0]["records"]
    assert [(r["stage"], r["feedback.mode"], r["n"]) for r in pivot] == [
        ("pre", "bp", 2),
        ("post", "bp", 2),
        ("post", "random", 2),
    ]


# in the plan's order (yaml.safe_dump sorts the logged spec's conditions); DS0 is BP: all its angles are 0°
DEEP_ARCHS = ["DD0", "DDR1", "DDR2", "DDR4", "DS0", "DSR1", "DSR1-U", "DSR2", "DSR2-U"]
DEEP_SPEC = {
    "name": "deep",
    "base": {"data": {"name": "digits"}, "train": {"epochs": EPOCHS}},
    "conditions": {arch: {"model.arch": arch} for arch in DEEP_ARCHS},
    "grid": {"train.loss": ["cross_entropy", "hinge"]},
    "seeds": [0, 1],
}
WIDE = "DSR1,loss=hinge"  # its two seeds' test_acc: 0.02 and 0.40 at every epoch, a t band far below 0


def deep_trials(rng: np.random.Generator) -> list[dict[str, Any]]:
    """9 archs × 2 losses = 18 conditions (past MAX_CURVES) × 2 seeds; hinge losses on another scale than
    cross-entropy; the last layer's angle is 0° (exactly, or 1e-6° of float noise) everywhere, and every
    angle of the BP arch DS0 is exactly 0°."""
    out = []
    for arch in DEEP_ARCHS:
        for loss in ("cross_entropy", "hinge"):
            for s in (0, 1):
                metrics = _curves(rng)
                if loss == "hinge":
                    metrics["train_loss"] = rng.uniform(5, 60, EPOCHS).tolist()
                if f"{arch},loss={loss}" == WIDE:
                    metrics["test_acc"] = [(0.02, 0.40)[s]] * EPOCHS
                metrics["angle/dense4"] = [1e-6 * (loss == "hinge")] * EPOCHS
                if arch == "DS0":
                    metrics["angle/dense0"] = metrics["angle/dense2"] = [0.0] * EPOCHS
                params = {"model.arch": arch, "train.loss": loss, "train.seed": s, "train.epochs": EPOCHS}
                out.append({"condition": f"{arch},loss={loss}", "seed": s, "metrics": metrics, "params": params})
    return out


@pytest.fixture(scope="module")
def deep_store(tmp_path_factory: pytest.TempPathFactory) -> str:
    root = tmp_path_factory.mktemp("deep")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    write_sweep(
        uri, root, DEEP_SPEC, "launch-D", deep_trials(np.random.default_rng(3)), axes=["model.arch", "train.loss"]
    )
    return uri


def loaded(uri: str, name: str) -> Any:
    """The sweep as the report reads it, with the histories its plots use."""
    from fasweep.report.collect import fetch_histories, load_sweep
    from fasweep.report.plots import angle_keys

    sweep = load_sweep(uri, name)
    fetch_histories(uri, sweep.trials, ["test_acc", "train_loss", *angle_keys(sweep)])
    return sweep


def band_ys(ax: Any) -> np.ndarray:
    """The y of every vertex of the axes' bands (fill_between's PolyCollections)."""
    ys = [p.vertices[:, 1] for c in ax.collections for p in c.get_paths()]
    return np.concatenate(ys) if ys else np.array([])


def test_small_multiples_past_the_legend_limit(
    deep_store: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """18 conditions (9 archs × 2 losses): one row per train.loss value, one line per condition in it (the mean of
    its own 2 seeds, from the metric histories), nothing pooled; the report's md and html captions say so."""
    from fasweep.report.plots import MAX_CURVES, learning_curves

    sweep = loaded(deep_store, "deep")
    assert len(sweep.condition_order) > MAX_CURVES
    plot = learning_curves(sweep, "test_acc")
    axes = [ax for ax in plot.figure.axes if ax.get_visible()]
    assert len(axes) == 4  # 2 losses × (test_acc, train_loss)
    client = MlflowClient(deep_store)
    df = trial_runs(deep_store, "deep")
    for ax in axes:
        loss = ax.get_title().removeprefix("train.loss = ")
        key = ax.get_ylabel()
        assert loss in ("cross_entropy", "hinge") and key in ("test_acc", "train_loss")
        lines = {line.get_label(): line.get_ydata() for line in ax.get_lines()}
        assert list(lines) == DEEP_ARCHS  # one line per condition of this loss, labelled by its arch
        for arch, ys in lines.items():
            runs = df[df["tags.fasweep.condition"] == f"{arch},loss={loss}"]["run_id"]
            assert len(runs) == 2
            seeds = [[m.value for m in sorted(client.get_metric_history(r, key), key=lambda m: m.step)] for r in runs]
            assert ys == pytest.approx(np.mean(seeds, axis=0), abs=1e-12)
    for ax in plot.figure.axes[1::2]:  # each row's legend: that row's 9 conditions
        assert [t.get_text() for t in ax.get_legend().get_texts()] == DEEP_ARCHS
    out = tmp_path / "r"
    code, _, err = run_cli(capsys, "deep", "--tracking-uri", deep_store, "--out", str(out), "--no-log")
    assert code == 0, err
    assert sorted(p.name for p in out.glob("*.png")) == ["angles.png", "curves.png", "test_acc_vs_model.arch.png"]
    md, page = (out / "report.md").read_text(), (out / "report.html").read_text()
    caption = plot.caption
    assert "one row per train.loss value (18 conditions, more than 12 for one legend)" in caption
    assert "mean over its seeds (n = 2 seeds)" in caption and "95% CI" in caption and "Nothing pooled" in caption
    assert "pooled over" not in caption
    assert f"![curves.png](curves.png)\n\n{caption}" in md
    assert f"<figcaption class='note'>{html.escape(caption)}</figcaption>" in page
    assert json.loads((out / "report.json").read_text())["captions"]["curves.png"] == caption
    again = learning_curves(sweep, "test_acc").save(tmp_path)  # same data, same bytes
    assert again.read_bytes() == (out / "curves.png").read_bytes()


def test_bands_clipped_to_the_metric_range(deep_store: str) -> None:
    """A 2-seed t band of 0.02 and 0.40 reaches far below 0: drawn from 0 (accuracy), as losses from 0 and
    angles within [0°, 180°]."""
    from fasweep.report.plots import angle_curves, angle_keys, learning_curves, metric_range

    assert 0.21 - math.tan(0.475 * math.pi) * np.std([0.02, 0.40], ddof=1) / math.sqrt(2) < -1  # unclipped
    sweep = loaded(deep_store, "deep")
    curves = learning_curves(sweep, "test_acc")
    angles = angle_curves(sweep, angle_keys(sweep))
    checked = 0
    for ax in curves.figure.axes + angles.figure.axes:
        if not ax.get_visible() or not ax.collections:
            continue
        key = ax.get_ylabel() if ax.get_ylabel() in ("test_acc", "train_loss") else "angle/"
        low, high = metric_range(key)
        ys = band_ys(ax)
        assert len(ys) and low <= ys.min() and ys.max() <= high, (ax.get_title(), key)
        checked += 1
    assert checked == 4 + 4  # curves: 2 rows × 2 panels; angles: 2 rows × dense0, dense2
    [wide_ax] = [ax for ax in curves.figure.axes if ax.get_title().endswith("hinge") and ax.get_ylabel() == "test_acc"]
    [wide] = [c for c, line in zip(wide_ax.collections, wide_ax.get_lines(), strict=True) if line.get_label() == "DSR1"]
    assert min(p.vertices[:, 1].min() for p in wide.get_paths()) == 0.0  # clipped at 0, not dropped
    assert metric_range("bw_norm_ratio/dense0") == (0.0, math.inf) and metric_range("epoch") == (-math.inf, math.inf)


def test_identically_zero_angles_omitted_and_named(
    deep_store: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The last layer (0° or 1e-6° everywhere) gets no panel and the BP arch no line; the figure's title and the
    report's captions say which and why."""
    from fasweep.report.plots import angle_curves, angle_keys

    sweep = loaded(deep_store, "deep")
    assert angle_keys(sweep) == ["angle/dense0", "angle/dense2", "angle/dense4"]
    plot = angle_curves(sweep, angle_keys(sweep))
    axes = [ax for ax in plot.figure.axes if ax.get_visible()]
    assert sorted(ax.get_title() for ax in axes) == sorted(
        f"{layer} · train.loss = {loss}" for layer in ("dense0", "dense2") for loss in ("cross_entropy", "hinge")
    )
    for ax in axes:
        assert [line.get_label() for line in ax.get_lines()] == [a for a in DEEP_ARCHS if a != "DS0"]
    note = (
        "Not drawn, angle identically 0° (within 0.001°) at every epoch and seed: exact gradient: "
        "layer dense4 (every condition); DS0,loss=cross_entropy (every layer); DS0,loss=hinge (every layer)"
    )
    assert note in plot.caption and note in " ".join(plot.figure.get_suptitle().split())
    out = tmp_path / "r"
    code, _, err = run_cli(capsys, "deep", "--tracking-uri", deep_store, "--out", str(out), "--no-log")
    assert code == 0, err
    assert note in (out / "report.md").read_text() and html.escape(note) in (out / "report.html").read_text()


def test_metric_vs_axis_splits_or_names_what_it_pools(
    layout_store: str, deep_store: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A varied axis beyond x and line gets a panel per value (stages too); past MAX_PANELS values it is pooled,
    and the title and caption say over what and with how many trials per point."""
    from fasweep.report.plots import metric_vs_axis

    staged = metric_vs_axis(loaded(layout_store, "staged"), "test_acc", "final", "feedback.mode", None)
    titles = [ax.get_title() for ax in staged.figure.axes if ax.get_visible()]
    assert titles == ["stage = pre", "stage = post"]  # pre/bp and post/bp never share a point
    assert "one panel per stage value" in staged.caption and "Nothing pooled beyond seeds" in staged.caption
    grid = loaded(layout_store, "grid")
    by_mag = metric_vs_axis(grid, "test_acc", "final", "feedback.concordance", None)
    assert len([ax for ax in by_mag.figure.axes if ax.get_visible()]) == len(MAGNITUDE)
    deep = metric_vs_axis(loaded(deep_store, "deep"), "test_acc", "final", "train.loss", None)
    assert len(deep.figure.axes) == 1  # 9 archs: more than MAX_PANELS panels, so pooled and named
    pooled = "pooled over model.arch (n = 18 trials per point)"
    assert pooled in deep.caption and pooled in " ".join(deep.figure.get_suptitle().split())
    out = tmp_path / "r"
    args = ("deep", "--tracking-uri", deep_store, "--out", str(out), "--by", "train.loss")
    code, _, err = run_cli(capsys, *args)
    assert code == 0, err
    assert pooled in (out / "report.md").read_text() and html.escape(pooled) in (out / "report.html").read_text()


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (("nosuch",), "sweep: got 'nosuch'; expected a sweep in"),
        (("grid", "--metric", "test_accuracy"), "--metric: got 'test_accuracy'; expected a logged metric:"),
        (("grid", "--by", "feedback.concordnce"), "--by: got 'feedback.concordnce'"),
        (("grid", "--at", "worst"), "--at: got 'worst'; expected final or best"),
        (("grid", "--format", "pdf"), "--format: got 'pdf'"),
        (("grid", "--ci", "normal"), "--ci: got 'normal'; expected t or bootstrap"),
        (("grid", "--pairing", "run"), "--pairing: got 'run'; expected none or seed"),
    ],
)
def test_bad_input_one_line(layout_store: str, capsys: pytest.CaptureFixture[str], args: tuple, needle: str) -> None:
    code, out, err = run_cli(capsys, *args, "--tracking-uri", layout_store, "--no-log")
    assert code == 2 and out == ""
    assert err.count("\n") == 1 and needle in err and "Traceback" not in err
    if args[0] == "nosuch":
        assert "dense_table, grid, staged" in err
    if "--metric" in args:
        assert "angle/dense0" in err and "test_acc" in err
    if "--by" in args:
        assert "feedback.concordance, feedback.magnitude" in err


def test_empty_and_missing_store(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    missing = f"sqlite:///{tmp_path / 'none.db'}"
    code, _, err = run_cli(capsys, "grid", "--tracking-uri", missing)
    assert code == 2 and "does not exist" in err and err.count("\n") == 1
    assert not (tmp_path / "none.db").exists()
    empty = f"sqlite:///{tmp_path / 'empty.db'}"
    MlflowClient(empty).search_experiments()  # creates the schema, no runs
    capsys.readouterr()  # drop MLflow's own schema-creation log lines
    code, _, err = run_cli(capsys, "grid", "--tracking-uri", empty)
    assert code == 2 and "no fasweep sweeps in this MLflow store" in err and err.count("\n") == 1
    code, _, err = run_cli(capsys, "grid", "--tracking-uri", "http://127.0.0.1:9")  # nothing listens on port 9
    assert code == 2 and "http://127.0.0.1:9" in err and err.count("\n") == 1


# --- a store filled by a real sweep: `fasweep launch` (real Ray, real train() on digits) ---------------------

REAL_SPEC = {
    "name": "report_real",
    "description": "tiny digits sweep for the report tests",
    "base": {
        "data": {"name": "digits"},
        "model": {"arch": "Dense32 Dense10"},
        "train": {"epochs": 2, "batch_size": 64, "device": "cpu"},
    },
    "grid": {"feedback.mode": ["bp", "random"], "train.loss": ["cross_entropy", "hinge"]},
    "seeds": [0, 1],
    "resources": {"cpu": 1, "gpu": 0},
    "max_concurrent": 2,
    "reference": {"mode=bp,loss=cross_entropy": {"test_acc": 0.9}},
}


@pytest.fixture(scope="session")
def real_sweep(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, Path]:
    """Run the real CLI `fasweep launch` of an 8-trial digits sweep once; (tracking URI, spec path)."""
    root = tmp_path_factory.mktemp("real")
    spec = root / "report_real.yaml"
    spec.write_text(yaml.safe_dump({**REAL_SPEC, "storage": str(root / "runs")}))
    uri = f"sqlite:///{root / 'mlflow.db'}"
    cmd = [str(Path(sys.executable).parent / "fasweep"), "launch", str(spec), "--tracking-uri", uri, "--num-cpus", "2"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    return uri, spec


@pytest.mark.slow
def test_real_sweep_tables_equal_search_runs(real_sweep: tuple[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    uri, spec = real_sweep
    df = trial_runs(uri, "report_real")
    assert len(df) == 8 and set(df["tags.fasweep.status"]) == {"finished"}
    body = report_json(capsys, uri, "report_real")
    loss_layout, per_condition = body["tables"]
    rows = by_condition(per_condition["records"])
    for cond, group in df.groupby("tags.fasweep.condition"):
        assert rows[cond]["n"] == 2
        assert rows[cond]["mean"] == pytest.approx(group["metrics.test_acc"].mean(), abs=1e-12)
        assert rows[cond]["sd"] == pytest.approx(group["metrics.test_acc"].std(ddof=1), abs=1e-12)
        assert rows[cond]["final_epoch"] == 2
    bp = rows["mode=bp,loss=cross_entropy"]
    assert bp["reference"] == 0.9 and bp["delta"] == pytest.approx(bp["mean"] - 0.9, abs=1e-12)
    assert bp["reference_epoch"] == 2 and bp["reason"] is None
    base = "mode=bp,loss=cross_entropy"
    compared = by_condition(
        report_json(capsys, uri, "report_real", "--baseline", base, "--pairing", "seed")["tables"][-1]["records"]
    )
    value = {
        (c, int(s)): v
        for c, s, v in zip(df["tags.fasweep.condition"], df["params.train.seed"], df["metrics.test_acc"], strict=True)
    }
    p = {}
    for cond, group in df.groupby("tags.fasweep.condition"):
        rec = compared[cond]
        assert (rec["ci_low"], rec["ci_high"]) == pytest.approx(t2_interval(group["metrics.test_acc"]), rel=1e-9)
        if cond != base:
            x, y = ([value[c, s] for s in (0, 1)] for c in (cond, base))
            diff, ci, p[cond] = paired_1df(x, y)
            assert rec["baseline"] == base and rec["pairing"] == "seed" and rec["diff"] == pytest.approx(diff)
            assert (rec["diff_ci_low"], rec["diff_ci_high"]) == pytest.approx(ci, rel=1e-9)
            assert rec["p"] == pytest.approx(p[cond], rel=1e-9) and rec["p_improve"] == pytest.approx(p_better(x, y))
    assert [compared[c]["p_holm"] for c in sorted(p, key=p.__getitem__)] == pytest.approx(
        np.maximum.accumulate([min(1.0, (3 - rank) * p[c]) for rank, c in enumerate(sorted(p, key=p.__getitem__))])
    )
    side = {(r["row"], r["train.loss"]): r for r in loss_layout["records"]}
    assert side[("mode=random", "hinge")]["mean"] == rows["mode=random,loss=hinge"]["mean"]
    pivot = report_json(capsys, uri, str(spec), "--by", "feedback.mode", "--by", "train.loss", "--at", "best")
    client = MlflowClient(uri)
    for rec in pivot["tables"][0]["records"]:
        group = df[
            (df["params.feedback.mode"] == rec["feedback.mode"]) & (df["params.train.loss"] == rec["train.loss"])
        ]
        best = [max(m.value for m in client.get_metric_history(r, "test_acc")) for r in group["run_id"]]
        assert rec["n"] == len(best) == 2
        assert rec["mean"] == pytest.approx(float(np.mean(best)), abs=1e-12)


@pytest.mark.slow
def test_real_sweep_plots_logged_on_parent(
    real_sweep: tuple[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    uri, _ = real_sweep
    code, out, err = run_cli(capsys, "report_real", "--tracking-uri", uri, "--out", str(tmp_path))
    assert code == 0, err
    assert "| mode=bp | " in out  # the seed report's layout: loss variants side by side
    pngs = sorted(tmp_path.glob("*.png"))
    assert [p.name for p in pngs] == ["angles.png", "curves.png", "test_acc_vs_feedback.mode.png"]
    for png in pngs:
        assert png.read_bytes().startswith(PNG_SIGNATURE) and imread(png).shape[2] in (3, 4)
    client = MlflowClient(uri)
    parent = client.search_runs(
        [client.get_experiment_by_name("report_real").experiment_id], "tags.`fasweep.role` = 'parent'"
    )[0]
    logged = {Path(a.path).name for a in client.list_artifacts(parent.info.run_id, "report")}
    assert {p.name for p in pngs} | {"report.html", "report.md", "report.csv", "report.json"} <= logged
