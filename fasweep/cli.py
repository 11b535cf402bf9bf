"""The `fasweep` command line: thin typer commands over the modules; user errors print as one line."""

from __future__ import annotations

import signal
import sys
import urllib.parse
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
import yaml

from fasweep.errors import UserError

if TYPE_CHECKING:
    from fasweep.runs.reader import LaunchRecord

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="Sweeps for asymmetric backpropagation (feedback alignment) on Ray, tracked in MLflow.",
)

SetOpt = Annotated[
    list[str] | None,
    typer.Option("--set", help="override a spec field: --set base.train.epochs=1 (value read as YAML)"),
]
TrialSetOpt = Annotated[
    list[str] | None,
    typer.Option("--set", help="override a trial field: --set train.epochs=1 (value read as YAML)"),
]
CodeOpt = Annotated[
    list[Path] | None,
    typer.Option("--code", help="your package's folder: imported here, shipped to the Ray workers (the spec's code:)"),
]
TrackingOpt = Annotated[
    str | None,
    typer.Option("--tracking-uri", help="MLflow store; default $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db"),
]


def parse_sets(items: list[str] | None) -> dict[str, Any]:
    """Turn ['a.b=1', 'seeds=[0,1]'] into {'a.b': 1, 'seeds': [0, 1]} (values read as YAML, as safely as a spec)."""
    from fasweep.spec import read_value

    out: dict[str, Any] = {}
    for item in items or []:
        path, sep, raw = item.partition("=")
        if not sep or not path.strip():
            raise UserError.field("--set", item, "PATH=VALUE (value read as YAML)")
        out[path.strip()] = read_value(raw, f"--set {path.strip()}")
    return out


def spec_sets(items: list[str] | None, code: list[Path] | None) -> dict[str, Any]:
    """`parse_sets(items)`, with `--code` folders (absolute) as the spec's `code` when given."""
    sets = parse_sets(items)
    if code:
        sets["code"] = [str(folder.resolve()) for folder in code]
    return sets


# --- single trial (fasweep.train / fasweep.models) -------------------------------------------


@app.command()
def train(
    config: Annotated[Path | None, typer.Option("--config", help="a TrialConfig YAML file")] = None,
    model: Annotated[str | None, typer.Option(help="preset (DSR1, PG0, ...) or layer string")] = None,
    dataset: Annotated[str | None, typer.Option(help="cifar10, fashion_mnist, digits, ...")] = None,
    epochs: Annotated[int | None, typer.Option(help="number of epochs")] = None,
    feedback: Annotated[str | None, typer.Option(help="default rule: bp, random, random_updated, ...")] = None,
    out: Annotated[Path | None, typer.Option(help="folder for metrics.jsonl and checkpoints (epoch-N/)")] = None,
    set_: TrialSetOpt = None,
) -> None:
    """Run one trial locally (no Ray) with a progress bar and print the final metrics."""
    import json

    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
    from rich.table import Table

    from fasweep.config import set_path, validate_trial
    from fasweep.models import layers_of
    from fasweep.train import train as run_trial

    data: Any = {}
    if config is not None:
        if not config.is_file():
            raise UserError.field("--config", str(config), "an existing TrialConfig YAML file")
        try:
            data = yaml.safe_load(config.read_text()) or {}
        except yaml.YAMLError as exc:
            raise UserError.field("--config", str(config), f"valid YAML ({exc.__class__.__name__})") from None
        if not isinstance(data, dict):
            raise UserError.field("--config", str(config), "a mapping with sections data, model, feedback, train")
    flags = {"model.arch": model, "data.name": dataset, "train.epochs": epochs, "feedback.mode": feedback}
    for path, value in [*((k, v) for k, v in flags.items() if v is not None), *parse_sets(set_).items()]:
        data = set_path(data, path, value)
    trial = validate_trial(data, where=str(config) if config is not None else "")
    layers_of(trial.model.arch)  # a bad layer string or model fails before the progress bar
    metrics_file = out / "metrics.jsonl" if out is not None else None
    if metrics_file is not None:
        metrics_file.parent.mkdir(parents=True, exist_ok=True)
        metrics_file.write_text("")
    console = Console()
    title = f"{trial.model.arch} on {trial.data.name}, feedback {trial.feedback.mode}"
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, TextColumn("{task.fields[last]}"), console=console) as progress:
        task = progress.add_task(title, total=trial.train.epochs, last="")

        def on_epoch(metrics: dict[str, float], _checkpoint: str | None) -> None:
            if metrics_file is not None:
                with metrics_file.open("a") as fh:
                    fh.write(json.dumps(metrics) + "\n")
            shown = ("train_loss", "test_loss", "test_acc")
            last = "  ".join(f"{k} {metrics[k]:.4g}" for k in shown if k in metrics)
            progress.update(task, completed=int(metrics["epoch"]), last=last)

        result = run_trial(trial, checkpoint_dir=out, on_epoch=on_epoch)
    table = Table(title=f"{title}: {result.status} after {len(result.history)} epochs")
    table.add_column("metric")
    table.add_column("value", justify="right")
    for key, value in result.final.items():
        table.add_row(key, f"{value:.4g}")
    console.print(table)


@app.command()
def models() -> None:
    """List the presets with their layer strings and parameter counts."""
    from rich.console import Console
    from rich.table import Table

    from fasweep.models import PRESETS, parameter_count

    table = Table(title="fasweep presets (parameters for CIFAR-10: 3x32x32 input, 10 outputs)")
    table.add_column("preset", no_wrap=True)
    table.add_column("layer string")
    table.add_column("parameters", justify="right", no_wrap=True)
    for name, layers in PRESETS.items():
        table.add_row(name, layers, f"{parameter_count(name):,}")
    Console().print(table)


# --- sweeps (fasweep.spec / fasweep.launch) -----------------------------------------------------


@app.command()
def validate(specs: list[Path], set_: SetOpt = None, code: CodeOpt = None) -> None:
    """Validate sweep specs; print one line per spec (exit code 2 when any is bad)."""
    from fasweep.spec import load_spec

    sets = spec_sets(set_, code)
    bad = 0
    for path in specs:
        try:
            planned = load_spec(path, sets)
            typer.echo(f"ok {path}: {planned.summary()}")
            for warning in planned.warnings():
                typer.echo(f"warning: {path}: {warning}", err=True)
        except UserError as exc:
            bad += 1
            typer.echo(f"error: {exc}", err=True)
    if bad:
        raise SystemExit(2)  # not typer.Exit: main() runs click with standalone_mode=False, which drops its code


@app.command()
def plan(spec: Path, set_: SetOpt = None, code: CodeOpt = None) -> None:
    """Print the trial table of a spec: condition, overrides, seed, resources, and counts."""
    from rich.console import Console
    from rich.table import Table

    from fasweep.spec import format_value, load_spec

    planned = load_spec(spec, spec_sets(set_, code))
    sweep, trials = planned.spec, planned.trials
    staged = bool(sweep.stages)
    table = Table(title=f"{sweep.name} (experiment {sweep.experiment})", title_justify="left")
    for column in ["stage"] * staged + ["condition", "overrides", "seed", "cpu", "gpu"] + ["init_from"] * staged:
        table.add_column(column, overflow="fold", justify="right" if column in ("seed", "cpu", "gpu") else "left")
    for trial in trials:
        overrides = " ".join(f"{path}={format_value(value, digits=4)}" for path, value in trial.overrides.items())
        init = trial.init_from
        source = f"{init['select']} {init['stage']}/{init['condition']} layers {init['layers']}" if init else ""
        resources = [format_value(trial.resources["cpu"]), format_value(trial.resources["gpu"])]
        cells = [trial.stage] * staged + [trial.condition, overrides, str(trial.seed), *resources] + [source] * staged
        table.add_row(*cells)
    console = Console(width=None if sys.stdout.isatty() else 160)
    console.print(table)
    concurrency = f"max_concurrent {sweep.max_concurrent}" if sweep.max_concurrent else "no max_concurrent"
    gpus = planned.gpus_needed()
    console.print(f"{planned.summary()}; GPUs at full concurrency: {gpus:g} ({concurrency})")
    console.print(f"storage {sweep.storage}; retries {sweep.max_retries}; axes: {', '.join(sweep.axes) or 'none'}")
    for warning in planned.warnings():
        console.print(f"warning: {warning}", markup=False, highlight=False, soft_wrap=True)


@app.command()
def launch(
    spec: Path,
    address: Annotated[str | None, typer.Option(help="Ray cluster address; default: a local Ray")] = None,
    tracking_uri: TrackingOpt = None,
    resume: Annotated[bool, typer.Option("--resume", help="continue the latest launch of this spec")] = False,
    force: Annotated[
        bool, typer.Option("--force", help="take the sweep's lease from a running launch whose driver is gone")
    ] = False,
    set_: SetOpt = None,
    num_cpus: Annotated[int | None, typer.Option(help="CPUs of a local Ray (default: all cores)")] = None,
    code: CodeOpt = None,
) -> None:
    """Run a sweep on Ray and track it in MLflow (exit 0 finished, 1 failed trials, 2 bad input or environment,
    128 + the signal when interrupted: 130 SIGINT, 143 SIGTERM, 129 SIGHUP)."""
    from fasweep.launch import launch as run_launch

    result = run_launch(
        spec,
        sets=spec_sets(set_, code),
        address=address,
        tracking_uri=tracking_uri,
        resume=resume,
        force=force,
        num_cpus=num_cpus,
    )
    if result.status == "nothing-to-resume":
        return
    counts = ", ".join(f"{n} {status}" for status, n in sorted(result.counts.items()))
    best = f"; best {result.best[0]} {result.best[1]:.4f}" if result.best else ""
    typer.echo(f"{result.sweep} @ {result.launch_id} {result.status}: {counts}{best}")
    typer.echo(f"MLflow: experiment {result.experiment!r}, parent run {result.parent_run_id} in {result.tracking_uri}")
    if result.status == "interrupted":
        typer.echo(f"continue with: fasweep launch {spec} --resume (same --set values)")
        raise SystemExit(128 + (result.signal or signal.SIGINT))
    if result.status != "finished":
        if result.retry_helps:
            typer.echo(f"retry the failed trials with: fasweep launch {spec} --resume (same --set values)")
        else:
            typer.echo("fix what the errors above say and launch again (a --resume would fail the same way)")
        raise SystemExit(1)


@app.command()
def status(sweep: Annotated[str | None, typer.Argument()] = None, tracking_uri: TrackingOpt = None) -> None:
    """Show sweeps (launches, trial counts by status, best so far) and, given SWEEP, its latest launch's trials."""
    from rich.console import Console
    from rich.table import Table

    from fasweep.runs.layout import Tag
    from fasweep.runs.reader import sweep_summaries
    from fasweep.runs.store import check_reachable, resolve_tracking_uri

    uri = resolve_tracking_uri(tracking_uri)
    check_reachable(uri)
    launches = sweep_summaries(uri, sweep)
    console = Console(width=None if sys.stdout.isatty() else 160)
    if not launches:
        console.print(f"no sweeps{f' named {sweep!r}' if sweep else ''} in {uri}")
        raise SystemExit(1 if sweep else 0)
    table = Table(title=f"sweeps in {uri}", title_justify="left")
    for column in ("sweep", "launch", "started (UTC)", "status", "trials", "by status", "best"):
        table.add_column(column, overflow="fold")
    for s in launches:
        counts = " ".join(f"{n} {k}" for k, n in sorted(s.counts.items()))
        rule = s.launch.best
        best = f"{rule.metric} {s.best.metrics[rule.metric]:.4f} {s.best.key}" if s.best else ""
        trials = f"{len(s.trials)}/{s.launch.n_trials}"
        table.add_row(s.launch.sweep, s.launch.launch_id, s.launch.started, s.launch.status, trials, counts, best)
    console.print(table)
    if sweep:
        latest = launches[0]
        metric = latest.launch.best.metric
        listing = Table(title=f"{sweep} @ {latest.launch.launch_id}: trials", title_justify="left")
        for column in ("trial", "status", "epochs", metric, "resumed from"):
            listing.add_column(column, justify="left" if column in ("trial", "status") else "right")
        for t in latest.trials:
            value = t.metrics.get(metric)
            shown = "" if value is None else f"{value:.4f}"
            listing.add_row(t.key, t.status, str(t.epoch), shown, t.tags.get(Tag.RESUMED_FROM, ""))
        console.print(listing)
        if latest.best is not None:
            value = latest.best.metrics[metric]
            console.print(f"best {metric} {value:.4f}: {latest.best.key}", markup=False, soft_wrap=True)


@app.command()
def ui(
    sweep: Annotated[str | None, typer.Argument(help="open on this sweep's experiment")] = None,
    tracking_uri: TrackingOpt = None,
    host: Annotated[str, typer.Option(help="interface to serve on; 0.0.0.0 opens it to the network")] = "127.0.0.1",
    port: int = 5000,
    workers: Annotated[int, typer.Option(min=1, help="server processes (1 suits a laptop)")] = 1,
) -> None:
    """Serve the MLflow UI on the tracking store; print its URL (SWEEP's experiment, its condition runs in the
    chart view) once the server answers. Ctrl+C stops it."""
    import subprocess

    from mlflow import MlflowClient

    from fasweep.runs.reader import find_launches
    from fasweep.runs.store import check_reachable, resolve_tracking_uri

    uri = resolve_tracking_uri(tracking_uri)
    check_reachable(uri)
    latest = None
    if sweep:
        launches = find_launches(MlflowClient(uri), sweep)
        if not launches:
            known = sorted({launch.sweep for launch in find_launches(MlflowClient(uri))})
            raise UserError.field("sweep", sweep, f"a sweep in {uri}: {', '.join(known) or 'none yet'}")
        latest = launches[0]
    if uri.startswith(("http://", "https://")):  # a tracking server already serves the UI
        typer.echo(ui_url(uri.rstrip("/"), latest))
        return
    local = "127.0.0.1" if host in ("0.0.0.0", "::") else host
    base = f"http://{'[' + local + ']' if ':' in local else local}:{port}"
    argv = [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", uri, "--host", host, "--port", str(port)]
    server = subprocess.Popen([*argv, "--workers", str(workers)])
    signal.signal(signal.SIGTERM, _interrupt)  # a kill stops the server too
    try:
        _wait_for_health(server, base)
        typer.echo(f"MLflow UI for {uri}: {ui_url(base, latest)} (Ctrl+C stops it)")
        if server.wait():
            raise UserError(f"the MLflow UI stopped with code {server.returncode}")
    except KeyboardInterrupt:
        pass
    finally:
        if server.poll() is None:
            server.terminate()
            try:
                server.wait(timeout=10)
            except subprocess.TimeoutExpired:
                server.kill()


def ui_url(base: str, launch: LaunchRecord | None) -> str:
    """The UI page of a launch's condition runs, best first, in the chart view of the training (not GenAI) UI;
    without a launch, the UI's home. A filter keeps the runs flat: the conditions, not their parent."""
    from fasweep.runs.layout import Role, Tag

    if launch is None:
        return base + "/"
    query = {
        "searchFilter": f"tags.`{Tag.ROLE}` = '{Role.CONDITION}' AND tags.`{Tag.LAUNCH}` = '{launch.launch_id}'",
        "orderByKey": f"metrics.`{launch.best.metric}`",
        "orderByAsc": str(launch.best.mode == "min").lower(),
        "compareRunsMode": "CHART",
        "workflowType": "machine_learning",
    }
    return f"{base}/#/experiments/{launch.experiment_id}/runs?{urllib.parse.urlencode(query)}"


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def _wait_for_health(server: Any, base: str, timeout_s: float = 120.0) -> None:
    """Poll the server's /health until it answers OK; a one-line UserError when it exits or stays silent."""
    import time
    import urllib.request

    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # loopback: never through a proxy
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if server.poll() is not None:
            code = server.returncode
            raise UserError(f"the MLflow UI exited with code {code} before answering ({base} in use? --port)")
        try:
            with opener.open(f"{base}/health", timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.5)
    raise UserError(f"the MLflow UI did not answer on {base}/health within {timeout_s:.0f}s")


# --- analysis (fasweep.report) -------------------------------------------------------------------


@app.command()
def report(
    target: Annotated[str, typer.Argument(help="sweep name or spec file")],
    tracking_uri: TrackingOpt = None,
    format: Annotated[str, typer.Option(help="md, csv, html or json (printed)")] = "md",
    out: Annotated[Path | None, typer.Option(help="directory for tables, plots and report.html")] = None,
    metric: str = "test_acc",
    at: Annotated[str, typer.Option(help="final or best")] = "final",
    by: Annotated[list[str] | None, typer.Option(help="pivot axes, e.g. --by feedback.concordance")] = None,
    launch: Annotated[str, typer.Option(help="latest, all (pooled) or a launch id")] = "latest",
    log: Annotated[
        bool | None,
        typer.Option(
            "--log/--no-log",
            help="log on the launch's parent run (default: only the main report, no table option changed)",
        ),
    ] = None,
    baseline: Annotated[
        str | None,
        typer.Option(
            help="compare every condition with this one, an ad-hoc family (spec: compare_to, compare, contrasts)"
        ),
    ] = None,
    pairing: Annotated[
        str | None, typer.Option(help="seed (paired t on shared seeds) or none (Welch); spec: pairing")
    ] = None,
    ci: Annotated[str, typer.Option(help="95% intervals: t (Student) or bootstrap (n >= 10 seeds)")] = "t",
    margin: Annotated[
        float | None, typer.Option(help="equivalence margin (TOST) in the metric's units; spec: equivalence_margin")
    ] = None,
    set_: SetOpt = None,
) -> None:
    """Tables and plots of a sweep's runs: 95% intervals, comparisons with a baseline, reference numbers beside.

    With a spec file, `--set` applies the launch's overrides to it, so its plan (contrasts, references) is the one
    that ran."""
    from fasweep.report import FORMATS, make_report, render
    from fasweep.runs.store import resolve_tracking_uri

    if format not in FORMATS:
        raise UserError.field("--format", format, " | ".join(FORMATS))
    uri = resolve_tracking_uri(tracking_uri)
    options = {"metric": metric, "at": at, "by": by, "launch": launch, "out": out, "log": log, "ci": ci}
    options |= {"baseline": baseline, "pairing": pairing, "margin": margin, "sets": parse_sets(set_)}
    result = make_report(target, tracking_uri=uri, plots=format == "html", **options)
    typer.echo(render(result, format))
    if out is not None:
        typer.echo(f"wrote {len(result.files)} files to {out} (open {out / 'report.html'})", err=True)
    if result.logged:
        typer.echo(result.logged, err=True)


def main(argv: list[str] | None = None) -> None:
    """Console entry point: run the app; a UserError becomes one line on stderr and exit code 2."""
    try:
        rc = app(args=argv, standalone_mode=False)  # returns typer.Exit's code instead of raising it
    except UserError as exc:
        typer.echo(f"error: {exc}", err=True)
        sys.exit(2)
    except (typer.Abort, KeyboardInterrupt):
        typer.echo("interrupted", err=True)
        sys.exit(130)
    except typer.exceptions.TyperException as exc:  # usage errors (click's, vendored by typer): bad option
        if hasattr(exc, "show"):
            exc.show()
        else:
            typer.echo(f"error: {exc}", err=True)
        sys.exit(2)
    if isinstance(rc, int) and rc:
        sys.exit(rc)
