"""TrialConfig: the one contract between the sweep, Ray, the trainer, MLflow params and `fasweep train`.

Pure Pydantic (no torch import), so `fasweep.spec` can validate specs without loading PyTorch. Also turns a
Pydantic error into the one-line UserError that both `fasweep train` and the spec validator print.
"""

from __future__ import annotations

import copy
import re
import types
from typing import Annotated, Any, Literal, Union, get_args, get_origin

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_core import InitErrorDetails, PydanticCustomError

from fasweep.datasets import DATASETS, user_dataset
from fasweep.errors import UserError, suggest
from fasweep.rule_options import OPTIONS, Magnitude, check_option, rule_info


class Strict(BaseModel):
    """Base for every config model: unknown keys are errors, assignments are validated, floats are finite, and a
    boolean is never read as a number (`epochs: true` is refused, not taken as 1)."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)

    @field_validator("*", mode="before")
    @classmethod
    def _no_bool_as_number(cls, value: Any, info: ValidationInfo) -> Any:
        field = cls.model_fields.get(info.field_name or "")
        where = _bool_as_number(field.annotation, value) if field is not None else None
        if where is not None:
            raise ValueError(f"a number{where}, not a boolean (true/false)")
        return value


def _types(annotation: Any) -> tuple[Any, ...]:
    """The types an annotation admits at its top level (`int | None` -> (int, NoneType), Annotated unwrapped)."""
    while get_origin(annotation) is Annotated:
        annotation = get_args(annotation)[0]
    if get_origin(annotation) in (Union, types.UnionType):
        return tuple(t for arg in get_args(annotation) for t in _types(arg))
    return (annotation,)


def _bool_as_number(annotation: Any, value: Any) -> str | None:
    """Where `value` holds a boolean that `annotation` would read as a number: '' (the value itself), ' at item
    1' (in a list, tuple or mapping), or None (no such boolean)."""
    admitted = _types(annotation)
    if isinstance(value, bool):
        numeric = any(t in (int, float) for t in admitted) and not any(t in (bool, Any) for t in admitted)
        return "" if numeric else None
    for kind in admitted:
        args, origin = get_args(kind), get_origin(kind)
        if origin in (list, tuple) and isinstance(value, list | tuple) and args:
            items = [args[0] if origin is list or args[-1] is Ellipsis else a for a in args]
            for i, item in enumerate(value):
                if _bool_as_number(items[min(i, len(items) - 1)], item) is not None:
                    return f" at item {i}"
        if origin is dict and isinstance(value, dict) and len(args) == 2:
            for key, item in value.items():
                if _bool_as_number(args[1], item) is not None:
                    return f" at {key!r}"
    return None


MAX_SEED = 2**32 - 1  # train() seeds torch (< 2**64); 2**32 - 1 also suits numpy and JavaScript (the MLflow UI)


def _seed_range(seed: int) -> int:
    if not 0 <= seed <= MAX_SEED:
        raise ValueError(f"a seed from 0 to {MAX_SEED} (2**32 - 1)")
    return seed


Seed = Annotated[int, AfterValidator(_seed_range)]  # train.seed and a spec's seeds


class DataConfig(Strict):
    """Which data set, where a local copy lives, and how it is split and augmented."""

    name: str = Field(default="digits", description="a data set of fasweep.datasets, or a user's (module:function)")
    root: str | None = Field(
        default=None,
        description="local copy (torchvision layout or image folder train/<class>/*); None: default places",
    )
    download: bool = Field(default=True, description="try a torchvision download when no local copy")
    val_fraction: float = Field(default=0.0, ge=0.0, lt=1.0, description="held out of train for validation")
    augment: bool | None = Field(default=None, description="None: crop+flip for CIFAR, none otherwise")
    normalize: bool = True
    limit_train: int | None = Field(default=None, gt=0, description="use only the first N training samples")
    limit_test: int | None = Field(default=None, gt=0, description="use only the first N test samples")

    @field_validator("name")
    @classmethod
    def _known_data(cls, value: str) -> str:
        if value not in DATASETS:
            try:
                user_dataset(value)
            except UserError as exc:
                raise ValueError(exc.expected or str(exc)) from None
        return value

    @property
    def validation(self) -> bool:
        """Whether trials hold out a validation split (and log `val_*` metrics that select: see
        `fasweep.runs.layout.selection_metric`); no data set has one of its own, so `val_fraction` > 0."""
        return self.val_fraction > 0


class InitFrom(Strict):
    """Load some layers' weights from a checkpoint (e.g. a trained PG0's first conv), optionally frozen."""

    checkpoint: str = Field(description="path or URI of a fasweep checkpoint file (model state)")
    layers: list[int | str] = Field(default_factory=lambda: [0], description="layer-string indices or names")
    freeze: bool = True


class ModelConfig(Strict):
    """The network: a preset name (`DSR1`, `PG0`, ...) or a layer string, plus architecture options."""

    arch: str = "DS0"
    activation: Literal["relu", "tanh", "linear"] = Field(
        default="relu", description="linear: no nonlinearity (Lillicrap's linear 30-20-10 task)"
    )
    batchnorm: bool = False
    dropout: float = Field(default=0.0, ge=0.0, lt=1.0)
    pool: Literal["poggio", "max", "avg"] = Field(
        default="poggio", description="poggio: max after the first conv, average after the others"
    )
    init_from: InitFrom | None = None
    rules: dict[str, str] = Field(
        default_factory=dict, description="a user's model (`arch: module:function`): module name -> its layer's rule"
    )

    @field_validator("rules")
    @classmethod
    def _known_rules(cls, value: dict[str, str]) -> dict[str, str]:
        for mode in value.values():
            try:
                rule_info(mode)
            except UserError as exc:
                raise ValueError(exc.expected or str(exc)) from None
        return value


def _option(name: str) -> Any:
    """The Field of rule option `name`: default and description from `fasweep.rule_options`."""
    return Field(default=OPTIONS[name].default, description=OPTIONS[name].description)


class FeedbackConfig(Strict):
    """The default feedback rule (layers marked (R)/(R*) in the layer string override it) and the rules' options.

    `mode`: a rule of `fasweep.rule_options` (a seed rule's name, a registered name, or an import path
    `module:Class`). Every shared option is checked, whatever the mode (a marked layer may use it), by the check
    the rules use; a key beyond them is an option of the mode's own rule (`feedback.mirror_lr`), checked by it.
    """

    model_config = ConfigDict(extra="allow")

    mode: str = "bp"
    init_scale: float | None = _option("init_scale")
    concordance: float = _option("concordance")
    magnitude: Magnitude = _option("magnitude")
    decay: float = _option("decay")

    @field_validator("mode")
    @classmethod
    def _known_rule(cls, value: str) -> str:
        try:
            rule_info(value)
        except UserError as exc:
            raise ValueError(exc.expected or str(exc)) from None
        return value

    @field_validator(*OPTIONS)
    @classmethod
    def _rule_check(cls, value: Any, info: ValidationInfo) -> Any:
        return check_option(str(info.field_name), value)

    @model_validator(mode="after")
    def _own_options(self) -> FeedbackConfig:
        """Each key beyond the shared options is an option of the mode's rule, with a value it takes; the rule's own
        options not given are filled in with their defaults (so a trial's params say what ran)."""
        info = rule_info(self.mode)
        extra = self.__pydantic_extra__ if self.__pydantic_extra__ is not None else {}
        for name, option in info.own.items():
            extra.setdefault(name, option.default)
        for name, value in extra.items():
            if name in info.own:
                try:
                    info.check(name, value)
                    continue
                except ValueError as exc:
                    message = f"got {brief(value)}; expected {exc}"
            else:
                names = [*type(self).model_fields, *info.own]
                message = unknown_field(name, names)
            error = PydanticCustomError("rule_option", "{message}", {"message": message})  # already `got X; expected Y`
            detail = InitErrorDetails(type=error, loc=(name,), input=value)
            raise ValidationError.from_exception_data(type(self).__name__, [detail])
        return self


class TrainConfig(Strict):
    """Optimisation, loss, regularisation, seed and device for one trial."""

    optimizer: Literal["adam", "sgd", "nesterov"] = "adam"
    lr: float = Field(default=1e-3, gt=0)
    momentum: float = Field(default=0.9, ge=0.0, lt=1.0)
    schedule: Literal["constant", "cosine", "step"] = "constant"
    epochs: int = Field(default=10, ge=1)
    batch_size: int = Field(default=128, ge=1)
    loss: Literal["cross_entropy", "hinge"] = "cross_entropy"
    l2: float | dict[Literal["conv", "untied", "dense"], float] = Field(
        default=0.0, description="L2 coefficient, one for all or per layer group"
    )
    weight_clip: float | None = Field(default=None, gt=0, description="clip every weight to (-c, c)")
    batch_manhattan: bool = Field(default=False, description="update with sign(batch gradient)")
    seed: Seed = 0
    device: Literal["auto", "cpu", "cuda"] = "auto"
    bf16: bool = Field(default=False, description="bf16 autocast (CUDA, or the CPU)")
    compile: bool = Field(default=False, description="torch.compile the model (inductor, on CUDA or the CPU)")
    alignment_every: int = Field(default=1, ge=0, description="measure alignment angles every N epochs; 0 off")

    @field_validator("l2")
    @classmethod
    def _l2_nonnegative(cls, v: float | dict[str, float]) -> float | dict[str, float]:
        values = v.values() if isinstance(v, dict) else [v]
        if any(x < 0 for x in values):
            raise ValueError("L2 coefficients must be >= 0")
        return v


class TrialConfig(Strict):
    """Everything one trial needs. Flattened (`train.lr`, `feedback.mode`) it is the MLflow params."""

    data: DataConfig = Field(default_factory=DataConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    feedback: FeedbackConfig = Field(default_factory=FeedbackConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)


class CheckpointPolicy(Strict):
    """How often a trial writes its checkpoint (a spec's `checkpoint`, `train()`'s `checkpointing`) and how many
    it keeps.

    A trial writes one after an epoch when `every_epochs` epochs or `every_seconds` seconds have passed since the
    last (whichever comes first), and always after its last epoch or a diverged one; other epochs write nothing.
    A retried or resumed trial continues from the newest; `keep` >= 2 leaves one to fall back to when the newest
    is unreadable."""

    model_config = ConfigDict(frozen=True)

    every_epochs: int = Field(default=1, ge=1)
    every_seconds: float | None = Field(default=None, gt=0, description="None: by epochs only")
    keep: int = Field(default=2, ge=1, le=100)

    def due(self, epochs: int, seconds: float, *, final: bool) -> bool:
        """Whether a checkpoint is due `epochs` epochs and `seconds` seconds after the last (`final`: the trial's
        last epoch)."""
        timed = self.every_seconds is not None and seconds >= self.every_seconds
        return final or epochs >= self.every_epochs or timed


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Flatten nested dicts to dotted keys: {'train': {'lr': 1}} -> {'train.lr': 1}."""
    out: dict[str, Any] = {}
    for key, value in d.items():
        path = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            out.update(flatten(value, path + "."))
        else:
            out[path] = value
    return out


def get_path(d: dict[str, Any], path: str) -> Any:
    """The value at the dotted `path` of `d` (None where absent)."""
    value: Any = d
    for part in path.split("."):
        value = value.get(part) if isinstance(value, dict) else None
    return value


def set_path(d: dict[str, Any], path: str, value: Any) -> dict[str, Any]:
    """Return a deep copy of `d` with the dotted `path` set to `value` (intermediate dicts created)."""
    out = copy.deepcopy(d)
    node = out
    keys = path.split(".")
    for key in keys[:-1]:
        child = node.get(key)
        if not isinstance(child, dict):
            child = {}
            node[key] = child
        node = child
    node[keys[-1]] = value
    return out


# --- pydantic errors -> one line (shared by `fasweep train` and the spec validator) ----------------------------

Loc = tuple[str | int, ...]


def format_loc(loc: Loc) -> str:
    """('stages', 1, 'grid', 'train.lr') -> 'stages[1].grid.train.lr'; a key such as 'x\\n' stays on one line."""
    out = ""
    for part in loc:
        text = str(part) if str(part).isprintable() else str(part).encode("unicode_escape").decode()
        out += f"[{part}]" if isinstance(part, int) else (f".{text}" if out else text)
    return out


def brief(value: Any, limit: int = 120) -> str:
    """`repr(value)`, cut to `limit` characters: a value in a spec can be a megabyte long."""
    text = repr(value)
    return text if len(text) <= limit else f"{text[: limit - 3]}..."


def unknown_field(key: str, names: list[str], shown: str = "") -> str:
    """`unknown field[ SHOWN] (did you mean X?); expected one of NAMES` for a `key` where `names` are the fields."""
    return f"unknown field{' ' * bool(shown)}{shown}{suggest(key, names)}; expected one of {', '.join(names)}"


def submodel(annotation: Any) -> type[BaseModel] | None:
    """The pydantic model inside an annotation such as `InitFrom | None` or `list[Stage]`, if any."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    return next((sub for arg in get_args(annotation) if (sub := submodel(arg)) is not None), None)


def _fields_at(model: type[BaseModel], loc: Loc) -> list[str]:
    """Field names of the model reached by walking `loc` from `model` (list indices and dict keys are skipped)."""
    current: type[BaseModel] | None = model
    for part in loc:
        info = current.model_fields.get(part) if current is not None and isinstance(part, str) else None
        if info is not None:
            current = submodel(info.annotation)
    return list(current.model_fields) if current is not None else []


def _data_loc(loc: Loc, data: Any, keep_last: bool) -> Loc:
    """`loc` without pydantic's union-branch tags: the parts present in `data` (and a missing/unknown last key)."""
    out: list[str | int] = []
    node = data
    for i, part in enumerate(loc):
        inside_list = isinstance(node, list) and isinstance(part, int) and 0 <= part < len(node)
        if inside_list or (isinstance(node, dict) and part in node):
            out.append(part)
            node = node[part]
        elif keep_last and i == len(loc) - 1 and isinstance(node, dict):
            out.append(part)
    return tuple(out)


def explain(exc: ValidationError, data: Any, model: type[BaseModel]) -> tuple[Loc, str]:
    """The error to report, as its loc in `data` and `got X; expected Y` (or `unknown field ...; expected one of`).

    An unknown key goes first (a typo also causes the 'missing' error of the real key), then the deepest error
    (inside a union, the branch that got furthest). A misspelt choice ends with `(did you mean X?)`.
    """
    err = max(exc.errors(include_url=False), key=lambda e: (e["type"] == "extra_forbidden", len(e["loc"])))
    loc = _data_loc(tuple(err["loc"]), data, keep_last=err["type"] in ("missing", "extra_forbidden"))
    if err["type"] == "extra_forbidden":
        return loc, unknown_field(str(loc[-1]), _fields_at(model, loc[:-1]))
    if err["type"] == "missing":
        return loc, "required field is missing; expected a value for it"
    return loc, describe(err)


def describe(err: Any) -> str:
    """`got X; expected Y` for one Pydantic error (`ValidationError.errors()` item); a misspelt choice ends with
    `(did you mean X?)`."""
    if err["type"] == "rule_option":  # FeedbackConfig's own: already `got X; expected Y` or `unknown field ...`
        return str(err["msg"])
    msg = str(err["msg"])
    for prefix in ("Input should be ", "Value error, ", "Assertion failed, "):
        msg = msg.removeprefix(prefix)
    value = err.get("input")
    hint = ""
    if err["type"] == "literal_error" and isinstance(value, str):
        hint = suggest(value, re.findall(r"'([^']*)'", str(err.get("ctx", {}).get("expected", ""))))
    return f"got {brief(value)}; expected {msg[:1].lower()}{msg[1:]}{hint}"


def validate_trial(data: dict[str, Any], *, where: str = "") -> TrialConfig:
    """Validate a TrialConfig dict; a Pydantic error becomes one UserError line `[where: ]path: got X; expected Y`."""
    try:
        return TrialConfig.model_validate(data)
    except ValidationError as exc:
        loc, message = explain(exc, data, TrialConfig)
        prefix = f"{where}: " if where else ""
        raise UserError(f"{prefix}{format_loc(loc) or '<top>'}: {message}") from None
