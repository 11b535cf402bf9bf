"""Links into the MLflow UI (3.17) for a launch, each opening in MLflow's training (classic ML) view, and the saved
view that presets its runs page.

MLflow 3 opens in GenAI mode unless the URL carries `workflowType=machine_learning` (the URL wins over the
browser's stored choice, and MLflow's own links drop it), so every link here carries it: the launch's runs page,
its parent run, the parent's report and MLflow's Compare page of its condition runs.

The runs page is a saved view (MLflow's "Saved views": an experiment tag `SHARED_VIEW_TAG_PREFIX + <id>` holding
`{name, createdAt, updatedAt, state}`, opened by `viewStateShareKey=<id>`). Its state presets what the URL alone
cannot: the search (the launch's parent and condition runs, the best first), the table's columns (the best metric,
its sd, n, the axes, what each layer ran) and the charts, the metric's first: its curves, then a parallel-coordinates
chart of the axes against it. MLflow's Compare page takes nothing but run ids (`#/compare-runs?runs=[...]&
experiments=[...]`); its plots open on the first metric the runs logged, which condition runs log first
(`fasweep.runs.conditions.aggregate`).
"""

from __future__ import annotations

import json
import time
import urllib.parse
from dataclasses import dataclass
from typing import Any

from fasweep.runs.layout import (
    LAYERS_PARAM,
    REPORT_ARTIFACT_DIR,
    SHARED_VIEW_TAG_PREFIX,
    Role,
    Tag,
    parent_run_name,
)
from fasweep.runs.reader import LaunchRecord
from fasweep.runs.store import quote, search_all

TRAINING_VIEW = {"workflowType": "machine_learning"}  # MLflow 3's training UI, not its GenAI mode
MAX_AXIS_COLUMNS = 12  # axes shown as table columns and parallel coordinates (the tag's value stays small)


@dataclass(frozen=True)
class LaunchLinks:
    """The pages of one launch in the MLflow UI."""

    runs: str  # the saved view: parent and condition runs, best first, chart view
    parent: str  # the parent run: the sweep's description, Artifacts -> report/
    report: str  # report/report.html on the parent (once `fasweep report` has logged it)
    compare: str  # MLflow's Compare page of the condition runs

    def lines(self, metric: str) -> list[str]:
        """One labelled line per page, for the console."""
        return [
            f"  runs     {self.runs}  (parent and conditions, best {metric} first; charts: {metric} first)",
            f"  parent   {self.parent}  (the sweep's description; Artifacts: report/)",
            f"  report   {self.report}",
            f"  compare  {self.compare}  (MLflow's Compare: parallel coordinates, params side by side)",
        ]


def page(base: str, route: str, query: dict[str, str] | None = None) -> str:
    """`base/#/route?query` with the training view's parameter."""
    return f"{base}/#/{route}?{urllib.parse.urlencode({**(query or {}), **TRAINING_VIEW})}"


def home(base: str) -> str:
    """The UI's experiment list, in the training view."""
    return page(base, "experiments")


def view_id(launch: LaunchRecord) -> str:
    """The saved view's id (the tag's suffix, `viewStateShareKey`): one per launch, rewritten when published again."""
    return f"fasweep-{launch.launch_id}"


def view_state(launch: LaunchRecord, axes: list[str]) -> dict[str, Any]:
    """The saved view's state (MLflow's search facets and runs-page UI state, as its "Share" button stores them)."""
    metric, section = launch.best.metric, f"{view_id(launch)}-metrics"
    shown = axes[:MAX_AXIS_COLUMNS]
    line = {
        "uuid": f"{view_id(launch)}-curves",
        "type": "LINE",
        "runsCountToCompare": 10,
        "metricSectionId": section,
        "deleted": False,
        "isGenerated": False,
        "displayName": f"{metric} (mean of the seeds)",
        "metricKey": metric,
        "selectedMetricKeys": [metric],
        "lineSmoothness": 0,
        "xAxisScaleType": "linear",
        "scaleType": "linear",
        "range": {},
        "xAxisKey": "step",
        "selectedXAxisMetricKey": "",
        "yAxisKey": "metric",
        "yAxisExpressions": [],
        "ignoreOutliers": False,
        "useGlobalXaxisKey": True,
        "useGlobalLineSmoothing": True,
    }
    parallel = {
        "uuid": f"{view_id(launch)}-axes",
        "type": "PARALLEL",
        "runsCountToCompare": 10,
        "metricSectionId": section,
        "deleted": False,
        "isGenerated": False,
        "displayName": f"{metric} by {', '.join(shown)}",
        "selectedParams": shown,
        "selectedMetrics": [metric],
        "showAllRuns": True,
    }
    return {
        "searchFilter": f"tags.`{Tag.LAUNCH}` = {quote(launch.launch_id)} AND tags.`{Tag.ROLE}` != '{Role.TRIAL}'",
        "orderByKey": f"metrics.`{metric}`",
        "orderByAsc": launch.best.mode == "min",
        "selectedColumns": [
            f"metrics.`{metric}`",
            f"metrics.`{metric}_sd`",
            "metrics.`n`",
            *(f"params.`{axis}`" for axis in shown),
            f"params.`{LAYERS_PARAM}`",
        ],
        "compareRunSections": [
            {"uuid": section, "name": "Model metrics", "display": True, "isReordered": True, "deleted": False},
        ],
        "compareRunCharts": [line, parallel] if shown else [line],
        "isAccordionReordered": True,  # sections MLflow adds (angle/, system/) go after this one
        "hideEmptyCharts": True,
    }


def publish_links(mlflow: Any, base: str, launch: LaunchRecord) -> LaunchLinks:
    """Write the launch's saved view on its experiment (idempotent) and return its pages under `base`."""
    state = view_state(launch, launch.axes)
    now = int(time.time() * 1000)
    name = f"{parent_run_name(launch.sweep, launch.launch_id)}: conditions by {launch.best.metric}"
    envelope = {"name": name, "createdAt": now, "updatedAt": now, "state": json.dumps(state)}
    mlflow.set_experiment_tag(launch.experiment_id, SHARED_VIEW_TAG_PREFIX + view_id(launch), json.dumps(envelope))
    where = f"tags.`{Tag.LAUNCH}` = {quote(launch.launch_id)} AND tags.`{Tag.ROLE}` = '{Role.CONDITION}'"
    conditions = [run.info.run_id for run in search_all(mlflow, [launch.experiment_id], where)]
    experiment = f"experiments/{launch.experiment_id}"
    parent = f"{experiment}/runs/{launch.run_id}"
    compare = {"runs": json.dumps(conditions, separators=(",", ":")), "experiments": json.dumps([launch.experiment_id])}
    return LaunchLinks(
        runs=page(base, f"{experiment}/runs", {"viewStateShareKey": view_id(launch), "compareRunsMode": "CHART"}),
        parent=page(base, parent),
        report=page(base, f"{parent}/artifacts/{REPORT_ARTIFACT_DIR}/report.html"),
        compare=page(base, "compare-runs", compare),
    )
