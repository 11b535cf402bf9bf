"""The `fasweep` command line: thin typer commands over the modules; user errors print as one line."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Any

import typer
import yaml

from fasweep.errors import UserError

app = typer.Typer(add_completion=False, no_args_is_help=True, help=__doc__)

SetOpt = Annotated[
    list[str] | None,
    typer.Option("--set", help="override a field: --set train.epochs=1 (value parsed as YAML)"),
]
TrackingOpt = Annotated[
    str | None,
    typer.Option("--tracking-uri", help="MLflow store; default $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db"),
]


def parse_sets(items: list[str] | None) -> dict[str, Any]:
    """Turn ['a.b=1', 'seeds=[0,1]'] into {'a.b': 1, 'seeds': [0, 1]} (values read as safe YAML)."""
    out: dict[str, Any] = {}
    for item in items or []:
        path, sep, raw = item.partition("=")
        if not sep or not path.strip():
            raise UserError.field("--set", item, "PATH=VALUE, e.g. --set train.epochs=1")
        try:
            out[path.strip()] = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError as exc:
            raise UserError.field(f"--set {path}", raw, f"a YAML value ({exc.__class__.__name__})") from None
    return out


# --- single trial (fasweep.train / fasweep.models) -------------------------------------------


@app.command()
def train(
    config: Annotated[Path | None, typer.Option("--config", help="a TrialConfig YAML file")] = None,
    model: Annotated[str | None, typer.Option(help="preset (DSR1, PG0, ...) or layer string")] = None,
    dataset: Annotated[str | None, typer.Option(help="cifar10, fashion_mnist, digits, ...")] = None,
    epochs: Annotated[int | None, typer.Option(help="number of epochs")] = None,
    feedback: Annotated[str | None, typer.Option(help="default rule: bp, random, random_updated, ...")] = None,
    out: Annotated[Path | None, typer.Option(help="directory for checkpoints and metrics.jsonl")] = None,
    set_: SetOpt = None,
) -> None:
    """Run one trial locally (no Ray) with a progress bar and print the final metrics."""
    raise UserError("fasweep train: not implemented yet")


@app.command()
def models() -> None:
    """List the presets with their layer strings and parameter counts."""
    raise UserError("fasweep models: not implemented yet")


# --- sweeps (fasweep.spec / fasweep.launch) -----------------------------------------------------


@app.command()
def validate(specs: list[Path], set_: SetOpt = None) -> None:
    """Validate sweep specs; print one line per spec."""
    raise UserError("fasweep validate: not implemented yet")


@app.command()
def plan(spec: Path, set_: SetOpt = None) -> None:
    """Print the trial table of a spec: condition, overrides, seed, resources, and counts."""
    raise UserError("fasweep plan: not implemented yet")


@app.command()
def launch(
    spec: Path,
    address: Annotated[str | None, typer.Option(help="Ray cluster address; default: a local Ray")] = None,
    tracking_uri: TrackingOpt = None,
    resume: Annotated[bool, typer.Option("--resume", help="continue the latest launch of this spec")] = False,
    set_: SetOpt = None,
) -> None:
    """Run a sweep on Ray and track it in MLflow."""
    raise UserError("fasweep launch: not implemented yet")


@app.command()
def status(sweep: Annotated[str | None, typer.Argument()] = None, tracking_uri: TrackingOpt = None) -> None:
    """Show sweeps and their trials' states from MLflow."""
    raise UserError("fasweep status: not implemented yet")


@app.command()
def ui(tracking_uri: TrackingOpt = None, port: int = 5000) -> None:
    """Start the MLflow UI on the configured tracking store."""
    raise UserError("fasweep ui: not implemented yet")


# --- analysis (fasweep.report) -------------------------------------------------------------------


@app.command()
def report(
    target: Annotated[str, typer.Argument(help="sweep name or spec file")],
    tracking_uri: TrackingOpt = None,
    format: Annotated[str, typer.Option(help="md, csv, html or json")] = "md",
    out: Annotated[Path | None, typer.Option(help="directory for tables, plots and report.html")] = None,
    metric: str = "test_acc",
    at: Annotated[str, typer.Option(help="final or best")] = "final",
    by: Annotated[list[str] | None, typer.Option(help="pivot axes, e.g. --by feedback.concordance")] = None,
) -> None:
    """Tables and plots of a sweep's runs, with reference numbers beside them."""
    raise UserError("fasweep report: not implemented yet")


def main(argv: list[str] | None = None) -> None:
    """Console entry point: run the app; a UserError becomes one line on stderr and exit code 2."""
    try:
        app(args=argv, standalone_mode=False)
    except UserError as exc:
        typer.echo(f"error: {exc}", err=True)
        sys.exit(2)
    except typer.Abort:
        typer.echo("aborted", err=True)
        sys.exit(130)
    except typer.Exit as exc:
        sys.exit(exc.exit_code)
    except Exception as exc:  # click usage errors arrive here in non-standalone mode
        import click

        if isinstance(exc, click.ClickException):
            exc.show()
            sys.exit(2)
        raise
