"""fasweep.report: turn a sweep's MLflow runs into tables, plots and one self-contained report.html.

`collect` reads the runs, `summary` summarizes them over seeds (`stats`: the statistics), `tables` lays out the
per-condition, loss and pivot tables, `comparisons` the comparisons of conditions (declared contrasts, --baseline),
`render` shows them as md/csv/json/html, `plots` draws the figures; this module ties them together (`make_report`)
and writes/logs the files.
"""

from __future__ import annotations

import base64
import html
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mlflow import MlflowClient

from fasweep.errors import UserError
from fasweep.report.collect import Sweep, Trial, fetch_histories, load_sweep
from fasweep.report.comparisons import contrast_table
from fasweep.report.plots import angle_curves, angle_keys, learning_curves, metric_vs_axis
from fasweep.report.render import Table, render_csv, render_html, render_json, render_md
from fasweep.report.stats import BOOTSTRAP_MIN_N
from fasweep.report.summary import group_by, is_number, reference_epochs, summarize, summarize_conditions
from fasweep.report.tables import condition_table, loss_table, pivot_table, resolve_axes
from fasweep.report_options import AT, CI_METHODS, FORMATS, PAIRINGS
from fasweep.runs.layout import REPORT_ARTIFACT_DIR, LaunchStatus, condition_label, selection_metric
from fasweep.spec.plan import Plan, load_spec

__all__ = ["Report", "Sweep", "Table", "make_report", "render"]

CSS = (
    "body{font-family:sans-serif;margin:2em;max-width:1200px}table{border-collapse:collapse;margin:1em 0}"
    "td,th{border:1px solid #bbb;padding:3px 8px;text-align:right}td:first-child{text-align:left}"
    "th{background:#eee}.note{color:#555;font-size:90%;margin:2px 0}img{max-width:100%;margin:1em 0}"
)


@dataclass
class Report:
    """A finished report: the sweep read, its tables, and the files written (plots, md/csv/json/html)."""

    sweep: Sweep
    metric: str
    at: str
    ci: str
    tables: list[Table]
    images: dict[str, bytes] = field(default_factory=dict)  # plot file name -> PNG bytes
    captions: dict[str, str] = field(default_factory=dict)  # plot file name -> what its lines, bands, panels are
    files: list[Path] = field(default_factory=list)  # written under `out`
    logged: str = ""  # where the report went in MLflow, or why it could not be logged


def render(report: Report, fmt: str) -> str:
    """The report's tables in one format: md, csv, json, or a self-contained html page (plots embedded)."""
    if fmt == "md":
        return render_md(report.tables) + _md_figures(report)
    if fmt == "csv":
        return render_csv(report.tables)
    if fmt == "json":
        meta = {"sweep": report.sweep.name, "launches": report.sweep.launches, "metric": report.metric}
        plots = {"plots": list(report.images), "captions": report.captions}
        return render_json(report.tables, **meta, at=report.at, ci=report.ci, **plots)
    if fmt == "html":
        return _html_page(report)
    raise UserError.field("--format", fmt, " | ".join(FORMATS))


def _md_figures(report: Report) -> str:
    """The plots, linked by file name (they lie beside report.md), each with its caption."""
    return "".join(
        f"### {name.removesuffix('.png')}\n\n![{name}]({name})\n\n{report.captions.get(name, '')}\n\n"
        for name in report.images
    )


def _html_page(report: Report) -> str:
    sweep = report.sweep
    images = "".join(
        f"<h2>{html.escape(name.removesuffix('.png'))}</h2><figure><img alt='{html.escape(name)}' "
        f"src='data:image/png;base64,{base64.b64encode(data).decode()}'>"
        f"<figcaption class='note'>{html.escape(report.captions.get(name, ''))}</figcaption></figure>"
        for name, data in report.images.items()
    )
    tables = "".join(render_html(t) for t in report.tables)
    title = html.escape(f"fasweep report: {sweep.name}")
    meta = html.escape(f"launch(es) {', '.join(sweep.launches)} · {len(sweep.trials)} trials · {sweep.tracking_uri}")
    return (
        f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{title}</title><style>{CSS}</style></head>"
        f"<body><h1>{title}</h1><p class='note'>{meta}</p>{tables}{images}</body></html>\n"
    )


def resolve_target(target: str, sets: dict[str, Any] | None = None) -> tuple[str, Plan | None]:
    """A sweep name as is, or a spec file (with `sets`, the launch's `--set` overrides) -> (its sweep name, its
    plan: reference numbers, declared comparisons and plan order)."""
    path = Path(target)
    if path.suffix in (".yaml", ".yml") or path.is_file():
        plan = load_spec(path, sets)
        return plan.spec.name, plan
    if sets:
        raise UserError.field("--set", sorted(sets), "a spec file as the target (a sweep name's spec is as logged)")
    return target, None


def _plot_axes(sweep: Sweep, by: list[str]) -> tuple[str | None, str | None]:
    """x and line axes of the metric-vs-axis plot: the `--by` axes, else the sweep's varied axes."""
    varied = [a for a in by or sweep.axes if len({t.params.get(a) for t in sweep.trials} - {None}) > 1]
    if not by:  # prefer a numeric x axis (concordance, lr) over a categorical one
        varied.sort(key=lambda a: not all(is_number(t.params.get(a, "")) for t in sweep.trials))
    return (varied[0] if varied else None), (varied[1] if len(varied) > 1 else None)


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text)


def make_report(
    target: str,
    *,
    tracking_uri: str,
    metric: str = "test_acc",
    at: str = "final",
    by: list[str] | None = None,
    launch: str = "latest",
    out: Path | None = None,
    log: bool | None = None,
    plots: bool = False,
    ci: str = "t",
    baseline: str | None = None,
    pairing: str | None = None,
    margin: float | None = None,
    sets: dict[str, Any] | None = None,
    figures: bool = True,
) -> Report:
    """Read the sweep and build its tables; draw the plots when `out`, `log` or `plots` asks for them; write
    the files to `out`; log them as artifacts on the (latest selected) parent run when `log`.

    `log=None` logs only the launch's main report (every option that changes the tables at its default) as
    `report/`; an ad-hoc report goes to `out` only, unless `log=True` logs it as `report-<its options>/`. While the
    launch is still running (its driver holds the lease) no report is its main one: it logs that itself when it
    ends, and `log=True` logs a partial one as `report[-<its options>]-running/`.
    `ci`: t or bootstrap intervals (bootstrap refused below BOOTSTRAP_MIN_N seeds); `baseline` replaces the spec's
    declared comparisons with an ad-hoc family, `pairing` overrides the spec's; `margin` the spec's
    `equivalence_margin` (TOST). `figures=False` writes and logs the tables alone (a launch's own report: the
    plots of hundreds of conditions take minutes).
    """
    if at not in AT:
        raise UserError.field("--at", at, " or ".join(AT))
    if ci not in CI_METHODS:
        raise UserError.field("--ci", ci, " or ".join(CI_METHODS))
    if pairing is not None and pairing not in PAIRINGS:
        raise UserError.field("--pairing", pairing, " or ".join(PAIRINGS))
    if margin is not None and not margin > 0:
        raise UserError.field("--margin", margin, "a positive number in the metric's units, e.g. 0.01")
    by = list(by or [])
    if by and baseline:
        raise UserError.field("--baseline", baseline, "no --by: comparisons are made in the per-condition table")
    name, plan = resolve_target(target, sets)
    sweep = load_sweep(tracking_uri, name, launch=launch, plan=plan)
    if not sweep.trials:
        raise UserError(f"sweep {name!r} launch {', '.join(sweep.launches)}: no trial runs logged yet")
    if metric not in sweep.metrics:
        raise UserError.field("--metric", metric, f"a logged metric: {', '.join(sweep.metrics)}")
    by = resolve_axes(sweep, by)
    options = _table_options(metric, at, by, launch, ci, baseline, pairing, margin)
    adhoc = [(k, v) for k, v, default in options if v != default]
    log = not adhoc and not sweep.running if log is None else log
    partial = [str(LaunchStatus.RUNNING)] if sweep.running else []  # a running launch's: never its main report
    folder_name = "-".join([REPORT_ARTIFACT_DIR, *(_slug(f"{k}_{v}") for k, v in adhoc), *partial])

    draw = out is not None or log or plots
    chooser = selection_metric(metric, True)  # the validation metric that chooses best epochs, where logged
    keys = [metric, chooser, "train_loss", *angle_keys(sweep)] if draw and figures else [metric, chooser]
    fetch_histories(tracking_uri, sweep.trials, keys)
    if ci == "bootstrap":
        _check_bootstrap(sweep, metric, at, by)
    margin = margin if margin is not None else (sweep.spec.equivalence_margin if sweep.spec else None)
    if by:
        tables = [pivot_table(sweep, metric, at, by, ci)]
    else:  # the seed report's layout first where the loss is an axis, then one row per condition
        side_by_side = loss_table(sweep, metric, at, ci)
        conditions = summarize_conditions(sweep, metric, at, ci)  # both tables' statistics, computed once
        per_condition = condition_table(sweep, conditions, baseline=baseline, pairing=pairing, margin=margin)
        declared = None if baseline else contrast_table(sweep, conditions, pairing=pairing, margin=margin)
        tables = ([side_by_side] if side_by_side else []) + [per_condition] + ([declared] if declared else [])
    report = Report(sweep, metric, at, ci, tables)
    if draw:
        with tempfile.TemporaryDirectory() as tmp:
            folder = out or Path(tmp)
            _write(report, folder, by, figures)
            if log:
                report.logged = _log(tracking_uri, sweep.parent_ids[0], folder, folder_name)
            if out is None:
                report.files = []
    if not log and sweep.running:
        report.logged = (
            f"not logged on the parent run: launch {sweep.running[0]} is still running and logs its main report when "
            f"it ends; --log logs this one as {folder_name}/"
        )
    elif not log and adhoc:
        flags = " ".join(f"--{k} {v}" for k, v in adhoc)
        report.logged = f"not logged on the parent run: an ad-hoc report ({flags}); --log logs it as {folder_name}/"
    return report


def _check_bootstrap(sweep: Sweep, metric: str, at: str, by: list[str]) -> None:
    """`--ci bootstrap` only where every group (condition, or `--by` cell) has BOOTSTRAP_MIN_N seeds or more, at
    `at` and at every epoch a reference is given for."""

    def key(t: Trial) -> str:
        return condition_label(t.stage, ",".join(f"{a}={t.params.get(a)}" for a in by)) if by else t.label

    epochs: list[str | int] = [at, *([] if by else reference_epochs(sweep, metric))]
    for name, group in group_by(sweep.trials, key).items():
        n = min(summarize(group, metric, when).n for when in epochs)
        if n < BOOTSTRAP_MIN_N:
            raise UserError.field(
                "--ci",
                "bootstrap",
                f"t: {name} has n = {n} < {BOOTSTRAP_MIN_N} seeds, where a percentile bootstrap interval lies "
                "within the seeds' range and covers far less than 95% (at n = 3 at most 75%)",
            )


def _table_options(
    metric: str,
    at: str,
    by: list[str],
    launch: str,
    ci: str,
    baseline: str | None,
    pairing: str | None,
    margin: float | None,
) -> list[tuple[str, object, object]]:
    """(option, value, the main report's value) of every option that changes a report's tables."""
    return [
        ("metric", metric, "test_acc"),
        ("at", at, "final"),
        ("by", ",".join(by), ""),
        ("launch", "all" if launch == "all" else "", ""),
        ("ci", ci, "t"),
        ("baseline", baseline, None),
        ("pairing", pairing, None),
        ("margin", margin, None),
    ]


def _log(tracking_uri: str, parent_id: str, folder: Path, name: str) -> str:
    """Log the folder as `name/` on the parent run; a failure only costs the artifacts (the message says why)."""
    try:
        MlflowClient(tracking_uri).log_artifacts(parent_id, str(folder), name)
    except Exception as exc:  # e.g. a read-only artifact store: the report itself is still printed and written
        return f"could not log the report on parent run {parent_id}: {type(exc).__name__}: {exc}".splitlines()[0]
    return f"logged as artifacts {name}/ on parent run {parent_id}"


def _write(report: Report, folder: Path, by: list[str], figures: bool = True) -> None:
    """Plots (unless not `figures`) and the four renderings into `folder`."""
    folder.mkdir(parents=True, exist_ok=True)
    sweep, metric, at = report.sweep, report.metric, report.at
    x_axis, line_axis = _plot_axes(sweep, by)
    plots = [learning_curves(sweep, metric)] if figures else []
    if figures and (angles := angle_keys(sweep)):
        plots.append(angle_curves(sweep, angles))
    if figures and x_axis:
        plots.append(metric_vs_axis(sweep, metric, at, x_axis, line_axis))
    paths = [p.save(folder) for p in plots]
    report.images = {p.name: p.read_bytes() for p in paths}
    report.captions = {p.name: p.caption for p in plots}
    report.files = list(paths)
    for fmt in FORMATS:
        path = folder / f"report.{fmt}"
        path.write_text(render(report, fmt))
        report.files.append(path)
