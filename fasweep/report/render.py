"""How the report's tables show: numbers as cells (`fmt`), statistics as records (csv/json), and a `Table` rendered
as markdown, csv, json or html."""

from __future__ import annotations

import csv
import html
import io
import json
import math
from dataclasses import dataclass, field
from typing import Any

from fasweep.report.summary import Stats
from fasweep.runs.layout import TEST_SELECTION_NOTE, on_test_data

PARTIAL_MARK = "*"


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


def json_number(value: float) -> float | None:
    """NaN becomes None (JSON has no NaN)."""
    return value if math.isfinite(value) else None


def stats_record(s: Stats, **keys: Any) -> dict[str, Any]:
    low, high = s.ci or (None, None)
    return {
        **keys,
        "mean": json_number(s.mean),
        "sd": json_number(s.sd),
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
        "values": seeded_values(s),
    }


def seeded_values(s: Stats) -> list[dict[str, Any]]:
    """Each value with its seed and launch, sorted by seed: enough to redo a paired test from report.json."""
    rows = [
        {"seed": int(seed) if seed is not None and seed.lstrip("-").isdigit() else seed, "launch": launch, "value": v}
        for seed, launch, v in zip(s.seeds, s.launches, s.values, strict=True)
    ]
    return sorted(rows, key=lambda r: (not isinstance(r["seed"], int), str(r["seed"]).zfill(12), r["launch"] or ""))


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
