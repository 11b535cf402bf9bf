"""Tables of a sweep: per-condition statistics over seeds, reference deltas, pivots by axes; md/csv/json/html."""

from __future__ import annotations

import csv
import html
import io
import json
import math
import statistics
from collections import defaultdict
from collections.abc import Callable, Hashable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from fasweep.errors import UserError
from fasweep.report.collect import DIVERGED, FAILED, RUNNING, STOPPED, Sweep, Trial, finite, label

LOSS_AXIS = "train.loss"
PARTIAL_MARK = "*"


def lower_is_better(metric: str) -> bool:
    """Losses, angles and times are minimised; everything else (accuracies) is maximised."""
    return any(word in metric for word in ("loss", "angle", "time"))


def trial_value(trial: Trial, metric: str, at: str | int) -> float | None:
    """A trial's metric at its final (latest) epoch, its best value, or at epoch `at` (an int: step `at` of the
    history); None if never logged (or the trial has not reached that epoch)."""
    if isinstance(at, int):
        return dict(trial.histories.get(metric, [])).get(at)
    hist = [v for _, v in trial.histories.get(metric, []) if at == "final" or math.isfinite(v)]
    if not hist:
        return None
    if at == "final":
        return hist[-1]
    return min(hist) if lower_is_better(metric) else max(hist)


@dataclass
class Stats:
    """One group of trials (a condition, or a pivot cell): the metric over seeds and the group's bookkeeping."""

    values: list[float]
    runs: int
    diverged: int
    partial: int
    errors: int
    final_epoch: int | None
    best_epoch: int | None

    @property
    def n(self) -> int:
        return len(self.values)

    @property
    def mean(self) -> float:
        return statistics.fmean(self.values) if self.values else math.nan

    @property
    def sd(self) -> float:
        """Sample standard deviation (n − 1); NaN for a single seed."""
        return statistics.stdev(self.values) if len(self.values) > 1 else math.nan


def summarize(trials: list[Trial], metric: str, at: str | int) -> Stats:
    """Statistics of `metric` over the trials (seeds) at `at` (final, best or an epoch); best epoch = where the
    seed-mean curve is best. At a given epoch a running trial's value is final (not partial)."""
    values = [v for v in (trial_value(t, metric, at) for t in trials) if v is not None]
    by_epoch: dict[int, list[float]] = defaultdict(list)
    for t in trials:
        for epoch, v in t.histories.get(metric, []):
            by_epoch[epoch].append(v)
    curve = {e: statistics.fmean(vs) for e, vs in by_epoch.items() if all(math.isfinite(v) for v in vs)}
    pick = min if lower_is_better(metric) else max
    return Stats(
        values=list(finite(values)),
        runs=len(trials),
        diverged=sum(t.status == DIVERGED for t in trials),
        partial=0 if isinstance(at, int) else sum(t.status == RUNNING for t in trials),
        errors=sum(t.status == FAILED for t in trials),
        final_epoch=max(by_epoch) if by_epoch else None,
        best_epoch=pick(sorted(curve), key=curve.__getitem__) if curve else None,
    )


def fmt(value: float | None, signed: bool = False) -> str:
    """A number as a table shows it: 4 decimals below 10, 2 above; '—' for missing."""
    if value is None or not math.isfinite(value):
        return "—"
    text = f"{value:+.4f}" if abs(value) < 10 else f"{value:+.2f}"
    return text if signed else text.lstrip("+")


def fmt_stats(s: Stats, with_n: bool = False) -> str:
    """`mean ± sd` (sd omitted for one seed), `(n)` on request, `*` when a trial is still running."""
    text = fmt(s.mean) if s.n < 2 else f"{fmt(s.mean)} ± {fmt(s.sd)}"
    if with_n:
        text += f" ({s.n})"
    return text + (PARTIAL_MARK if s.partial else "")


@dataclass
class Table:
    """A table to show (header + string rows) and the same content as records for csv/json."""

    title: str
    header: list[str]
    rows: list[list[str]]
    records: list[dict[str, Any]]
    footnotes: list[str] = field(default_factory=list)


def _number(value: float) -> float | None:
    """NaN becomes None (JSON has no NaN)."""
    return value if math.isfinite(value) else None


def _record(s: Stats, reference: float | None = None, **keys: Any) -> dict[str, Any]:
    return {
        **keys,
        "mean": _number(s.mean),
        "sd": _number(s.sd),
        "n": s.n,
        "runs": s.runs,
        "final_epoch": s.final_epoch,
        "best_epoch": s.best_epoch,
        "diverged": s.diverged,
        "partial": s.partial,
        "errors": s.errors,
        "values": s.values,
        "reference": reference,
        "delta": None if reference is None or s.n == 0 else s.mean - reference,
    }


def group_by(trials: Iterable[Trial], key: Callable[[Trial], Hashable]) -> dict[Any, list[Trial]]:
    """Trials grouped by `key(trial)`, groups in order of first appearance."""
    out: dict[Any, list[Trial]] = defaultdict(list)
    for t in trials:
        out[key(t)].append(t)
    return out


def reference_for(sweep: Sweep, trial: Trial, metric: str) -> float | None:
    """The spec's published number for this trial's condition (`stage/condition` or `condition` key)."""
    for name in (trial.label, trial.condition):
        value = (sweep.reference.get(name) or {}).get(metric)
        if isinstance(value, int | float):
            return float(value)
    return None


def reference_epochs(sweep: Sweep, metric: str) -> list[int]:
    """The epochs N of the spec's `<metric>@<N>` reference keys (numbers published at earlier epochs), sorted."""
    keys = (key.rpartition("@") for refs in sweep.reference.values() for key in refs)
    return sorted({int(n) for name, _, n in keys if name == metric and n.isdigit()})


def _compared(sweep: Sweep, group: list[Trial], metric: str, at: str | int) -> tuple[Stats, dict[str, Any], list[str]]:
    """`metric` of a group at `at` (final, best or epoch N, reference key `<metric>@<N>`) beside the reference:
    its stats, record and cells `mean ± sd (n)`, reference, delta."""
    s = summarize(group, metric, at)
    rec = _record(s, reference_for(sweep, group[0], metric if isinstance(at, str) else f"{metric}@{at}"))
    return s, rec, [fmt_stats(s, with_n=True), fmt(rec["reference"]), fmt(rec["delta"], signed=True)]


def _triple(name: str) -> list[str]:
    """Headers of a measured/reference/delta column triple."""
    return [name, f"reference {name}", f"delta {name}"]


def _at_epochs(sweep: Sweep, group: list[Trial], metric: str, epochs: list[int]) -> tuple[list[str], dict[str, Any]]:
    """The `<metric>@<N>` column triples of a group and their record fields (`<metric>@<N>.mean`, ...)."""
    cells: list[str] = []
    fields: dict[str, Any] = {}
    for epoch in epochs:
        _, rec, triple = _compared(sweep, group, metric, epoch)
        cells += triple
        fields |= {f"{metric}@{epoch}.{k}": rec[k] for k in ("mean", "sd", "n", "values", "reference", "delta")}
    return cells, fields


def _footnotes(sweep: Sweep, metric: str, at: str, epochs: Sequence[int] = ()) -> list[str]:
    trials = sweep.trials
    when = "final (latest)" if at == "final" else "best"
    notes = [f"{metric} at the {when} epoch of each trial; mean ± sd over seeds"]
    if epochs:
        notes.append(
            f"{metric}@N: {metric} at epoch N of the trials that reached it, mean ± sd (n), beside the spec's "
            f"{metric}@N reference; N = {', '.join(map(str, epochs))}"
        )
    running = sum(t.status == RUNNING for t in trials)
    if running:
        notes.append(f"{PARTIAL_MARK} partial: {running} trial(s) still running; their latest epoch is used")
    stopped = sum(t.status == STOPPED for t in trials)
    if stopped:
        notes.append(f"{stopped} trial(s) stopped early by the scheduler; their last epoch is used")
    errors = sum(t.status == FAILED for t in trials)
    if errors:
        notes.append(f"{errors} trial(s) ended with an error; only the epochs they logged count")
    if len(sweep.all_launches) > len(sweep.launches):
        shown = ", ".join(sweep.launches)
        notes.append(f"launch {shown} of {len(sweep.all_launches)} launches; `--launch all` pools them")
    return notes + sweep.notes


def condition_table(sweep: Sweep, metric: str, at: str) -> Table:
    """One row per condition (per stage): mean ± sd over seeds, n, epochs, diverged, reference and delta."""
    groups = group_by(sweep.trials, lambda t: t.label)
    epochs = reference_epochs(sweep, metric)
    header = ["condition", f"{metric} ({at})", "n", "final epoch", "best epoch", "diverged", "reference", "delta"]
    header += [h for e in epochs for h in _triple(f"{metric}@{e}")]
    rows, records = [], []
    for name in sweep.condition_order:
        group = groups[name]
        s, rec, (_, ref, delta) = _compared(sweep, group, metric, at)
        cells, fields = _at_epochs(sweep, group, metric, epochs)
        records.append({"stage": group[0].stage, "condition": group[0].condition, **rec, **fields})
        epoch_cols = [str(s.final_epoch or "—"), str(s.best_epoch or "—")]
        rows.append([name, fmt_stats(s), str(s.n), *epoch_cols, str(s.diverged), ref, delta, *cells])
    notes = _footnotes(sweep, metric, at, epochs)
    return Table(f"{sweep.name}: {metric} per condition", header, rows, records, notes)


def _strip_axis(condition: str, axis: str) -> str:
    """A condition name without its `axis=value` part (`DS0,loss=hinge` -> `DS0`)."""
    names = {axis, axis.rsplit(".", 1)[-1]}
    parts = [p for p in condition.split(",") if p.split("=", 1)[0].strip() not in names]
    return ",".join(parts) or condition


def loss_table(sweep: Sweep, metric: str, at: str) -> Table | None:
    """The seed report's layout (Tables 2/4/6): condition rows, one column block per `train.loss` value.

    None when the loss is not varied or the conditions do not pair up across losses.
    """
    trials = plan_sorted(sweep)
    losses = sort_values(t.params.get(LOSS_AXIS, "") for t in trials)
    if len(losses) < 2:
        return None
    row_of = {t.run_id: (t.stage, _strip_axis(t.condition, LOSS_AXIS)) for t in trials}
    cells = group_by(trials, lambda t: (row_of[t.run_id], t.params.get(LOSS_AXIS, "")))
    if len({t.label for t in trials}) != len(cells):
        return None
    epochs = reference_epochs(sweep, metric)
    names = [[loss] + [f"{loss}@{e}" for e in epochs] for loss in losses]
    header = ["condition"] + [h for per_loss in names for name in per_loss for h in _triple(name)]
    rows, records = [], []
    for stage, name in dict.fromkeys(row_of[t.run_id] for t in trials):
        row = [label(stage, name)]
        for loss in losses:
            group = cells.get(((stage, name), loss))
            if not group:
                row += ["—"] * 3 * (1 + len(epochs))
                continue
            _, rec, triple = _compared(sweep, group, metric, at)
            at_epochs, fields = _at_epochs(sweep, group, metric, epochs)
            records.append(
                {"stage": stage, "condition": group[0].condition, **rec, **fields, "row": name, LOSS_AXIS: loss}
            )
            row += triple + at_epochs
        rows.append(row)
    title = f"{sweep.name}: {metric} by condition and loss (the seed report's layout)"
    return Table(title, header, rows, records, _footnotes(sweep, metric, at, epochs))


def is_number(text: str) -> bool:
    """Whether a param value (a str) reads as a number."""
    try:
        float(text)
    except ValueError:
        return False
    return True


def sort_values(values: Iterable[str]) -> list[str]:
    """Distinct param values: numbers in numeric order, otherwise in order of first appearance (the plan's)."""
    distinct = list(dict.fromkeys(values))
    return sorted(distinct, key=float) if all(is_number(v) for v in distinct) else distinct


def plan_sorted(sweep: Sweep) -> list[Trial]:
    """The trials in the order of `sweep.condition_order` (the plan's), seeds in start order within."""
    rank = {name: i for i, name in enumerate(sweep.condition_order)}
    return sorted(sweep.trials, key=lambda t: rank[t.label])


def check_axes(sweep: Sweep, by: list[str]) -> None:
    """Every `--by` axis must be a param of the sweep's trials."""
    params = {k for t in sweep.trials for k in t.params}
    for axis in by:
        if axis not in params:
            axes = ", ".join(sweep.axes) or "none"
            raise UserError.field("--by", axis, f"a param of the trials, e.g. one of the sweep's axes: {axes}")


def pivot_table(sweep: Sweep, metric: str, at: str, by: list[str]) -> Table:
    """Rows = values of the first axis (per stage), columns = value combinations of the others.

    Each cell is `mean ± sd (n)` over every trial with those param values (seeds and unlisted axes pooled).
    """
    check_axes(sweep, by)
    trials = plan_sorted(sweep)
    stages = list(dict.fromkeys(t.stage for t in trials))
    staged = len(stages) > 1
    order = [{v: i for i, v in enumerate(sort_values(t.params.get(a, "") for t in trials))} for a in by]

    def row_key(t: Trial) -> tuple[int, str]:
        return stages.index(t.stage), t.params.get(by[0], "")

    def col_key(t: Trial) -> tuple[str, ...]:
        return tuple(t.params.get(a, "") for a in by[1:])

    def col_label(col: tuple[str, ...]) -> str:
        return ",".join(f"{a.rsplit('.', 1)[-1]}={v}" for a, v in zip(by[1:], col, strict=True))

    cells = group_by(trials, lambda t: (row_key(t), col_key(t)))
    rows_keys = sorted({r for r, _ in cells}, key=lambda r: (r[0], order[0][r[1]]))
    cols = sorted({c for _, c in cells}, key=lambda c: [rank[v] for rank, v in zip(order[1:], c, strict=True)])
    header = (["stage"] if staged else []) + [by[0]] + [col_label(c) or f"{metric} ({at})" for c in cols]
    rows, records = [], []
    for stage_index, value in rows_keys:
        stage = {"stage": stages[stage_index]} if staged else {}
        row = [*stage.values(), value]
        for c in cols:
            group = cells.get(((stage_index, value), c))
            if not group:
                row.append("—")
                continue
            s = summarize(group, metric, at)
            row.append(fmt_stats(s, with_n=True))
            records.append(_record(s, **stage, **{a: group[0].params.get(a) for a in by}))
        rows.append(row)
    notes = _footnotes(sweep, metric, at)
    notes.insert(1, "cells: mean ± sd (n) over all trials with these values (seeds and other axes pooled)")
    return Table(f"{sweep.name}: {metric} by {' × '.join(by)}", header, rows, records, notes)


def _md_escape(note: str) -> str:
    """A footnote starting with `*` would render as a bullet: escape it."""
    return "\\" + note if note.startswith(PARTIAL_MARK) else note


def render_md(tables: list[Table]) -> str:
    """GitHub markdown: a heading, the table and its footnotes, per table."""
    out = []
    for t in tables:
        out.append(f"### {t.title}\n")
        out.append("| " + " | ".join(t.header) + " |")
        out.append("|" + "|".join("---" for _ in t.header) + "|")
        out += ["| " + " | ".join(r) + " |" for r in t.rows]
        out.append("")
        out += [_md_escape(n) + "  " for n in t.footnotes]
        out.append("")
    return "\n".join(out)


def render_csv(tables: list[Table]) -> str:
    """The records of all tables in one CSV (a `table` column says which); lists are `;`-joined."""
    records = [{"table": t.title, **r} for t in tables for r in t.records]
    fields = list(dict.fromkeys(k for r in records for k in r))
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=fields, lineterminator="\n")
    writer.writeheader()
    for r in records:
        writer.writerow({k: ";".join(map(str, v)) if isinstance(v, list) else v for k, v in r.items()})
    return buf.getvalue()


def render_json(tables: list[Table], **meta: Any) -> str:
    """Records and footnotes of every table, plus `meta` (sweep, launches, metric, at)."""
    body = {**meta, "tables": [{"title": t.title, "records": t.records, "footnotes": t.footnotes} for t in tables]}
    return json.dumps(body, indent=2)


def render_html(t: Table) -> str:
    """One table as an HTML fragment (escaped), with its footnotes."""
    head = "".join(f"<th>{html.escape(h)}</th>" for h in t.header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in r) + "</tr>" for r in t.rows)
    notes = "".join(f"<p class='note'>{html.escape(n)}</p>" for n in t.footnotes)
    return f"<h2>{html.escape(t.title)}</h2><table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>{notes}"
