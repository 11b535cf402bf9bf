"""Comparisons of conditions: the spec's declared contrasts (`contrast_table`, their own Holm family) and an ad-hoc
`--baseline` family (`adhoc_comparisons`), each tested (`run_comparisons`: Welch or paired t, Holm, P(X>Y), TOST)
on the statistics `fasweep.report.summary` computes once."""

from __future__ import annotations

import statistics
from typing import Any

from fasweep.errors import UserError, listed, suggest
from fasweep.report.collect import Sweep, Trial
from fasweep.report.render import Table, fmt, fmt_p, json_number, seeded_values
from fasweep.report.stats import ALPHA, compare, conclusion, holm, pair_by_seed
from fasweep.report.summary import Conditions, Stats
from fasweep.runs.layout import condition_label, lower_is_better


def _find(name: str, stage: str, groups: dict[str, list[Trial]]) -> str | None:
    """The label a baseline name means in a stage: `stage/cond` exactly; `cond` in this stage, else in the one
    stage that has it."""
    if "/" in name:
        exact = condition_label(*name.split("/", 1))
        return exact if exact in groups else None
    if condition_label(stage, name) in groups:
        return condition_label(stage, name)
    matches = [key for key, group in groups.items() if group[0].condition == name]
    return matches[0] if len(matches) == 1 else None


Planned = list[tuple[str, str, str]]  # (condition, baseline, pairing) of each comparison, by label


def adhoc_comparisons(
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


def run_comparisons(
    stats: dict[str, Stats],
    planned: Planned,
    metric: str,
    margin: float | None,
    *,
    declared: bool,
    family: str,
) -> tuple[dict[str, dict[str, Any]], list[str]]:
    """Each planned comparison of conditions (their `stats` by label), keyed (X, Y): record fields (baseline, pairing,
    n_pairs, diff, diff_ci_low/high, p, p_holm, p_improve, holm_family; with a margin p_tost, p_tost_holm, margin,
    diff_verdict) and footnotes. Holm adjusts over every planned comparison (an untestable one as p = 1) when
    `declared` by the spec (`family`: by which fields), else over the tests made (`family`: what this ad-hoc family
    is)."""
    lower = lower_is_better(metric)
    out: dict[tuple[str, str], dict[str, Any]] = {}
    ratios: list[float] = []
    unpaired = 0
    for name, base, pairing in planned:
        if name not in stats or base not in stats:
            continue
        s, b = stats[name], stats[base]
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


def comparison_cells(fields: dict[str, Any] | None, is_baseline: bool, width: int) -> list[str]:
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


def contrast_table(
    sweep: Sweep, conditions: Conditions, *, pairing: str | None = None, margin: float | None = None
) -> Table | None:
    """One row per comparison the spec declares (`sweep.contrasts`: compare_to, compare, contrasts), X − Y: n pairs,
    diff [95% CI], p, p (Holm) over exactly that family, P(X>Y), and with a `margin` p TOST, p TOST (Holm) and the
    verdict, on the `conditions`' statistics. A condition may be X of several rows. None when the spec declares none."""
    if not sweep.contrasts:
        return None
    metric, at, stats = conditions.metric, conditions.at, conditions.stats
    planned = [(c.condition, c.baseline, pairing or c.pairing) for c in sweep.contrasts]
    missing = sorted({n for x, y, _ in planned for n in (x, y) if n not in conditions.trials})
    base_notes = [f"declared contrasts name conditions without trials: {listed(missing)}"] if missing else []
    family = ", ".join(dict.fromkeys(c.declared_by for c in sweep.contrasts))
    compared, notes = run_comparisons(stats, planned, metric, margin, declared=True, family=family)
    width = 4 + 3 * (margin is not None)
    header = ["X", "Y", "n pairs", "diff X − Y [95% CI]", "p", "p (Holm)"]
    header += [f"P(X{'<' if lower_is_better(metric) else '>'}Y)"]
    header += ["p TOST", "p TOST (Holm)", "verdict"] if margin is not None else []
    rows, records = [], []
    for c, (x, y, _) in zip(sweep.contrasts, planned, strict=True):
        fields = compared.get((x, y))
        sx, sy = (stats.get(n) for n in (x, y))
        if fields is None:
            n_pairs = "—"
        elif fields["n_pairs"] is not None:
            n_pairs = str(fields["n_pairs"])
        else:
            n_pairs = f"unpaired ({sx.n if sx else 0}, {sy.n if sy else 0})"
        rows.append([x, y, n_pairs, *comparison_cells(fields, False, width)])
        record: dict[str, Any] = {"x": x, "y": y, "declared_by": c.declared_by}
        record |= {k: v for k, v in (fields or {}).items() if k != "baseline"}
        if fields is None:
            record |= {"pairing": None, "n_pairs": None, "diff": None, "p": None, "p_holm": None}
            record["holm_family"] = f"declared: {len(planned)} contrasts"
        for side, st in (("x", sx), ("y", sy)):
            record |= {f"{side}_mean": json_number(st.mean) if st else None, f"{side}_n": st.n if st else 0}
            record[f"{side}_values"] = seeded_values(st) if st else []
        records.append(record)
    notes.append(
        "one row per comparison the spec declares, X − Y; n pairs: the seeds both ran (paired t-test), else "
        "`unpaired (n X, n Y)` (Welch); —: untestable here (no trials, or one seed)"
    )
    notes.append(f"{metric} at the {'final (latest)' if at == 'final' else 'best'} epoch of each trial")
    title = f"{sweep.name}: declared contrasts ({metric})"
    return Table(title, header, rows, records, notes + base_notes)
