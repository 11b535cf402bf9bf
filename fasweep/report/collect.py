"""Read one sweep's runs out of MLflow (through the run reader, `fasweep.runs.reader`) into plain objects."""

from __future__ import annotations

import tempfile
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlparse

from mlflow import MlflowClient

from fasweep.errors import UserError
from fasweep.runs.layout import SPEC_ARTIFACT, LaunchStatus
from fasweep.runs.lease import live_holder
from fasweep.runs.reader import LaunchRecord, TrialRecord, find_launches, launch_trials, unknown_sweep
from fasweep.runs.store import check_reachable
from fasweep.spec.contrasts import Contrast
from fasweep.spec.model import SweepSpec
from fasweep.spec.plan import Plan, parse_spec


@dataclass(frozen=True)
class Trial(TrialRecord):
    """One trial run as the run reader gives it, and the metric histories the report fetched (`fetch_histories`)."""

    histories: dict[str, list[tuple[int, float]]] = field(default_factory=dict)


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
    spec: SweepSpec | None = None  # the spec file's or the parent's spec.yaml (compare_to, pairing), if readable
    contrasts: tuple[Contrast, ...] = ()  # the comparisons that spec declares: the report's Holm family
    running: list[str] = field(default_factory=list)  # selected launches whose driver is still at work (its lease)

    @property
    def metrics(self) -> list[str]:
        """Every metric key logged by any trial, sorted."""
        return sorted({k for t in self.trials for k in t.metrics})


def _check_store(uri: str) -> None:
    """One-line error when the store is missing or unreachable; a report never creates an empty SQLite store."""
    path = Path(uri.removeprefix("sqlite:///"))
    if urlparse(uri).scheme == "sqlite" and not path.exists():  # a folder or junk there: check_reachable says so
        raise UserError.field("--tracking-uri", uri, f"an existing MLflow store; {path} does not exist")
    check_reachable(uri)


def select_launches(launches: list[LaunchRecord], launch: str) -> tuple[list[LaunchRecord], list[str]]:
    """The chosen launch(es) of a sweep (`launches` newest first) and notes. `all` pools only the launches that
    ran the latest launch's plan (same plan hash): a mean never mixes plans; the others are named in a note."""
    if launch == "latest":
        return launches[:1], []
    if launch == "all":
        plan = launches[0].plan_hash
        same = [p for p in launches if p.plan_hash == plan]
        other = [p.launch_id for p in launches if p.plan_hash != plan]
        note = (
            f"--launch all pools the {len(same)} launch(es) of the latest plan ({plan or 'unknown'}); left out, as "
            f"they ran a different plan: {', '.join(other)} (report them with --launch ID)"
        )
        return same, [note] if other else []
    chosen = [p for p in launches if p.launch_id == launch]
    if not chosen:
        known = ", ".join(p.launch_id for p in launches)
        raise UserError.field("--launch", launch, f"latest, all or one of this sweep's launches: {known}")
    return chosen, []


def _load_spec_artifact(client: MlflowClient, run_id: str) -> Plan | str:
    """The plan of the resolved spec logged on a parent run (`spec.yaml`), or why it could not be read."""
    try:
        with tempfile.TemporaryDirectory() as tmp:
            text = Path(client.download_artifacts(run_id, SPEC_ARTIFACT, tmp)).read_text()
    except Exception as exc:  # a missing artifact only costs the reference column and the plan order
        return f"no {SPEC_ARTIFACT} artifact on the parent run ({type(exc).__name__})"
    try:
        return parse_spec(text, name=f"{SPEC_ARTIFACT} artifact")
    except UserError as exc:
        return f"the parent's {SPEC_ARTIFACT} no longer validates ({exc})"


def _condition_order(plan: Plan | None, trials: list[Trial]) -> list[str]:
    """Labels in the plan's order, then any others by first start time."""
    planned = [] if plan is None else [t.label for t in plan.trials]
    rank = {name: i for i, name in enumerate(dict.fromkeys(planned))}
    first: dict[str, int] = {}
    for t in trials:  # sorted by start time
        first.setdefault(t.label, len(first))
    return sorted(first, key=lambda name: (rank.get(name, len(rank)), first[name]))


def load_sweep(tracking_uri: str, sweep: str, *, launch: str = "latest", plan: Plan | None = None) -> Sweep:
    """Find the sweep's launches, pick the launch(es) and read their trial runs.

    `plan` (a spec file's) wins over the parent's `spec.yaml` artifact for reference numbers and plan order.
    """
    _check_store(tracking_uri)
    client = MlflowClient(tracking_uri=tracking_uri)
    every = find_launches(client)
    if not every:
        raise UserError(f"{tracking_uri}: no fasweep sweeps in this MLflow store; run `fasweep launch SPEC` first")
    mine = [p for p in every if p.sweep == sweep]
    if not mine:
        raise unknown_sweep(tracking_uri, sweep, every)
    chosen, notes = select_launches(mine, launch)
    records = (r for p in chosen for r in launch_trials(client, p))
    trials = sorted((Trial(**vars(r)) for r in records), key=lambda t: t.start_time)
    if plan is None:
        loaded = _load_spec_artifact(client, chosen[0].run_id)
        plan = loaded if isinstance(loaded, Plan) else None
        notes += [] if plan else [f"{loaded}: reference numbers unavailable"]
    axes: list[str] = []
    for p in chosen:
        axes += [a for a in p.axes if a not in axes]
    spec = plan.spec if plan else None
    return Sweep(
        name=sweep,
        tracking_uri=tracking_uri,
        parent_ids=[p.run_id for p in chosen],
        launches=[p.launch_id for p in chosen],
        all_launches=[p.launch_id for p in mine],
        axes=axes or (spec.axes if spec else []),
        reference=spec.reference if spec else {},
        condition_order=_condition_order(plan, trials),
        trials=trials,
        notes=notes,
        spec=spec,
        contrasts=plan.contrasts if plan else (),
        running=[p.launch_id for p in chosen if _still_running(client, p)],
    )


def _still_running(client: MlflowClient, launch: LaunchRecord) -> bool:
    """Whether a launch is marked running and its driver still holds the sweep's lease (a live heartbeat)."""
    if launch.status != LaunchStatus.RUNNING:
        return False
    holder = live_holder(client, launch.experiment_id, launch.sweep)
    return holder is not None and holder.launch_id == launch.launch_id


def fetch_histories(tracking_uri: str, trials: list[Trial], keys: Iterable[str], *, workers: int = 8) -> None:
    """Fill `trial.histories[key]` (sorted (epoch, value) pairs) for the keys each trial has logged.

    Only the requested keys are fetched, in parallel threads (one request per run and key).
    """
    client = MlflowClient(tracking_uri=tracking_uri)
    wanted = set(keys)
    jobs = [(t, k) for t in trials for k in sorted(wanted & set(t.metrics)) if k not in t.histories]

    def get(job: tuple[Trial, str]) -> list[tuple[int, float]]:
        trial, key = job
        points = {m.step: m.value for m in client.get_metric_history(trial.run_id, key)}
        return sorted(points.items())

    with ThreadPoolExecutor(max_workers=workers) as pool:
        for (trial, key), hist in zip(jobs, pool.map(get, jobs), strict=True):
            trial.histories[key] = hist
