"""The `fasweep` command line: thin typer commands over the modules; user errors print as one line.

Habits of typer/click: `-h` and `--help`, `--version`, bare `fasweep` prints the help, value hints in click's
style (`--set PATH=VALUE`, `--format [md|csv|html|json]`, usage `fasweep validate [OPTIONS] SPEC...`), and one
error convention for every command, usage mistakes included: one line `error: ...` on stderr, exit code 2.
"""

from __future__ import annotations

import signal
import sys
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Annotated, Any

import typer
import yaml
from typer.core import TyperArgument, TyperCommand, TyperGroup, TyperOption

from fasweep.datasets import DATASET_NAMES
from fasweep.errors import UserError
from fasweep.report_options import At, CiMethod, Format, Pairing
from fasweep.rule_options import RULE_NAMES
from fasweep.runs.lease import LeaseLost
from fasweep.torch_env import apply_torch_env

_TYPE_HINTS = {"int": "INTEGER", "float": "FLOAT", "Path": "PATH", "str": "TEXT"}


def _hinted(params: list[Any]) -> list[Any]:
    """Click's value hints on typer's params: none on a flag (`--resume`, not `--resume <bool>`), `[a|b]` on a
    choice, an explicit metavar, else the type's name (TEXT, INTEGER, PATH); an argument's name is its hint."""
    for param in params:
        if isinstance(param, TyperArgument):
            param.display_type_rich = lambda ctx: None  # the name column shows SPEC already
        elif isinstance(param, TyperOption) and param.metavar is None:
            if param.is_flag or param.count:  # --help too (click's own option)
                param.metavar = ""
            elif choices := param.type_descriptor.choices:
                param.metavar = f"[{'|'.join(map(str, choices))}]"
            else:
                param.metavar = _TYPE_HINTS.get(param.bare_type().removeprefix("list[").rstrip("]"), "VALUE")
    return params


class Command(TyperCommand):
    """A typer command with click's usage line (`SPEC...`, `[SWEEP]`) and value hints (`_hinted`)."""

    def get_params(self, ctx: Any) -> list[Any]:
        return _hinted(super().get_params(ctx))

    def collect_usage_pieces(self, ctx: Any) -> list[str]:
        pieces = [self.options_metavar] if self.options_metavar else []
        for param in self.get_params(ctx):
            if isinstance(param, TyperArgument):
                name = param.metavar or str(param.name).upper() + ("..." if param.nargs != 1 else "")
                pieces.append(name if param.required else f"[{name}]")
        return pieces


class Group(TyperGroup):
    """The `fasweep` group: its options hinted like a command's."""

    def get_params(self, ctx: Any) -> list[Any]:
        return _hinted(super().get_params(ctx))


app = typer.Typer(
    cls=Group,
    add_completion=False,
    context_settings={"help_option_names": ["-h", "--help"]},
    rich_markup_mode="markdown",  # docstrings' wrapped lines join into paragraphs
)


def _print_version(value: bool) -> None:
    if value:
        try:
            typer.echo(f"fasweep {version('fasweep')}")
        except PackageNotFoundError:  # a source tree on PYTHONPATH, never installed
            typer.echo("fasweep (not installed: pip install -e .)")
        raise typer.Exit()


@app.callback(invoke_without_command=True)
def _root(
    ctx: typer.Context,
    _version: Annotated[
        bool, typer.Option("--version", callback=_print_version, is_eager=True, help="print the version and exit")
    ] = False,
) -> None:
    """Sweeps for asymmetric backpropagation (feedback alignment) on Ray, tracked in MLflow.

    Start with `fasweep validate sweeps/quickstart.yaml`; `fasweep COMMAND -h` explains a command."""
    if ctx.invoked_subcommand is None:  # bare `fasweep`: the help, exit 0
        typer.echo(ctx.get_help())
        raise typer.Exit()


SetOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--set", metavar="PATH=VALUE", help="override a spec field, repeatable: --set base.train.epochs=1 (YAML value)"
    ),
]
TrialSetOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--set", metavar="PATH=VALUE", help="override a trial field, repeatable: --set train.epochs=1 (YAML value)"
    ),
]
CodeOpt = Annotated[
    list[Path] | None,
    typer.Option(
        "--code",
        metavar="DIR",
        help="your package's folder: imported here, shipped to the Ray workers (the spec's code:)",
    ),
]
INTERRUPTED = 128 + signal.SIGINT  # the exit code of a command stopped by Ctrl+C
TAKEN_OVER = 3  # the exit code of a launch whose lease another driver took over (--force)

TrackingOpt = Annotated[
    str | None,
    typer.Option(
        "--tracking-uri", metavar="URI", help="MLflow store; default $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db"
    ),
]
SweepArg = Annotated[str | None, typer.Argument(metavar="SWEEP", help="a sweep's name (fasweep status lists them)")]
SpecArg = Annotated[Path, typer.Argument(metavar="SPEC", help="a sweep spec YAML file, e.g. sweeps/quickstart.yaml")]


def parse_sets(items: list[str] | None) -> dict[str, Any]:
    """Turn ['a.b=1', 'seeds=[0,1]'] into {'a.b': 1, 'seeds': [0, 1]} (values read as YAML, as safely as a spec)."""
    from fasweep.spec.reading import read_value

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


@app.command(cls=Command)
def train(
    config: Annotated[Path | None, typer.Option("--config", metavar="FILE", help="a TrialConfig YAML file")] = None,
    model: Annotated[
        str | None, typer.Option(metavar="ARCH", help="preset (DSR1, PG0, ...; fasweep models) or layer string")
    ] = None,
    dataset: Annotated[
        str | None,
        typer.Option(metavar="NAME", help=f"data set (data.name): {', '.join(DATASET_NAMES)}, or module:function"),
    ] = None,
    epochs: Annotated[int | None, typer.Option(min=1, help="number of epochs")] = None,
    feedback: Annotated[
        str | None,
        typer.Option(
            metavar="RULE",
            help=f"rule of the layers without a mark (feedback.mode): {', '.join(RULE_NAMES)}, or module:Class",
        ),
    ] = None,
    out: Annotated[
        Path | None, typer.Option(metavar="DIR", help="folder for metrics.jsonl and checkpoints (epoch-N/)")
    ] = None,
    set_: TrialSetOpt = None,
) -> None:
    """Run one trial locally (no Ray) with a progress bar and print the final metrics."""
    import json

    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
    from rich.table import Table

    from fasweep.config import set_path, validate_trial
    from fasweep.models import feedback_fields, feedback_read, layer_rules, layers_of, unread
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
    feedback_set = {f: f"{config}: feedback.{f}" for f in feedback_fields("feedback", data.get("feedback"))}
    flags = {"model.arch": model, "data.name": dataset, "train.epochs": epochs, "feedback.mode": feedback}
    named = {"feedback.mode": "--feedback"}
    for path, value in [*((k, v) for k, v in flags.items() if v is not None), *parse_sets(set_).items()]:
        data = set_path(data, path, value)
        feedback_set |= dict.fromkeys(feedback_fields(path, value), named.get(path, f"--set {path}"))
    trial = validate_trial(data, where=str(config) if config is not None else "")
    layers_of(trial.model.arch)  # a bad layer string or model fails before the progress bar
    rules = layer_rules(trial.model.arch, trial.feedback.model_dump(), trial.model.rules)
    for field, where in feedback_set.items():  # a feedback setting no layer reads would change nothing
        if field not in feedback_read(rules):
            raise UserError.field(
                where, getattr(trial.feedback, field), unread(field, rules, f" of {trial.model.arch}")
            )
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


@app.command(cls=Command)
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


@app.command(cls=Command)
def validate(
    specs: Annotated[list[Path], typer.Argument(metavar="SPEC...", help="sweep spec YAML files, e.g. sweeps/*.yaml")],
    set_: SetOpt = None,
    code: CodeOpt = None,
) -> None:
    """Validate sweep specs; print one line per spec (exit code 2 when any is bad)."""
    from fasweep.spec.plan import load_spec

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


@app.command(cls=Command)
def plan(spec: SpecArg, set_: SetOpt = None, code: CodeOpt = None) -> None:
    """Print the trial table of a spec: condition, overrides, seed, resources, and counts."""
    from rich.console import Console
    from rich.table import Table

    from fasweep.spec.checks import format_value
    from fasweep.spec.plan import load_spec

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


@app.command(cls=Command)
def launch(
    spec: SpecArg,
    address: Annotated[
        str | None,
        typer.Option(metavar="HOST:PORT", help="Ray cluster address (auto: the local node's); default: a local Ray"),
    ] = None,
    tracking_uri: TrackingOpt = None,
    resume: Annotated[bool, typer.Option("--resume", help="continue the latest launch of this spec")] = False,
    force: Annotated[
        bool, typer.Option("--force", help="take the sweep's lease from a running launch whose driver is gone")
    ] = False,
    set_: SetOpt = None,
    num_cpus: Annotated[int | None, typer.Option(min=1, help="CPUs of a local Ray (default: all cores)")] = None,
    code: CodeOpt = None,
) -> None:
    """Run a sweep on Ray and track it in MLflow (exit 0 finished, 1 failed trials, 2 bad input or environment,
    3 its lease taken over by another driver, 128 + the signal when interrupted: 130 SIGINT, 143 SIGTERM, 129
    SIGHUP)."""
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
    if result.report:
        typer.echo(f"report: {result.report}")
    uri = result.tracking_uri
    command = f"its pages in the MLflow UI: fasweep ui {result.sweep} --tracking-uri {uri}"
    if uri.startswith(("http://", "https://")):  # the server's UI: the launch's pages
        from mlflow.exceptions import MlflowException

        try:
            command = "\n".join(launch_pages(uri, uri.rstrip("/"), result.sweep, result.launch_id))
        except (MlflowException, OSError) as exc:  # the sweep ran; its links are a convenience
            command += f" (its saved view not written: {type(exc).__name__})"
    typer.echo(command)
    if result.status == "interrupted":
        typer.echo(f"continue with: fasweep launch {spec} --resume (same --set values)")
        raise SystemExit(128 + (result.signal or signal.SIGINT))
    if result.status != "finished":
        if result.retry_helps:
            typer.echo(f"retry the failed trials with: fasweep launch {spec} --resume (same --set values)")
        else:
            typer.echo("fix what the errors above say and launch again (a --resume would fail the same way)")
        raise SystemExit(1)


@app.command(cls=Command)
def status(sweep: SweepArg = None, tracking_uri: TrackingOpt = None) -> None:
    """Show sweeps (launches, trial counts by status, best so far) and, given SWEEP, its latest launch's trials."""
    from rich.console import Console
    from rich.table import Table

    from fasweep.runs.layout import Tag
    from fasweep.runs.reader import find_launches, unknown_sweep
    from fasweep.runs.status import sweep_summaries
    from fasweep.runs.store import check_reachable, client, resolve_tracking_uri

    uri = resolve_tracking_uri(tracking_uri)
    check_reachable(uri)
    if sweep and not find_launches(client(uri), sweep):
        raise unknown_sweep(uri, sweep, find_launches(client(uri)))
    launches = sweep_summaries(uri, sweep)
    console = Console(width=None if sys.stdout.isatty() else 160)
    if not launches:
        console.print(f"no sweeps in {uri} yet: fasweep launch SPEC starts one")
        return
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


@app.command(cls=Command)
def ui(
    sweep: SweepArg = None,
    tracking_uri: TrackingOpt = None,
    host: Annotated[
        str, typer.Option(metavar="HOST", help="interface to serve on; 0.0.0.0 opens it to the network")
    ] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=1, max=65535, help="port to serve on")] = 5000,
    workers: Annotated[int, typer.Option(min=1, help="server processes (1 suits a laptop)")] = 1,
) -> None:
    """Serve the MLflow UI on the tracking store and, once it answers, print the pages of SWEEP's latest launch in
    MLflow's training view: its runs (parent and conditions, best first, charts), the parent run, its report and
    MLflow's Compare page of the conditions. Ctrl+C stops it."""
    import subprocess

    from fasweep.runs.links import home
    from fasweep.runs.store import check_reachable, resolve_tracking_uri

    uri = resolve_tracking_uri(tracking_uri)
    check_reachable(uri)
    if uri.startswith(("http://", "https://")):  # a tracking server already serves the UI
        typer.echo("\n".join(launch_pages(uri, uri.rstrip("/"), sweep) if sweep else [home(uri.rstrip("/"))]))
        return
    local = "127.0.0.1" if host in ("0.0.0.0", "::") else host
    base = f"http://{'[' + local + ']' if ':' in local else local}:{port}"
    pages = launch_pages(uri, base, sweep) if sweep else []  # an unknown sweep fails before the server starts
    argv = [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", uri, "--host", host, "--port", str(port)]
    server = subprocess.Popen([*argv, "--workers", str(workers)])
    signal.signal(signal.SIGTERM, _interrupt)  # a kill stops the server too
    try:
        _wait_for_health(server, base)
        typer.echo(f"MLflow UI for {uri}: {home(base)} (Ctrl+C stops it)")
        typer.echo("\n".join(pages))
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


def launch_pages(uri: str, base: str, sweep: str, launch_id: str = "") -> list[str]:
    """The lines naming a launch's pages in the MLflow UI at `base` (the latest launch of `sweep`, or `launch_id`),
    its saved view written first (`fasweep.runs.links`); an unknown sweep is a UserError naming the sweeps there."""
    from fasweep.runs.links import publish_links
    from fasweep.runs.reader import find_launches, unknown_sweep
    from fasweep.runs.store import client

    mlflow = client(uri)
    launches = [launch for launch in find_launches(mlflow, sweep) if not launch_id or launch.launch_id == launch_id]
    if not launches:
        raise unknown_sweep(uri, sweep, find_launches(mlflow))
    launch = launches[0]
    head = f"{sweep} @ {launch.launch_id} in the MLflow UI:"
    return [head, *publish_links(mlflow, base, launch).lines(launch.best.metric)]


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


@app.command(cls=Command)
def report(
    target: Annotated[str, typer.Argument(metavar="SWEEP|SPEC", help="a sweep's name or its spec file")],
    tracking_uri: TrackingOpt = None,
    format: Annotated[Format, typer.Option(help="what is printed")] = "md",
    out: Annotated[Path | None, typer.Option(metavar="DIR", help="directory for tables, plots and report.html")] = None,
    metric: Annotated[str, typer.Option(metavar="METRIC", help="a logged metric")] = "test_acc",
    at: Annotated[
        At, typer.Option(help="each trial's final epoch, or its best (on validation data where held out)")
    ] = "final",
    by: Annotated[
        list[str] | None,
        typer.Option(metavar="AXIS", help="pivot on a param, repeatable: --by feedback.concordance (or concordance)"),
    ] = None,
    launch: Annotated[str, typer.Option(metavar="ID", help="latest, all (pooled) or a launch id")] = "latest",
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
            metavar="CONDITION",
            help="compare every condition with this one, an ad-hoc family (spec: compare_to, compare, contrasts)",
        ),
    ] = None,
    pairing: Annotated[
        Pairing | None, typer.Option(help="seed (paired t on shared seeds) or none (Welch); spec: pairing")
    ] = None,
    ci: Annotated[CiMethod, typer.Option(help="95% intervals: t (Student) or bootstrap (n >= 10 seeds)")] = "t",
    margin: Annotated[
        float | None,
        typer.Option(metavar="FLOAT", help="equivalence margin (TOST) in the metric's units; spec: equivalence_margin"),
    ] = None,
    set_: SetOpt = None,
) -> None:
    """Tables and plots of a sweep's runs: 95% intervals, comparisons with a baseline, reference numbers beside.

    With a spec file, `--set` applies the launch's overrides to it, so its plan (contrasts, references) is the one
    that ran."""
    from fasweep.report import make_report, render
    from fasweep.runs.store import resolve_tracking_uri

    uri = resolve_tracking_uri(tracking_uri)
    options = {"metric": metric, "at": at, "by": by, "launch": launch, "out": out, "log": log, "ci": ci}
    options |= {"baseline": baseline, "pairing": pairing, "margin": margin, "sets": parse_sets(set_)}
    result = make_report(target, tracking_uri=uri, plots=format == "html", **options)
    typer.echo(render(result, format))
    if out is not None:
        typer.echo(f"wrote {len(result.files)} files to {out} (open {out / 'report.html'})", err=True)
    if result.logged:
        typer.echo(result.logged, err=True)


def usage_error(exc: Exception) -> str:
    """A click usage error as one line in the house format: a refused value as `--at: got 'worst'; expected 'final'
    or 'best'` (typer checks values with Pydantic), anything else as click says it, with where help is."""
    ctx, param, cause = getattr(exc, "ctx", None), getattr(exc, "param", None), exc.__cause__
    errors = getattr(cause, "errors", None)
    if param is not None and callable(errors) and errors():
        from fasweep.config import brief, describe, suggest

        name = max(param.opts, key=len) if isinstance(param, TyperOption) else str(param.metavar or param.name)
        choices = [str(c) for c in param.type_descriptor.choices or ()]
        value = errors()[0].get("input")
        if choices and isinstance(value, str):
            listed = f"{', '.join(choices[:-1])} or {choices[-1]}" if len(choices) > 1 else choices[0]
            return f"{name}: got {brief(value)}; expected {listed}{suggest(value, choices)}"
        return f"{name}: {describe(errors()[0])}"
    message = exc.format_message() if hasattr(exc, "format_message") else str(exc)
    message = message[:1].lower() + message[1:].rstrip(".")
    if ctx is not None and message.startswith("no such command"):
        return f"{message}; expected one of {', '.join(ctx.command.list_commands(ctx))} (fasweep -h)"
    return f"{message} ({ctx.command_path} -h)" if ctx is not None else message


def main(argv: list[str] | None = None) -> None:
    """Console entry point: run the app; a UserError or a usage error becomes one line `error: ...` on stderr and
    exit code 2."""
    apply_torch_env()  # before any command loads torch
    try:
        rc = app(args=argv, prog_name="fasweep", standalone_mode=False)  # returns typer.Exit's code
    except UserError as exc:
        typer.echo(f"error: {exc}", err=True)
        sys.exit(2)
    except LeaseLost as exc:
        typer.echo(f"taken over: {exc}", err=True)
        sys.exit(TAKEN_OVER)
    except (typer.Abort, KeyboardInterrupt):
        typer.echo("interrupted", err=True)
        sys.exit(INTERRUPTED)
    except typer.TyperException as exc:  # click's usage errors (vendored by typer): an unknown option, a bad value
        typer.echo(f"error: {usage_error(exc)}", err=True)
        sys.exit(2)
    if rc == INTERRUPTED:  # typer turns a KeyboardInterrupt inside a command into a silent Exit(130)
        typer.echo("interrupted", err=True)
    if isinstance(rc, int) and rc:
        sys.exit(rc)
