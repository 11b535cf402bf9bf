"""The MLflow UI as `fasweep ui` opens it, in a real browser: the quickstart (digits, 2 epochs), `fasweep ui` on
loopback, and every page it prints walked in MLflow's training view (never its GenAI mode): the launch's runs (the
parent beside its conditions, best first, the test_acc chart first), the parent run, its report.html and MLflow's
Compare page of the conditions (test_acc chosen, each layer's rule in the params). Debian's chromium driven by
Playwright (its own browser download cannot work here); skipped where either is missing. Screenshots go to the
test's temp dir."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.parse
from pathlib import Path

import pytest
from mlflow import MlflowClient
from test_runs import check_condition_runs

from fasweep.cli import main
from fasweep.config import FeedbackConfig, ModelConfig
from fasweep.models import build_model
from fasweep.runs.layout import SHARED_VIEW_TAG_PREFIX

REPO = Path(__file__).resolve().parents[1]
CHROMIUM = Path("/usr/bin/chromium")
SWEEP = "quickstart"
SETS = [
    *("--set", "base.data.name=digits", "--set", "max_retries=0", "--set", "base.train.epochs=2"),
]
CONDITIONS = ["DS0", "DSR1", "DSR2-U"]  # the condition runs' names
RULES = {  # what each quickstart condition's layers run: the preset's marks, whatever feedback.mode says
    "DS0": "dense0:bp dense1:bp dense2:bp",
    "DSR1": "dense0:bp dense1:bp dense2:random",
    "DSR2-U": "dense0:bp dense1:random_updated dense2:random_updated",
}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_for(path: Path, text: str, proc: subprocess.Popen, timeout_s: float) -> str:
    """The first line of `path` holding `text`, waiting while `proc` runs."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        line = next((ln for ln in path.read_text().splitlines() if text in ln), None)
        if line is not None:
            return line
        assert proc.poll() is None, path.read_text()[-3000:]
        time.sleep(0.5)
    raise AssertionError(f"no {text!r} in {path} after {timeout_s:.0f}s: {path.read_text()[-3000:]}")


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)  # Ctrl+C: `fasweep ui` stops its server
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _training_view(page) -> None:
    """MLflow's training view is on: its sidebar has the model registry; GenAI mode's has Observability instead."""
    page.get_by_text("Model registry", exact=True).first.wait_for()
    assert page.get_by_text("Observability", exact=True).count() == 0, page.url


@pytest.mark.slow
def test_every_page_fasweep_ui_prints_opens_in_the_training_view(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    if not CHROMIUM.is_file():
        pytest.skip(f"no Chromium at {CHROMIUM} (apt-get install chromium)")
    sync_api = pytest.importorskip("playwright.sync_api", reason="Playwright not installed (pip install playwright)")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    fasweep = str(Path(sys.executable).parent / "fasweep")
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"} | {"OMP_NUM_THREADS": "1"}
    launch_log, ui_log = tmp_path / "launch.log", tmp_path / "ui.log"
    spec = str(REPO / "sweeps" / f"{SWEEP}.yaml")
    with launch_log.open("w") as out:
        launch = subprocess.Popen(
            [fasweep, "launch", spec, "--tracking-uri", uri, "--num-cpus", "2", *SETS],
            cwd=tmp_path,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    port = _free_port()
    ui = None
    try:
        assert launch.wait(timeout=300) == 0, launch_log.read_text()[-3000:]
        assert f"its pages in the MLflow UI: fasweep ui {SWEEP} --tracking-uri {uri}" in launch_log.read_text()
        check_condition_runs(uri, SWEEP)  # means and sds recomputed from the trial runs
        mlflow = MlflowClient(uri)
        experiment = mlflow.get_experiment_by_name(SWEEP).experiment_id
        for run in mlflow.search_runs([experiment], "tags.`fasweep.role` != 'parent'"):
            _check_rule_params(run, RULES[run.data.tags["fasweep.condition"]])
        main(["report", SWEEP, "--tracking-uri", uri])  # the main report: logged on the parent run
        assert "logged as artifacts report/ on parent run" in capsys.readouterr().err
        with ui_log.open("w") as out:
            ui = subprocess.Popen(
                [fasweep, "ui", SWEEP, "--tracking-uri", uri, "--port", str(port)],
                cwd=tmp_path,
                env=env,
                stdout=out,
                stderr=subprocess.DEVNULL,
            )
        _wait_for(ui_log, "  compare  ", ui, 180)  # printed once the server answered /health
        pages = {ln.split()[0]: ln.split()[1] for ln in ui_log.read_text().splitlines() if ln.startswith("  ")}
        assert sorted(pages) == ["compare", "parent", "report", "runs"]
        base = f"http://127.0.0.1:{port}/#/"
        assert all(url.startswith(base) and url.endswith("workflowType=machine_learning") for url in pages.values())
        (parent,) = mlflow.search_runs([experiment], "tags.`fasweep.role` = 'parent'")
        view_tag = f"{SHARED_VIEW_TAG_PREFIX}fasweep-{parent.data.tags['fasweep.launch']}"
        view = mlflow.get_experiment(experiment).tags[view_tag]
        assert json.loads(json.loads(view)["state"])["orderByKey"] == "metrics.`test_acc`"

        with sync_api.sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=str(CHROMIUM), args=["--no-sandbox"])
            page = browser.new_page(viewport={"width": 1400, "height": 900})
            page.set_default_timeout(60_000)
            page.goto(pages["runs"])  # a fresh browser: MLflow would open GenAI mode without the link's parameter
            for name in [*CONDITIONS, parent.info.run_name]:  # the conditions and, beside them, their parent
                page.get_by_text(name, exact=True).first.wait_for()
            page.get_by_text(f"{len(CONDITIONS) + 1} matching runs").wait_for()
            _training_view(page)
            assistant = page.get_by_role("button", name="Close", exact=True)
            if assistant.count():
                assistant.first.click()
            cards = page.get_by_test_id("experiment-view-compare-runs-card")
            cards.first.get_by_text("DSR1 (test_acc)", exact=True).wait_for()  # the first chart: test_acc's curves
            page.get_by_text("Parallel Coordinates", exact=True).first.wait_for()
            page.screenshot(path=tmp_path / "runs.png")

            page.goto(pages["parent"])
            launch_id = parent.data.tags["fasweep.launch"]
            page.get_by_text(f"{SWEEP} @ {launch_id}: 6 trials", exact=False).first.wait_for()  # its description
            _training_view(page)
            page.screenshot(path=tmp_path / "parent.png")

            page.goto(pages["report"])
            html = page.frame_locator("iframe").first
            html.get_by_role("heading", name=f"fasweep report: {SWEEP}").wait_for()
            html.get_by_text("DSR2-U", exact=True).first.wait_for()
            _training_view(page)
            page.screenshot(path=tmp_path / "report.png")

            page.goto(pages["compare"])
            page.get_by_text(f"Comparing {len(CONDITIONS)} Runs from 1 Experiment").wait_for()
            _training_view(page)
            metrics = page.get_by_text("Metrics:", exact=True).locator("xpath=following-sibling::*[1]")
            metrics.get_by_text("test_acc", exact=True).wait_for()  # the parallel coordinates open on test_acc
            page.get_by_text(RULES["DSR1"], exact=True).wait_for()  # params side by side: what each layer ran
            page.screenshot(path=tmp_path / "compare.png", full_page=True)
            browser.close()
    finally:
        for proc in (ui, launch):
            if proc is not None:
                _stop(proc)
    assert {p.name for p in tmp_path.glob("*.png")} == {"runs.png", "parent.png", "report.png", "compare.png"}


def _check_rule_params(run, layers: str) -> None:
    """A trial or condition run's `feedback.layers*` params say what its layers ran, checked against the rules of
    the model `build_model` makes from the run's own params (the trainer's computation, not the params')."""
    params = run.data.params
    assert params["feedback.layers"] == layers, run.info.run_name
    model_config, feedback_config = ModelConfig(arch=params["model.arch"]), FeedbackConfig(mode=params["feedback.mode"])
    model = build_model(model_config, feedback_config, (64,), 10)
    built = {name: module.rule.mode for name, module in model.named_children() if hasattr(module, "rule")}
    assert " ".join(f"{name}:{mode}" for name, mode in built.items()) == layers
    for name, mode in built.items():
        assert params[f"feedback.layers.{name}"] == (f"{mode}(decay=0.0)" if mode == "random_updated" else mode)


def test_an_unknown_sweep_names_the_sweeps_there_are(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    mlflow = MlflowClient(uri)
    experiment = mlflow.create_experiment("losses")
    tags = {"fasweep.role": "parent", "fasweep.sweep": "losses", "fasweep.launch": "L1", "fasweep.best_mode": "min"}
    mlflow.create_run(experiment, tags=tags | {"fasweep.best_metric": "test_loss"})
    for command in ("ui", "status"):
        with pytest.raises(SystemExit) as exited:
            main([command, "nope", "--tracking-uri", uri])
        out, err = capsys.readouterr()
        assert (exited.value.code, out) == (2, "")
        assert [line for line in err.splitlines() if "error" in line] == [
            f"error: sweep: got 'nope'; expected a sweep in {uri}: losses"
        ]


def test_the_launch_pages_carry_the_training_view_and_a_saved_view(tmp_path: Path) -> None:
    """A launch whose best metric is a loss: its saved view sorts lowest first; every page keeps the training view."""
    from fasweep.runs.links import publish_links
    from fasweep.runs.reader import find_launches

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    mlflow = MlflowClient(uri)
    experiment = mlflow.create_experiment("losses")
    tags = {"fasweep.role": "parent", "fasweep.sweep": "losses", "fasweep.launch": "L1", "fasweep.best_mode": "min"}
    tags |= {"fasweep.best_metric": "test_loss", "fasweep.axes": json.dumps(["train.lr", "model.arch"])}
    parent = mlflow.create_run(experiment, tags=tags).info.run_id
    condition = {"fasweep.role": "condition", "fasweep.sweep": "losses", "fasweep.launch": "L1"}
    conditions = [mlflow.create_run(experiment, tags=condition).info.run_id for _ in range(2)]
    (launch,) = find_launches(mlflow, "losses")
    links = publish_links(mlflow, "http://h:5", launch)
    assert links.parent == f"http://h:5/#/experiments/{experiment}/runs/{parent}?workflowType=machine_learning"
    assert links.report.startswith(f"http://h:5/#/experiments/{experiment}/runs/{parent}/artifacts/report/report.html?")
    assert links.runs == (
        f"http://h:5/#/experiments/{experiment}/runs?viewStateShareKey=fasweep-L1&compareRunsMode=CHART"
        "&workflowType=machine_learning"
    )
    route, _, query = links.compare.partition("?")
    compare = urllib.parse.parse_qs(query)
    assert route == "http://h:5/#/compare-runs" and compare["workflowType"] == ["machine_learning"]
    assert sorted(json.loads(compare["runs"][0])) == sorted(conditions)
    assert compare["experiments"] == [f'["{experiment}"]']
    envelope = json.loads(mlflow.get_experiment(experiment).tags[f"{SHARED_VIEW_TAG_PREFIX}fasweep-L1"])
    assert envelope["name"] == "losses@L1: conditions by test_loss" and isinstance(envelope["createdAt"], int)
    state = json.loads(envelope["state"])
    assert state["searchFilter"] == "tags.`fasweep.launch` = 'L1' AND tags.`fasweep.role` != 'trial'"
    assert (state["orderByKey"], state["orderByAsc"]) == ("metrics.`test_loss`", True)  # a loss: lowest first
    assert state["selectedColumns"][:3] == ["metrics.`test_loss`", "metrics.`test_loss_sd`", "metrics.`n`"]
    line, parallel = state["compareRunCharts"]
    assert (line["type"], line["metricKey"]) == ("LINE", "test_loss")
    assert (parallel["selectedParams"], parallel["selectedMetrics"]) == (["train.lr", "model.arch"], ["test_loss"])
    assert [s["name"] for s in state["compareRunSections"]] == ["Model metrics"] and state["isAccordionReordered"]
    assert publish_links(mlflow, "http://h:5", launch) == links  # published again: the same pages, one tag
