"""The report's tables of a sweep: one row per condition (`condition_table`: statistics over seeds, reference deltas,
an ad-hoc `--baseline` family), the seed report's layout by loss (`loss_table`), pivots by axes (`pivot_table`).
The declared contrasts have their own table (`fasweep.report.comparisons`)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from fasweep.errors import UserError
from fasweep.report.collect import Sweep, Trial
from fasweep.report.comparisons import Planned, adhoc_comparisons, comparison_cells, run_comparisons
from fasweep.report.render import PARTIAL_MARK, Table, fmt, fmt_ci, fmt_stats, stats_record
from fasweep.report.stats import BOOTSTRAP_RESAMPLES, verdict
from fasweep.report.summary import (
    LOSS_AXIS,
    Conditions,
    Stats,
    group_by,
    plan_sorted,
    planned_epochs,
    reference_epochs,
    reference_for,
    selector,
    sort_values,
    summarize,
)
from fasweep.runs.layout import TEST_SELECTION_NOTE, TrialStatus, condition_label, lower_is_better, on_test_data


def _reference(sweep: Sweep, group: list[Trial], metric: str, at: str | int, s: Stats) -> tuple[dict[str, Any], str]:
    """The spec's number for `metric` (the planned final epoch) or `metric@N` (epoch N), compared with the group's
    values at that epoch only: record fields (reference, reference_epoch, delta, verdict, reason) and the delta
    cell (`+0.0123 (ref inside CI)`, or why there is no delta: `ran 3 of 100 epochs`)."""
    epoch = at if isinstance(at, int) else planned_epochs(group)
    ref = reference_for(sweep, group[0], metric if isinstance(at, str) else f"{metric}@{at}")
    fields: dict[str, Any] = {"reference": ref, "reference_epoch": epoch, "delta": None, "verdict": None}
    if ref is None:
        return {**fields, "reason": None}, "—"
    if epoch is None:
        return {**fields, "reason": "planned epochs unknown (no train.epochs param)"}, "planned epochs unknown"
    at_epoch = s if at == epoch else summarize(group, metric, epoch, s.ci_method)
    if not at_epoch.n:
        ran = at_epoch.final_epoch or 0
        reason = f"ran {ran} of {epoch} epochs" if ran < epoch else f"no finite {metric} at epoch {epoch}"
        return {**fields, "reason": reason}, reason
    delta, where = at_epoch.mean - ref, verdict(ref, at_epoch.ci)
    cell = fmt(delta, signed=True) + (f" (ref {where} CI)" if where else "")
    return {**fields, "delta": delta, "verdict": where, "reason": None}, cell


def _compared(
    sweep: Sweep, group: list[Trial], metric: str, at: str | int, ci: str
) -> tuple[Stats, dict[str, Any], list[str]]:
    """`metric` of a group at `at` (final, best or epoch N, reference key `<metric>@<N>`) beside the reference:
    its stats, record and cells `mean ± sd (n)`, reference, delta."""
    s = summarize(group, metric, at, ci)
    fields, delta = _reference(sweep, group, metric, at, s)
    return s, stats_record(s) | fields, [fmt_stats(s, with_n=True), fmt(fields["reference"]), delta]


def _triple(name: str) -> list[str]:
    """Headers of a measured/reference/delta column triple."""
    return [name, f"reference {name}", f"delta {name}"]


AT_EPOCH_FIELDS = ("mean", "sd", "ci_low", "ci_high", "n", "values", "reference", "delta", "verdict", "reason")


def _at_epochs(
    sweep: Sweep, group: list[Trial], metric: str, epochs: list[int], ci: str
) -> tuple[list[str], dict[str, Any]]:
    """The `<metric>@<N>` column triples of a group and their record fields (`<metric>@<N>.mean`, ...)."""
    cells: list[str] = []
    fields: dict[str, Any] = {}
    for epoch in epochs:
        _, rec, triple = _compared(sweep, group, metric, epoch, ci)
        cells += triple
        fields |= {f"{metric}@{epoch}.{k}": rec[k] for k in AT_EPOCH_FIELDS}
    return cells, fields


def _ci_note(ci: str) -> str:
    how = f"percentile bootstrap ({BOOTSTRAP_RESAMPLES:,} resamples)" if ci == "bootstrap" else "Student t (n − 1 df)"
    return f"95% CI of the mean over seeds: {how}; n/a for one seed, marked wide for two"


def _footnotes(sweep: Sweep, metric: str, at: str, ci: str, epochs: Sequence[int] = ()) -> list[str]:
    trials = sweep.trials
    when = "final (latest)" if at == "final" else "best"
    notes = [f"{metric} at the {when} epoch of each trial; mean ± sd over seeds", _ci_note(ci)]
    if epochs:
        notes.append(
            f"{metric}@N: {metric} at epoch N of the trials that reached it, mean ± sd (n), beside the spec's "
            f"{metric}@N reference; N = {', '.join(map(str, epochs))}"
        )
    if any(key.partition("@")[0] == metric for refs in sweep.reference.values() for key in refs):
        notes.append(
            f"delta: measured − reference at the reference's epoch only ({metric}: the planned final epoch, "
            f"train.epochs; {metric}@N: epoch N), over the trials that reached it; (ref inside/above/below CI): "
            "where the reference lies against that epoch's 95% CI; `ran X of N epochs`: not comparable yet"
        )
    running = sum(t.status == TrialStatus.RUNNING for t in trials)
    if running:
        notes.append(f"{PARTIAL_MARK} partial: {running} trial(s) still running; their latest epoch is used")
    stopped = sum(t.status == TrialStatus.STOPPED for t in trials)
    if stopped:
        notes.append(f"{stopped} trial(s) stopped early by the scheduler; their last epoch is used")
    diverged = sum(t.status == TrialStatus.DIVERGED for t in trials)
    if diverged:
        notes.append(f"{diverged} trial(s) diverged: each counts with its last finite value, at every later epoch too")
    errors = sum(t.status == TrialStatus.ERROR for t in trials)
    if errors:
        notes.append(f"{errors} trial(s) ended with an error: left out of every statistic (`errors` in csv/json)")
    on = {selector(group, metric) for group in group_by(trials, lambda t: t.label).values()}
    notes += [f"best epoch chosen on {m} (validation split); {metric} reported at that epoch" for m in on - {metric}]
    if any(on_test_data(m) for m in on):
        notes.append(f"{TEST_SELECTION_NOTE}; hold out data.val_fraction to choose on validation data")
    if len(sweep.all_launches) > len(sweep.launches):
        shown = ", ".join(sweep.launches)
        notes.append(f"launch {shown} of {len(sweep.all_launches)} launches; `--launch all` pools them")
    return notes + sweep.notes


def condition_table(
    sweep: Sweep,
    conditions: Conditions,
    *,
    baseline: str | None = None,
    pairing: str | None = None,
    margin: float | None = None,
) -> Table:
    """One row per condition (per stage) of the `conditions`' statistics: mean ± sd and 95% CI over seeds, n,
    epochs, diverged, reference and delta; with `baseline`, each condition against it (an ad-hoc family), with a
    `margin` their equivalence tests. The comparisons the spec declares have their own table (`contrast_table`)."""
    metric, at, ci, groups = conditions.metric, conditions.at, conditions.ci, conditions.trials
    epochs = reference_epochs(sweep, metric)
    planned: Planned = []
    base_notes: list[str] = []
    if baseline:
        planned, base_notes = adhoc_comparisons(sweep, groups, baseline, pairing)
    family = f"an ad-hoc family (the comparisons with --baseline {baseline}), not declared in the spec"
    compared, compare_notes = run_comparisons(conditions.stats, planned, metric, margin, declared=False, family=family)
    by_x = {x: fields for (x, _), fields in compared.items()}
    header = ["condition", f"{metric} ({at})", "95% CI", "n", "final epoch", "best epoch", "diverged"]
    header += ["reference", "delta"]
    bases = {b for _, b, _ in planned}
    width = 4 + 3 * (margin is not None)
    if planned:
        against = next(iter(bases)) if len(bases) == 1 else "baseline"
        header += (["baseline"] if len(bases) > 1 else []) + [f"diff vs {against} [95% CI]", "p", "p (Holm)"]
        header += [f"P(X{'<' if lower_is_better(metric) else '>'}Y)"]
        header += ["p TOST", "p TOST (Holm)", "verdict"] if margin is not None else []
    header += [h for e in epochs for h in _triple(f"{metric}@{e}")]
    rows, records = [], []
    for name in sweep.condition_order:
        group = groups[name]
        s = conditions.stats[name]
        fields, delta = _reference(sweep, group, metric, at, s)
        cells, at_fields = _at_epochs(sweep, group, metric, epochs, ci)
        records.append(
            {
                "stage": group[0].stage,
                "condition": group[0].condition,
                **stats_record(s),
                **fields,
                **by_x.get(name, {}),
            }
            | at_fields
        )
        row = [name, fmt_stats(s), fmt_ci(s), str(s.n), str(s.final_epoch or "—"), str(s.best_epoch or "—")]
        row += [str(s.diverged), fmt(fields["reference"]), delta]
        if planned:
            mine = by_x.get(name)
            row += [mine["baseline"] if mine else "—"] if len(bases) > 1 else []
            row += comparison_cells(mine, name in bases, width)
        rows.append(row + cells)
    notes = _footnotes(sweep, metric, at, ci, epochs) + compare_notes + base_notes
    if not baseline and sweep.contrasts:
        notes.append("the spec's declared comparisons: the table of declared contrasts")
    return Table(f"{sweep.name}: {metric} per condition", header, rows, records, notes)


def _strip_axis(condition: str, axis: str) -> str:
    """A condition name without its `axis=value` part (`DS0,loss=hinge` -> `DS0`)."""
    names = {axis, axis.rsplit(".", 1)[-1]}
    parts = [p for p in condition.split(",") if p.split("=", 1)[0].strip() not in names]
    return ",".join(parts) or condition


def loss_table(sweep: Sweep, metric: str, at: str, ci: str = "t") -> Table | None:
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
        row = [condition_label(stage, name)]
        for loss in losses:
            group = cells.get(((stage, name), loss))
            if not group:
                row += ["—"] * 3 * (1 + len(epochs))
                continue
            _, rec, triple = _compared(sweep, group, metric, at, ci)
            at_epochs, fields = _at_epochs(sweep, group, metric, epochs, ci)
            records.append(
                {"stage": stage, "condition": group[0].condition, **rec, **fields, "row": name, LOSS_AXIS: loss}
            )
            row += triple + at_epochs
        rows.append(row)
    title = f"{sweep.name}: {metric} by condition and loss (the seed report's layout)"
    return Table(title, header, rows, records, _footnotes(sweep, metric, at, ci, epochs))


def resolve_axes(sweep: Sweep, by: list[str]) -> list[str]:
    """Each `--by` axis as the param of the trials it names: the param itself, or its short name as condition names
    write it (`concordance` for `feedback.concordance`, `dense2` for `feedback.layers.dense2`): the one param ending
    in `.<axis>`, a sweep axis first. Anything else is refused, naming the sweep's axes."""
    params = sorted({k for t in sweep.trials for k in t.params})
    out = []
    for axis in by:
        matches = [p for p in params if p == axis] or [p for p in params if p.endswith(f".{axis}")]
        if len(matches) > 1:
            matches = [p for p in matches if p in sweep.axes] or matches
        if len(matches) != 1:
            axes = ", ".join(sweep.axes) or "none"
            which = f"one of {', '.join(matches)}" if matches else "a param of the trials"
            raise UserError.field("--by", axis, f"{which}, e.g. one of the sweep's axes: {axes}")
        out.append(matches[0])
    return out


def pivot_table(sweep: Sweep, metric: str, at: str, by: list[str], ci: str = "t") -> Table:
    """Rows = values of the first axis (per stage), columns = value combinations of the others.

    Each cell is `mean ± sd (n)` over every trial with those param values (seeds and unlisted axes pooled).
    """
    by = resolve_axes(sweep, by)
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
            s = summarize(group, metric, at, ci)
            row.append(fmt_stats(s, with_n=True))
            records.append(stats_record(s, **stage, **{a: group[0].params.get(a) for a in by}))
        rows.append(row)
    notes = _footnotes(sweep, metric, at, ci)
    notes.insert(1, "cells: mean ± sd (n) over all trials with these values (seeds and other axes pooled)")
    return Table(f"{sweep.name}: {metric} by {' × '.join(by)}", header, rows, records, notes)
