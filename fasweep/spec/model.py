"""A sweep spec's shape: the pydantic classes a spec validates into (`SweepSpec`, its stages, axes, resources,
scheduler) and its stages as they run (`stage_locs`). Field types and ranges only; what needs the whole spec is
checked in `fasweep.spec.checks`."""

from __future__ import annotations

import math
import random
from typing import Any, Literal, Self

from pydantic import Field, field_validator, model_validator

from fasweep.config import CheckpointPolicy, Loc, Seed, Strict, TrialConfig
from fasweep.report_options import Pairing


class Resources(Strict):
    """Ray resources of one trial: CPUs and a (fractional) GPU share."""

    cpu: float = Field(default=1.0, gt=0)
    gpu: float = Field(default=0.0, ge=0)

    @field_validator("gpu")
    @classmethod
    def _whole_above_one(cls, v: float) -> float:
        if v > 1 and v != int(v):
            raise ValueError("a fraction <= 1 or a whole number of GPUs")
        return v


class Distribution(Strict):
    """One random axis: exactly one of uniform/loguniform [low, high], randint [low, high) or choice [values]."""

    uniform: tuple[float, float] | None = None
    loguniform: tuple[float, float] | None = None
    randint: tuple[int, int] | None = None
    choice: list[Any] | None = Field(default=None, min_length=1)

    @model_validator(mode="after")
    def _one_kind(self) -> Self:
        set_kinds = [k for k in ("uniform", "loguniform", "randint", "choice") if getattr(self, k) is not None]
        if len(set_kinds) != 1:
            raise ValueError("exactly one of uniform, loguniform, randint, choice")
        bounds = getattr(self, set_kinds[0])
        if set_kinds[0] != "choice" and not bounds[0] < bounds[1]:
            raise ValueError(f"{set_kinds[0]} [low, high] with low < high")
        if self.loguniform is not None and self.loguniform[0] <= 0:
            raise ValueError("loguniform bounds > 0")
        return self

    def draw(self, rng: random.Random) -> Any:
        """One value drawn with `rng`."""
        if self.uniform is not None:
            return rng.uniform(*self.uniform)
        if self.loguniform is not None:
            low, high = self.loguniform
            return math.exp(rng.uniform(math.log(low), math.log(high)))
        if self.randint is not None:
            return rng.randrange(*self.randint)
        assert self.choice is not None
        return rng.choice(self.choice)


class Asha(Strict):
    """Ray Tune's asynchronous successive halving: stop weak trials early, judged on `metric` per epoch."""

    metric: str = "test_acc"
    mode: Literal["max", "min"] = "max"
    grace_period: int = Field(default=1, ge=1)
    reduction_factor: float = Field(default=3.0, gt=1)
    max_t: int | None = Field(default=None, ge=1, description="None: the trials' train.epochs")


class Scheduler(Strict):
    """Trial scheduler; only ASHA for now."""

    asha: Asha


class StageInit(Strict):
    """Start a stage's trials from layers of an earlier stage's best (or last) run of one condition."""

    stage: str
    condition: str
    layers: list[int | str] = Field(default_factory=lambda: [0], description="layer-string token indices or names")
    freeze: bool = True
    select: Literal["best", "last"] = Field(
        default="best", description="best: the seed run with the best final `metric`; last: the last run to finish"
    )
    metric: str = Field(
        default="test_acc",
        description="unset: val_acc where the source holds out a validation split; a test metric there is refused",
    )
    mode: Literal["max", "min"] = "max"

    def symbol(self) -> str:
        """The placeholder put in `model.init_from.checkpoint` until the launcher resolves it."""
        return f"stage:{self.stage}/{self.condition}"


class Axes(Strict):
    """What varies: named conditions × grid × random samples (each may be absent)."""

    conditions: dict[str, dict[str, Any]] = Field(default_factory=dict, description="name -> {dotted path: value}")
    grid: dict[str, list[Any]] = Field(default_factory=dict, description="dotted path -> values (cross product)")
    sample: dict[str, Distribution] = Field(default_factory=dict, description="dotted path -> distribution")
    num_samples: int = Field(default=1, ge=1, description="random draws of the `sample` axes")


class Stage(Axes):
    """One stage of a multi-stage sweep; stages run in order."""

    name: str
    description: str = ""
    overrides: dict[str, Any] = Field(default_factory=dict, description="dotted path -> value for the whole stage")
    seeds: list[Seed] | None = Field(default=None, min_length=1, description="None: the spec's seeds")
    resources: Resources | None = Field(default=None, description="None: the spec's resources")
    init_from: StageInit | None = None
    compare_to: str | None = Field(default=None, description="the report's baseline in this stage; None: the spec's")
    compare: dict[str, Any] | None = Field(default=None, description="{axis path: value}; None: the spec's")
    contrasts: list[tuple[str, str]] = Field(default_factory=list, description="[X, Y] pairs compared (X − Y)")
    pairing: Pairing | None = Field(default=None, description="None: the spec's pairing")
    pack: int | None = Field(default=None, ge=1, description="None: the spec's pack")


class SweepSpec(Axes):
    """A sweep: a base trial config, the axes to vary, seeds, resources and published reference numbers."""

    name: str
    experiment: str = Field(description="MLflow experiment; defaults to `name`")
    description: str = ""
    base: TrialConfig = Field(default_factory=TrialConfig)
    seeds: list[Seed] = Field(default_factory=lambda: [0], min_length=1)
    sample_seed: int = Field(default=0, description="seed of the RNG drawing the `sample` axes")
    resources: Resources = Field(default_factory=Resources)
    max_concurrent: int | None = Field(default=None, ge=1, description="None: as many trials as resources allow")
    max_retries: int = Field(default=2, ge=0, description="retries of a failed trial, resuming its checkpoint")
    pack: int = Field(default=1, ge=1, description="trials per pack: compatible trials trained as one fused model")
    checkpoint: CheckpointPolicy = Field(default_factory=CheckpointPolicy)
    scheduler: Scheduler | None = None
    storage: str = Field(default="./fasweep-runs", description="Ray Tune storage path or URI (s3://...)")
    code: list[str] = Field(
        default_factory=list,
        description="the user's package folders (relative to the spec's folder): imported here, shipped to the "
        "Ray workers (runtime_env py_modules)",
    )
    stages: list[Stage] = Field(default_factory=list)
    reference: dict[str, dict[str, float]] = Field(
        default_factory=dict, description="condition (or stage/condition) -> {metric or metric@epoch: value}"
    )
    compare_to: str | None = Field(default=None, description="condition (or stage/condition) the report compares with")
    compare: dict[str, Any] | None = Field(
        default=None, description="{axis path: value}: each condition against its twin with that value, all else equal"
    )
    contrasts: list[tuple[str, str]] = Field(default_factory=list, description="[X, Y] pairs compared (X − Y)")
    pairing: Pairing = Field(default="none", description="seed: compare conditions seed by seed")
    equivalence_margin: float | None = Field(
        default=None, gt=0, description="TOST margin: |X − Y| < margin, in the metric's units; None: no TOST"
    )

    @model_validator(mode="before")
    @classmethod
    def _experiment_defaults_to_name(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("experiment") is None and isinstance(data.get("name"), str):
            return {**data, "experiment": data["name"]}
        return data

    @property
    def axes(self) -> list[str]:
        """The dotted paths that vary across the sweep's trials, in spec order."""
        seen: dict[str, None] = {}
        for stage, _ in stage_locs(self):
            for overrides in stage.conditions.values():
                seen.update(dict.fromkeys(overrides))
            seen.update(dict.fromkeys(stage.grid))
            seen.update(dict.fromkeys(stage.sample))
            if len(self.stages) > 1:
                seen.update(dict.fromkeys(stage.overrides))
        return list(seen)

    def reference_for(self, stage: str, condition: str) -> dict[str, float]:
        """Published numbers of a condition: `reference['<stage>/<condition>']`, else `reference['<condition>']`."""
        return self.reference.get(f"{stage}/{condition}", self.reference.get(condition, {}))


def stage_locs(spec: SweepSpec) -> list[tuple[Stage, Loc]]:
    """The spec's stages with their locs; a spec without stages is one stage 'main' made of its own axes."""
    if spec.stages:
        return [(stage, ("stages", i)) for i, stage in enumerate(spec.stages)]
    main = Stage(
        name="main",
        conditions=spec.conditions,
        grid=spec.grid,
        sample=spec.sample,
        num_samples=spec.num_samples,
    )
    return [(main, ())]
