"""Read one sweep's runs out of MLflow (parent/child layout written by fasweep.tracking) into plain objects."""

from __future__ import annotations

import json
import math
import tempfile
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlparse

from mlflow import MlflowClient
from mlflow.entities import Run

from fasweep.errors import UserError
from fasweep.spec import SweepSpec, expand, parse_spec
from fasweep.tracking import check_reachable, search_all

PAGE = 1000  # experiments per page
RUNNING = "running"
DIVERGED = "diverged"
FAILED = "error"
STOPPED = "stopped"


def label(stage: str, condition: str) -> str:
    """How a condition is shown: `stage/condition`, or just the condition in a single-stage sweep (`main`)."""
    return condition if stage == "main" else f"{stage}/{condition}"


@dataclass
class Trial:
    """One child run: its identity tags, params (flattened TrialConfig, as str) and metric histories."""

    run_id: str
    stage: str
    condition: str
    status: str
    start_time: int
    params: dict[str, str]
    latest: dict[str, float]
    histories: dict[str, list[tuple[int, float]]] = field(default_factory=dict)

    @property
    def label(self) -> str:
        return label(self.stage, self.condition)


@dataclass
class Sweep:
    """The selected launches of a sweep: their trials, varied axes, the spec's reference numbers."""

    name: str
    tracking_uri: str
    parent_ids: list[str]
    launches: list[str]
    all_launches: list[str]
    axes: list[str]
    reference: dict[str, dict[str, float]]
    condition_order: list[str]
    trials: list[Trial]
    notes: list[str] = field(default_factory=list)

    @property
    def metrics(self) -> list[str]:
        """Every metric key logged by any trial, sorted."""
        return sorted({k for t in self.trials for k in t.latest})


def _check_store(uri: str) -> None:
    """One-line error when the store is missing or unreachable; a report never creates an empty SQLite store."""
    path = Path(uri.removeprefix("sqlite:///"))
    if urlparse(uri).scheme == "sqlite" and not path.is_file():
        raise UserError.field("--tracking-uri", uri, f"an existing MLflow store; {path} does not exist")
    check_reachable(uri)


def _experiment_ids(client: MlflowClient) -> list[str]:
    ids: list[str] = []
    token: str | None = None
    while True:
        page = client.search_experiments(max_results=PAGE, page_token=token)
        ids.extend(e.experiment_id for e in page)
        token = page.token
        if not token:
            return ids


def _select_launches(parents: list[Run], launch: str) -> list[Run]:
    """Parents of the chosen launch(es); `parents` are newest first."""
    if launch == "all":
        return parents
    if launch == "latest":
        return parents[:1]
    chosen = [p for p in parents if p.data.tags.get("fasweep.launch") == launch]
    if not chosen:
        known = ", ".join(p.data.tags.get("fasweep.launch", "?") for p in parents)
        raise UserError.field("--launch", launch, f"latest, all or one of this sweep's launches: {known}")
    return chosen


def _load_spec_artifact(client: MlflowClient, run_id: str) -> SweepSpec | str:
    """The resolved spec logged on a parent run (`spec.yaml`), or why it could not be read."""
    try:
        with tempfile.TemporaryDirectory() as tmp:
            text = Path(client.download_artifacts(run_id, "spec.yaml", tmp)).read_text()
    except Exception as exc:  # a missing artifact only costs the reference column and the plan order
        return f"no spec.yaml artifact on the parent run ({type(exc).__name__})"
    try:
        return parse_spec(text, name="spec.yaml artifact")
    except UserError as exc:
        return f"the parent's spec.yaml no longer validates ({exc})"


def _trial(run: Run) -> Trial:
    tags = run.data.tags
    status = tags.get("fasweep.status") or (RUNNING if run.info.status == "RUNNING" else run.info.status.lower())
    return Trial(
        run_id=run.info.run_id,
        stage=tags.get("fasweep.stage", "main"),
        condition=tags.get("fasweep.condition", run.info.run_name or run.info.run_id),
        status=status,
        start_time=run.info.start_time or 0,
        params=dict(run.data.params),
        latest=dict(run.data.metrics),
    )


def _start(trial: Trial) -> int:
    return trial.start_time


def _condition_order(spec: SweepSpec | None, trials: list[Trial]) -> list[str]:
    """Labels in the plan's order (`expand(spec)`), then any others by first start time."""
    planned = [] if spec is None else [label(t.stage, t.condition) for t in expand(spec)]
    rank = {name: i for i, name in enumerate(dict.fromkeys(planned))}
    first: dict[str, int] = {}
    for t in trials:  # sorted by start time
        first.setdefault(t.label, len(first))
    return sorted(first, key=lambda name: (rank.get(name, len(rank)), first[name]))


def load_sweep(
    tracking_uri: str,
    sweep: str,
    *,
    launch: str = "latest",
    spec: SweepSpec | None = None,
) -> Sweep:
    """Find the sweep's parent runs by tag, pick the launch(es) and read their child runs.

    `spec` (a spec file's contents) wins over the parent's `spec.yaml` artifact for reference numbers.
    """
    _check_store(tracking_uri)
    client = MlflowClient(tracking_uri=tracking_uri)
    experiment_ids = _experiment_ids(client)
    parents = search_all(client, experiment_ids, "tags.`fasweep.role` = 'parent'") if experiment_ids else []
    if not parents:
        raise UserError(f"{tracking_uri}: no fasweep sweeps in this MLflow store; run `fasweep launch SPEC` first")
    mine = [p for p in parents if p.data.tags.get("fasweep.sweep") == sweep]
    if not mine:
        known = ", ".join(sorted({p.data.tags.get("fasweep.sweep", "?") for p in parents}))
        raise UserError.field("sweep", sweep, f"a sweep in {tracking_uri}: {known}")
    mine.sort(key=lambda p: p.info.start_time or 0, reverse=True)
    chosen = _select_launches(mine, launch)
    launches = [p.data.tags.get("fasweep.launch", "") for p in chosen]

    children = [
        run
        for parent in chosen
        for run in search_all(
            client, [parent.info.experiment_id], f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'"
        )
        if run.data.tags.get("fasweep.role") == "trial"
    ]
    trials = sorted((_trial(r) for r in children), key=_start)

    notes: list[str] = []
    if spec is None:
        loaded = _load_spec_artifact(client, chosen[0].info.run_id)
        spec = loaded if isinstance(loaded, SweepSpec) else None
        notes += [] if spec else [f"{loaded}: reference numbers unavailable"]
    axes: list[str] = []
    for p in chosen:
        axes += [a for a in json.loads(p.data.tags.get("fasweep.axes") or "[]") if a not in axes]
    return Sweep(
        name=sweep,
        tracking_uri=tracking_uri,
        parent_ids=[p.info.run_id for p in chosen],
        launches=launches,
        all_launches=[p.data.tags.get("fasweep.launch", "") for p in mine],
        axes=axes or (spec.axes if spec else []),
        reference=spec.reference if spec else {},
        condition_order=_condition_order(spec, trials),
        trials=trials,
        notes=notes,
    )


def fetch_histories(tracking_uri: str, trials: list[Trial], keys: Iterable[str], *, workers: int = 8) -> None:
    """Fill `trial.histories[key]` (sorted (epoch, value) pairs) for the keys each trial has logged.

    Only the requested keys are fetched, in parallel threads (one request per run and key).
    """
    client = MlflowClient(tracking_uri=tracking_uri)
    wanted = set(keys)
    jobs = [(t, k) for t in trials for k in sorted(wanted & set(t.latest)) if k not in t.histories]

    def get(job: tuple[Trial, str]) -> list[tuple[int, float]]:
        trial, key = job
        points = {m.step: m.value for m in client.get_metric_history(trial.run_id, key)}
        return sorted(points.items())

    with ThreadPoolExecutor(max_workers=workers) as pool:
        for (trial, key), hist in zip(jobs, pool.map(get, jobs), strict=True):
            trial.histories[key] = hist


def finite(values: Iterable[float]) -> Iterator[float]:
    """The finite values only (a diverged trial may log NaN/inf)."""
    return (v for v in values if math.isfinite(v))
