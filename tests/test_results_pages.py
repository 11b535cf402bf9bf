"""docs/results cannot drift from its data: every number the prose quotes is in that folder's report.json.

docs/results/README.md has one `## ...: `folder/`` section per results folder. Every decimal number in a
section's prose (code blocks aside) must equal, at the precision it is printed with, some number of that
folder's report.json (a field, a seed's value, or a number inside a footnote). A page whose numbers were typed by
hand, or left standing when the runs were redone, fails here.
"""

from __future__ import annotations

import json
import re
from decimal import ROUND_HALF_EVEN, Decimal
from pathlib import Path
from typing import Any

import pytest

RESULTS = Path(__file__).resolve().parents[1] / "docs" / "results"
_SECTION = re.compile(r"^## .*?`(?P<folder>[\w.-]+)/`.*?$", re.M)
_NUMBER = re.compile(r"(?<![\w.])[-+−]?(\d+\.\d+)(?![\w.]*\.(?:png|json|md|csv|yaml))")


def _sections(text: str) -> dict[str, str]:
    """folder -> that section's prose, fenced code removed."""
    heads = list(_SECTION.finditer(text))
    out = {}
    for head, nxt in zip(heads, [*heads[1:], None], strict=True):
        body = text[head.end() : nxt.start() if nxt else len(text)]
        out[head["folder"]] = re.sub(r"```.*?```", "", body, flags=re.S)
    return out


def _numbers(node: Any) -> list[float]:
    """Every number in a report.json tree, numbers written inside strings included."""
    if isinstance(node, bool) or node is None:
        return []
    if isinstance(node, int | float):
        return [float(node)]
    if isinstance(node, str):
        return [float(m.replace("−", "-")) for m in re.findall(r"[-−]?\d+(?:\.\d+)?", node)]
    items = node.values() if isinstance(node, dict) else node
    return [x for item in items for x in _numbers(item)]


def _printed(value: float, decimals: int) -> set[str]:
    """The ways `value` prints with `decimals` decimals: as is and as a percentage."""
    out = set()
    for v in (value, value * 100):
        q = Decimal(repr(abs(v))).quantize(Decimal(1).scaleb(-decimals), ROUND_HALF_EVEN)
        out.add(str(q))
    return out


def stale_numbers(prose: str, report: dict[str, Any]) -> list[str]:
    """The numbers quoted in `prose` that no number of `report` prints as."""
    values = _numbers(report)
    missing = []
    for quoted in dict.fromkeys(_NUMBER.findall(prose)):
        decimals = len(quoted.split(".")[1])
        if not any(quoted in _printed(v, decimals) for v in values):
            missing.append(quoted)
    return missing


def test_the_checker_catches_a_number_that_is_not_in_the_file() -> None:
    report = {"tables": [{"records": [{"mean": 0.53041, "p_holm": 0.0032}], "footnotes": ["paired: 101% of Welch"]}]}
    assert stale_numbers("mean 0.5304, p_Holm 0.003, 0.53; see `x/curves.png`", report) == []
    assert stale_numbers("mean 0.5305 and p 0.004", report) == ["0.5305", "0.004"]


SECTIONS = _sections((RESULTS / "README.md").read_text()) if (RESULTS / "README.md").is_file() else {}


@pytest.mark.parametrize("folder", sorted(SECTIONS))
def test_every_number_the_results_page_quotes_is_in_its_report_json(folder: str) -> None:
    report = json.loads((RESULTS / folder / "report.json").read_text())
    assert stale_numbers(SECTIONS[folder], report) == [], f"docs/results/README.md section {folder}/"


def test_every_results_folder_has_its_section() -> None:
    folders = {p.parent.name for p in RESULTS.glob("*/report.json")}
    assert folders == set(SECTIONS)
