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
from functools import cached_property
from typing import Any

from fasweep.config import suggest
from fasweep.errors import UserError
from fasweep.report.collect import Sweep, Trial, label
from fasweep.report.stats import (
    ALPHA,
    BOOTSTRAP_RESAMPLES,
    Interval,
    compare,
    conclusion,
    holm,
    mean_ci,
    pair_by_seed,
    verdict,
)
from fasweep.runs.layout import (
    TEST_SELECTION_NOTE,
    Tag,
    TrialStatus,
    best_epoch,
    lower_is_better,
    on_test_data,
    selection_metric,
)

LOSS_AXIS = "train.loss"
PARTIAL_MARK = "*"


def selector(trials: Iterable[Trial], metric: str) -> str:
    """The metric that chooses the best epoch for `metric` in these trials (`selection_metric`): its validation
    counterpart where they logged one (a validation split), else `metric` itself."""
    return selection_metric(metric, any(selection_metric(metric, True) in t.histories for t in trials))


def trial_value(trial: Trial, metric: str, at: str | int) -> float | None:
    """A trial's metric at its final (latest) epoch, at its best epoch (chosen on the validation metric where
    the trial has one: `selector`), or at epoch `at` (an int: step `at` of the history; a diverged trial that
    ended before it counts with its last value: its training is over); None if never logged (or the trial has
    not reached that epoch)."""
    if isinstance(at, int):
        hist = trial.histories.get(metric, [])
        if trial.status == TrialStatus.DIVERGED and hist and hist[-1][0] < at:
            return hist[-1][1]
        return dict(hist).get(at)
    if at == "final":
        hist = trial.histories.get(metric, [])
        return hist[-1][1] if hist else None
    on = selector([trial], metric)
    epoch = best_epoch(trial.histories.get(on, []), on)
    return None if epoch is None else dict(trial.histories.get(metric, [])).get(epoch)


@dataclass
class Stats:
    """One group of trials (a condition, or a pivot cell): the metric over seeds and the group's bookkeeping."""

    values: list[float]
    seeds: list[str | None]  # each value's train.seed
    launches: list[str | None]  # each value's launch id
    ci_method: str
    runs: int
    diverged: int
    partial: int
    errors: int
    final_epoch: int | None
    best_epoch: int | None
    selected_on: str | None = None  # the metric the best epoch was chosen on (`selector`)

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

    @property
    def seeded(self) -> list[tuple[str | None, float]]:
        """(train.seed, value) of each seed."""
        return list(zip(self.seeds, self.values, strict=True))

    @cached_property
    def ci(self) -> Interval | None:
        """95% CI of the mean over seeds (`ci_method`); None for fewer than two seeds."""
        return mean_ci(self.values, self.ci_method)


def _by_epoch(trials: Iterable[Trial], metric: str) -> dict[int, list[float]]:
    """Epoch -> the trials' values of `metric` there."""
    out: dict[int, list[float]] = defaultdict(list)
    for t in trials:
        for epoch, v in t.histories.get(metric, []):
            out[epoch].append(v)
    return out


def summarize(trials: list[Trial], metric: str, at: str | int, ci: str = "t") -> Stats:
    """Statistics of `metric` over the trials (seeds) at `at` (final, best or an epoch); best epoch = where the
    seed-mean curve of the selection metric (`selector`: the validation metric where there is one) is best. At a
    given epoch a running trial's value is final (not partial). Errored trials are left out (counted in
    `errors`), as are non-finite values."""
    counted = [t for t in trials if t.status != TrialStatus.ERROR]
    seeded = [(t.params.get("train.seed"), t.tags.get(Tag.LAUNCH), trial_value(t, metric, at)) for t in counted]
    seeded = [(seed, launch, v) for seed, launch, v in seeded if v is not None and math.isfinite(v)]
    by_epoch = _by_epoch(counted, metric)
    on = selector(counted, metric)
    chosen = by_epoch if on == metric else _by_epoch(counted, on)
    curve = {e: statistics.fmean(vs) if all(math.isfinite(v) for v in vs) else math.nan for e, vs in chosen.items()}
    return Stats(
        values=[v for _, _, v in seeded],
        seeds=[seed for seed, _, _ in seeded],
        launches=[launch for _, launch, _ in seeded],
        ci_method=ci,
        runs=len(trials),
        diverged=sum(t.status == TrialStatus.DIVERGED for t in trials),
        partial=0 if isinstance(at, int) else sum(t.status == TrialStatus.RUNNING for t in trials),
        errors=sum(t.status == TrialStatus.ERROR for t in trials),
        final_epoch=max(by_epoch) if by_epoch else None,
        best_epoch=best_epoch(curve.items(), on),
        selected_on=on,
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


def fmt_ci(s: Stats) -> str:
    """`[low, high]`, marked wide for two seeds; `n/a (n=1)` for one seed; '—' for none."""
    if s.ci is None:
        return f"n/a (n={s.n})" if s.n else "—"
    text = f"[{fmt(s.ci[0])}, {fmt(s.ci[1])}]"
    return text + (f" wide (n={s.n})" if s.n == 2 else "")


def fmt_p(p: float | None) -> str:
    """A p-value: 3 decimals, `<0.001` below that, `n/a` when no test was possible."""
    return "n/a" if p is None else "<0.001" if p < 0.001 else f"{p:.3f}"


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


def _record(s: Stats, **keys: Any) -> dict[str, Any]:
    low, high = s.ci or (None, None)
    return {
        **keys,
        "mean": _number(s.mean),
        "sd": _number(s.sd),
        "ci_low": low,
        "ci_high": high,
        "n": s.n,
        "runs": s.runs,
        "final_epoch": s.final_epoch,
        "best_epoch": s.best_epoch,
        "best_epoch_on": s.selected_on,
        "selection_note": TEST_SELECTION_NOTE if s.selected_on and on_test_data(s.selected_on) else None,
        "diverged": s.diverged,
        "partial": s.partial,
        "errors": s.errors,
        "values": _seeded_values(s),
    }


def _seeded_values(s: Stats) -> list[dict[str, Any]]:
    """Each value with its seed and launch, sorted by seed: enough to redo a paired test from report.json."""
    rows = [
        {"seed": int(seed) if seed is not None and seed.lstrip("-").isdigit() else seed, "launch": launch, "value": v}
        for seed, launch, v in zip(s.seeds, s.launches, s.values, strict=True)
    ]
    return sorted(rows, key=lambda r: (not isinstance(r["seed"], int), str(r["seed"]).zfill(12), r["launch"] or ""))


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


def planned_epochs(group: list[Trial]) -> int | None:
    """The epoch count the group's trials were planned with (their `train.epochs` param), None if unknown."""
    planned = {t.params.get("train.epochs") for t in group}
    value = planned.pop() if len(planned) == 1 else None
    return int(value) if value is not None and value.isdigit() else None


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
    return s, _record(s) | fields, [fmt_stats(s, with_n=True), fmt(fields["reference"]), delta]


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


def _find(name: str, stage: str, groups: dict[str, list[Trial]]) -> str | None:
    """The label a baseline name means in a stage: `stage/cond` exactly; `cond` in this stage, else in the one
    stage that has it."""
    if "/" in name:
        exact = label(*name.split("/", 1))
        return exact if exact in groups else None
    if label(stage, name) in groups:
        return label(stage, name)
    matches = [key for key, group in groups.items() if group[0].condition == name]
    return matches[0] if len(matches) == 1 else None


Planned = list[tuple[str, str, str]]  # (condition, baseline, pairing) of each comparison, by label


def _adhoc(
    sweep: Sweep, groups: dict[str, list[Trial]], baseline: str, pairing: str | None
) -> tuple[Planned, list[str]]:
    """`--baseline`: every condition of each stage against the baseline's label there (`_find`), paired as
    `--pairing`, else the stage's or the spec's `pairing`; notes on stages without it."""
    spec = sweep.spec
    stages = {stage.name: stage for stage in spec.stages} if spec else {}
    out: Planned = []
    notes: list[str] = []
    stages_found = 0
    for name in dict.fromkeys(group[0].stage for group in groups.values()):
        found = _find(baseline, name, groups)
        if found is None:
            notes.append(f"baseline {baseline}: no trials of it in stage {name}; no comparisons there")
            continue
        stages_found += 1
        own = stages.get(name)
        mode = pairing or (own.pairing if own else None) or (spec.pairing if spec else "none")
        out += [(label, found, mode) for label, g in groups.items() if g[0].stage == name and label != found]
    if not stages_found:
        raise UserError.field(
            "--baseline", baseline, f"a condition of the sweep{suggest(baseline, list(groups))}: " + ", ".join(groups)
        )
    return out, notes


def _comparisons(
    rows: dict[str, tuple[str, Stats]],
    planned: Planned,
    metric: str,
    margin: float | None,
    *,
    declared: bool,
    family: str,
) -> tuple[dict[str, dict[str, Any]], list[str]]:
    """Each planned comparison, keyed (X, Y): record fields (baseline, pairing, n_pairs, diff, diff_ci_low/high, p,
    p_holm, p_improve, holm_family; with a margin p_tost, p_tost_holm, margin, diff_verdict) and footnotes. Holm
    adjusts over every planned comparison (an untestable one as p = 1) when `declared` by the spec (`family`: by which
    fields), else over the tests made (`family`: what this ad-hoc family is)."""
    lower = lower_is_better(metric)
    out: dict[tuple[str, str], dict[str, Any]] = {}
    ratios: list[float] = []
    unpaired = 0
    for name, base, pairing in planned:
        if name not in rows or base not in rows:
            continue
        s, b = rows[name][1], rows[base][1]
        pairs = pair_by_seed(s.seeded, b.seeded) if pairing == "seed" else None
        c = compare(s.values, b.values, pairs=pairs, lower_is_better=lower, margin=margin)
        if c is None:
            continue
        unpaired += pairing == "seed" and not c.paired
        welch = compare(s.values, b.values, lower_is_better=lower) if c.paired else None
        if c.ci and welch and welch.ci and welch.ci[1] > welch.ci[0]:
            ratios.append((c.ci[1] - c.ci[0]) / (welch.ci[1] - welch.ci[0]))
        low, high = c.ci or (None, None)
        key = (name, base)
        n_pairs = len(pairs[0]) if pairs is not None else None
        out[key] = {"baseline": base, "pairing": "seed" if c.paired else "none", "n_pairs": n_pairs, "diff": c.diff}
        out[key] |= {"diff_ci_low": low, "diff_ci_high": high, "p": c.p, "p_holm": None, "p_improve": c.p_improve}
        if margin is not None:
            out[key] |= {"p_tost": c.p_tost, "p_tost_holm": None, "margin": margin}
    members = [(x, y) for x, y, _ in planned] if declared else [k for k, f in out.items() if f["p"] is not None]
    tested = [key for key in members if out.get(key, {}).get("p") is not None]
    for key in ("p", "p_tost") if margin is not None else ("p",):
        adjusted = holm([out.get(member, {}).get(key) for member in members])
        for member, value in zip(members, adjusted, strict=True):
            if out.get(member, {}).get(key) is not None:
                out[member][f"{key}_holm"] = value
    what = f"declared: {len(members)} contrasts" if declared else family
    for fields in out.values():
        fields["holm_family"] = what
        if margin is not None:
            fields["diff_verdict"] = conclusion(fields["p_holm"], fields["p_tost_holm"], margin)
    if not out:
        return out, []
    better = "<" if lower else ">"
    paired = any(f["pairing"] == "seed" for f in out.values())
    if declared:
        untested = len(members) - len(tested)
        holm_note = f"Holm over the {len(members)} declared contrasts (the spec's {family}, fixed before the data)"
        holm_note += f"; {untested} of them untestable here count as p = 1" if untested else ""
    else:
        holm_note = f"Holm over the {len(members)} tests of this table: {family}"
    diff_note = (
        "diff: X's mean − Y's mean (paired: the mean of the seeds' differences, over the n pairs) with its 95% CI"
        if declared
        else f"diff: mean − the baseline's mean ({', '.join(dict.fromkeys(b for _, b, _ in planned))}) with its 95% CI"
    )
    notes = [
        f"{diff_note}; "
        f"p: two-sided Welch's t-test{' (paired t on the seeds both ran where pairing: seed)' if paired else ''}; "
        f"p (Holm): {holm_note}; P(X{better}Y): probability that a seed "
        f"of {'X' if declared else 'the condition'} beats a seed of {'Y' if declared else 'the baseline'}, over all "
        "pairs, ties ½"
    ]
    if margin is not None:
        notes.append(
            f"equivalence (TOST, margin ±{margin:g} {metric}): p TOST = the larger p of the two one-sided tests of "
            f"diff > −{margin:g} and diff < +{margin:g} (the same t-test), Holm-adjusted over the same family; "
            f"verdict: `equivalent within ±{margin:g}` when p TOST (Holm) < {ALPHA:g}, else `different` when "
            f"p (Holm) < {ALPHA:g}, else `undecided` (neither a difference nor an equivalence shown)"
        )
    if ratios:
        notes.append(
            f"pairing by seed: the paired CIs of the difference are {statistics.fmean(ratios):.0%} of the Welch CIs' "
            f"width on average ({len(ratios)} comparisons)"
        )
    if unpaired:
        notes.append(f"{unpaired} comparison(s) unpaired (Welch): fewer than two shared seeds or a seed run twice")
    return out, notes


def _comparison_cells(fields: dict[str, Any] | None, is_baseline: bool, width: int) -> list[str]:
    """diff [CI], p, p (Holm), P(X>Y) cells of a row (and p TOST, p TOST (Holm), verdict: `width` 7)."""
    if fields is None:
        return ["baseline" if is_baseline else "—"] + ["—"] * (width - 1)
    low, high = fields["diff_ci_low"], fields["diff_ci_high"]
    interval = f"[{fmt(low, signed=True)}, {fmt(high, signed=True)}]" if low is not None else "(CI n/a)"
    diff = f"{fmt(fields['diff'], signed=True)} {interval}"
    cells = [diff, fmt_p(fields["p"]), fmt_p(fields["p_holm"]), f"{fields['p_improve']:.2f}"]
    if "margin" in fields:
        cells += [fmt_p(fields["p_tost"]), fmt_p(fields["p_tost_holm"]), fields["diff_verdict"]]
    return cells


def condition_table(
    sweep: Sweep,
    metric: str,
    at: str,
    *,
    ci: str = "t",
    baseline: str | None = None,
    pairing: str | None = None,
    margin: float | None = None,
) -> Table:
    """One row per condition (per stage): mean ± sd and 95% CI over seeds, n, epochs, diverged, reference and
    delta; with `baseline`, each condition against it (an ad-hoc family), with a `margin` their equivalence tests.
    The comparisons the spec declares have their own table (`contrast_table`)."""
    groups = group_by(sweep.trials, lambda t: t.label)
    epochs = reference_epochs(sweep, metric)
    planned: Planned = []
    base_notes: list[str] = []
    if baseline:
        planned, base_notes = _adhoc(sweep, groups, baseline, pairing)
    family = f"an ad-hoc family (the comparisons with --baseline {baseline}), not declared in the spec"
    rows_stats = _rows_stats(sweep, groups, metric, at, ci)
    compared, compare_notes = _comparisons(rows_stats, planned, metric, margin, declared=False, family=family)
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
        s = rows_stats[name][1]
        fields, delta = _reference(sweep, group, metric, at, s)
        cells, at_fields = _at_epochs(sweep, group, metric, epochs, ci)
        records.append(
            {"stage": group[0].stage, "condition": group[0].condition, **_record(s), **fields, **by_x.get(name, {})}
            | at_fields
        )
        row = [name, fmt_stats(s), fmt_ci(s), str(s.n), str(s.final_epoch or "—"), str(s.best_epoch or "—")]
        row += [str(s.diverged), fmt(fields["reference"]), delta]
        if planned:
            mine = by_x.get(name)
            row += [mine["baseline"] if mine else "—"] if len(bases) > 1 else []
            row += _comparison_cells(mine, name in bases, width)
        rows.append(row + cells)
    notes = _footnotes(sweep, metric, at, ci, epochs) + compare_notes + base_notes
    if not baseline and sweep.contrasts:
        notes.append("the spec's declared comparisons: the table of declared contrasts")
    return Table(f"{sweep.name}: {metric} per condition", header, rows, records, notes)


def _rows_stats(
    sweep: Sweep, groups: dict[str, list[Trial]], metric: str, at: str, ci: str
) -> dict[str, tuple[str, Stats]]:
    """Each condition's label -> (its stage, its statistics), in plan order."""
    return {name: (groups[name][0].stage, summarize(groups[name], metric, at, ci)) for name in sweep.condition_order}


def contrast_table(
    sweep: Sweep, metric: str, at: str, *, ci: str = "t", pairing: str | None = None, margin: float | None = None
) -> Table | None:
    """One row per comparison the spec declares (`sweep.contrasts`: compare_to, compare, contrasts), X − Y: n pairs,
    diff [95% CI], p, p (Holm) over exactly that family, P(X>Y), and with a `margin` p TOST, p TOST (Holm) and the
    verdict. A condition may be X of several rows. None when the spec declares none."""
    if not sweep.contrasts:
        return None
    groups = group_by(sweep.trials, lambda t: t.label)
    planned = [(c.condition, c.baseline, pairing or c.pairing) for c in sweep.contrasts]
    missing = sorted({n for x, y, _ in planned for n in (x, y) if n not in groups})
    base_notes = [f"declared contrasts name conditions without trials: {', '.join(missing)}"] if missing else []
    family = ", ".join(dict.fromkeys(c.declared_by for c in sweep.contrasts))
    rows_stats = _rows_stats(sweep, groups, metric, at, ci)
    compared, notes = _comparisons(rows_stats, planned, metric, margin, declared=True, family=family)
    width = 4 + 3 * (margin is not None)
    header = ["X", "Y", "n pairs", "diff X − Y [95% CI]", "p", "p (Holm)"]
    header += [f"P(X{'<' if lower_is_better(metric) else '>'}Y)"]
    header += ["p TOST", "p TOST (Holm)", "verdict"] if margin is not None else []
    rows, records = [], []
    for c, (x, y, _) in zip(sweep.contrasts, planned, strict=True):
        fields = compared.get((x, y))
        sx, sy = (rows_stats[n][1] if n in rows_stats else None for n in (x, y))
        if fields is None:
            n_pairs = "—"
        elif fields["n_pairs"] is not None:
            n_pairs = str(fields["n_pairs"])
        else:
            n_pairs = f"unpaired ({sx.n if sx else 0}, {sy.n if sy else 0})"
        rows.append([x, y, n_pairs, *_comparison_cells(fields, False, width)])
        record: dict[str, Any] = {"x": x, "y": y, "declared_by": c.declared_by}
        record |= {k: v for k, v in (fields or {}).items() if k != "baseline"}
        if fields is None:
            record |= {"pairing": None, "n_pairs": None, "diff": None, "p": None, "p_holm": None}
            record["holm_family"] = f"declared: {len(planned)} contrasts"
        for side, st in (("x", sx), ("y", sy)):
            record |= {f"{side}_mean": _number(st.mean) if st else None, f"{side}_n": st.n if st else 0}
            record[f"{side}_values"] = _seeded_values(st) if st else []
        records.append(record)
    notes.append(
        "one row per comparison the spec declares, X − Y; n pairs: the seeds both ran (paired t-test), else "
        "`unpaired (n X, n Y)` (Welch); —: untestable here (no trials, or one seed)"
    )
    notes.append(f"{metric} at the {'final (latest)' if at == 'final' else 'best'} epoch of each trial")
    title = f"{sweep.name}: declared contrasts ({metric})"
    return Table(title, header, rows, records, notes + base_notes)


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
        row = [label(stage, name)]
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
            records.append(_record(s, **stage, **{a: group[0].params.get(a) for a in by}))
        rows.append(row)
    notes = _footnotes(sweep, metric, at, ci)
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


def _csv_cell(value: Any) -> Any:
    """A list as one cell: seeded values as `seed:value@launch`, others `;`-joined."""
    if not isinstance(value, list):
        return value
    return ";".join(f"{v['seed']}:{v['value']}@{v['launch']}" if isinstance(v, dict) else str(v) for v in value)


def render_csv(tables: list[Table]) -> str:
    """The records of all tables in one CSV (a `table` column says which); lists are `;`-joined, seeded values
    `seed:value@launch`."""
    records = [{"table": t.title, **r} for t in tables for r in t.records]
    fields = list(dict.fromkeys(k for r in records for k in r))
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=fields, lineterminator="\n")
    writer.writeheader()
    for r in records:
        writer.writerow({k: _csv_cell(v) for k, v in r.items()})
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
