"""Comparing conditions in the MLflow UI, in a real browser: a small sweep, `fasweep ui` on loopback, the condition
runs found by their short names, their `test_acc` chart, the parent's report.html. Debian's chromium driven by
Playwright (its own browser download cannot work here); skipped where either is missing. Screenshots go to the
test's temp dir."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from mlflow import MlflowClient
from test_runs import check_condition_runs

from fasweep.cli import main

REPO = Path(__file__).resolve().parents[1]
CHROMIUM = Path("/usr/bin/chromium")
SWEEP = "sign_concordance"
SETS = [
    *("--set", "base.data.name=digits", "--set", "resources.gpu=0", "--set", "max_retries=0"),
    *("--set", "base.model.arch=Dense64 Dense10", "--set", "base.train.epochs=2", "--set", "seeds=[0, 1]"),
    *("--set", "grid.feedback.concordance=[1.0, 0.0]", "--set", "grid.feedback.magnitude=[uniform]"),
    *("--set", "grid.model.batchnorm=[false]", "--set", "grid.train.batch_manhattan=[false]"),
]
SHORT_NAMES = ["concordance=1", "concordance=0"]  # only the axis that varies, values shortest


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


@pytest.mark.slow
def test_conditions_compare_in_the_mlflow_ui(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
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
        _wait_for(launch_log, "launching", launch, 180)  # the parent run exists: the UI starts while trials train
        with ui_log.open("w") as out:
            ui = subprocess.Popen(
                [fasweep, "ui", SWEEP, "--tracking-uri", uri, "--port", str(port)],
                cwd=tmp_path,
                env=env,
                stdout=out,
                stderr=subprocess.DEVNULL,
            )
        assert launch.wait(timeout=300) == 0, launch_log.read_text()[-3000:]
        check_condition_runs(uri, SWEEP)  # means and sds recomputed from the trial runs
        main(["report", SWEEP, "--tracking-uri", uri])  # the main report: logged on the parent run
        assert "logged as artifacts report/ on parent run" in capsys.readouterr().err
        line = _wait_for(ui_log, "MLflow UI for", ui, 180)  # printed once the server answered /health
        url = line.split(": ", 1)[1].removesuffix(" (Ctrl+C stops it)")
        base = f"http://127.0.0.1:{port}"
        assert url.startswith(f"{base}/#/experiments/") and "compareRunsMode=CHART" in url

        mlflow = MlflowClient(uri)
        experiment = mlflow.get_experiment_by_name(SWEEP).experiment_id
        (parent,) = mlflow.search_runs([experiment], "tags.`fasweep.role` = 'parent'")
        with sync_api.sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=str(CHROMIUM), args=["--no-sandbox"])
            page = browser.new_page(viewport={"width": 1400, "height": 900})
            page.set_default_timeout(60_000)
            page.goto(url)
            for name in SHORT_NAMES:  # the condition runs, flat, by their short names
                page.get_by_text(name, exact=True).first.wait_for()
            page.get_by_text("2 matching runs").wait_for()
            assistant = page.get_by_role("button", name="Close", exact=True)
            if assistant.count():
                assistant.first.click()
            page.screenshot(path=tmp_path / "conditions.png")
            page.get_by_placeholder("Search metric charts").fill("test_acc")
            for name in SHORT_NAMES:  # the chart's legend: one mean curve per condition
                page.get_by_text(f"{name} (test_acc)", exact=True).wait_for()
            page.screenshot(path=tmp_path / "test_acc.png")
            report = f"#/experiments/{experiment}/runs/{parent.info.run_id}/artifacts/report/report.html"
            page.goto(f"{base}/{report}?workflowType=machine_learning")
            html = page.frame_locator("iframe").first
            html.get_by_role("heading", name=f"fasweep report: {SWEEP}").wait_for()
            html.get_by_text("concordance=1.0,magnitude=uniform", exact=False).first.wait_for()
            page.screenshot(path=tmp_path / "report.png")
            browser.close()
    finally:
        for proc in (ui, launch):
            if proc is not None:
                _stop(proc)
    assert {p.name for p in tmp_path.glob("*.png")} == {"conditions.png", "test_acc.png", "report.png"}


def test_ui_url_and_an_unknown_sweep(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from fasweep.cli import ui_url
    from fasweep.runs.reader import find_launches

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    mlflow = MlflowClient(uri)
    experiment = mlflow.create_experiment("losses")
    tags = {"fasweep.role": "parent", "fasweep.sweep": "losses", "fasweep.launch": "L1", "fasweep.best_mode": "min"}
    mlflow.create_run(experiment, tags=tags | {"fasweep.best_metric": "test_loss"})
    with pytest.raises(SystemExit) as exited:
        main(["ui", "nope", "--tracking-uri", uri])
    assert exited.value.code == 2
    assert capsys.readouterr().err.endswith(f"\nerror: sweep: got 'nope'; expected a sweep in {uri}: losses\n")
    (launch,) = find_launches(mlflow, "losses")
    url = ui_url("http://127.0.0.1:5000", launch)
    assert url.startswith(f"http://127.0.0.1:5000/#/experiments/{experiment}/runs?searchFilter=tags.")
    assert "L1" in url and "orderByKey=metrics.%60test_loss%60&orderByAsc=true" in url  # a loss: lowest first
    assert "compareRunsMode=CHART&workflowType=machine_learning" in url
    assert ui_url("http://127.0.0.1:5000", None) == "http://127.0.0.1:5000/"
