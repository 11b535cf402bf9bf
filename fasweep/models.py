"""Networks from layer strings: the grammar of the seed report's tables, the presets, and `build_model`.

A layer string is whitespace-separated tokens, read as the report writes its tables::

    Dense512 Dense256(R) Dense10(R*)
    Conv5*5/32 Pool3*3 UntieConv5x5/64(R) Pool3*3 FixConv5*5/32 Dense128(R^*) Dense10

`Dense<n>`, `Conv<k>*<k>/<c>` (tied, "same" padding), `UntieConv<k>*<k>/<c>` (untied weights per
position), `FixConv<k>*<k>/<c>` (frozen, weights from `model.init_from`), `Pool<k>*<k>` (stride 2,
pad k//2; its kind comes from `model.pool`). `*`, `x` or `×` separate kernel sizes. A mark in
parentheses sets that layer's feedback rule: `(R)` random, `(R*)`/`(R^*)` random_updated, or a mode
name (`(bp)`, `(sign_concordant)`, `(dfa)`, ...); unmarked layers take `feedback.mode`. The last
Dense layer's width becomes the data set's number of outputs.
"""

from __future__ import annotations

import difflib
import re
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from fasweep import plugins
from fasweep.config import FeedbackConfig, InitFrom, ModelConfig
from fasweep.errors import UserError
from fasweep.rule_options import RULE_OPTIONS, rule_info

if TYPE_CHECKING:
    import torch

LayerKind = Literal["dense", "conv", "untie", "fixconv", "pool"]

# Presets: the models of the seed report's tables, as data. Resolutions of the report's typos:
# - Tables 1/3 (-HL columns): hinge-loss variants are the same networks with `train.loss: hinge`.
# - Table 3: DDR4's last layer is printed Dense10(R*); DDR4 is the non-updating column, so Dense10(R).
# - Table 5: PGR1 is printed with Dense128(R) like PGR2; PGR1 has one random layer (the text: "random
#   feedback in the last layer"), so Dense128 Dense10(R); likewise PGR1-U = Dense128 Dense10(R*).
# - Table 8 (untied) reuses the PG0..PGR2-U headers; Table 9 names them PG-Untie..PG-Untie-R2-U. Its
#   PGR2-U column has a tied Conv5*5/64 as the third layer: read as UntieConv like every other column.
# - Section 5.3's PGR3-Untie: all convs untied, random feedback in the last untied conv and both dense.
# - Tables 11-14 (first conv fixed from a trained PG0): Table 13 names the columns PG-Untie ... here
#   PG-Fix-Untie... to keep them apart from Table 9's nets. Table 11/12's headers "PG0" and the
#   repeated "PG-Untie-R2-U" are PG-Fix-Untie and PG-Fix-Untie-R3-U (Table 13/14 rows); that last
#   column's tied "Conv5*5/64(R)" is read as UntieConv5*5/64(R*) (untied like its neighbours, updated
#   like every layer of a -U net). Table 13's first "PG-Untie-R3-HL-U" is PG-Untie-R2-HL-U (Table 14).
# - "-Relu/-Tanh" (Tables 7, 10, 13, 15) are `model.activation`; "-Clip" is `train.weight_clip`;
#   CIFAR-100 (Table 14) uses the same presets with 100 outputs.
_PG = "Conv5*5/32 Pool3*3 Conv5*5/64 Pool3*3 Conv5*5/64 Pool3*3"
_UNTIE = "UntieConv5*5/32 Pool3*3 UntieConv5*5/64 Pool3*3 UntieConv5*5/64{r} Pool3*3"
_FIX = "FixConv5*5/32 Pool3*3 UntieConv5*5/64 Pool3*3 UntieConv5*5/64{r} Pool3*3"
PRESETS: dict[str, str] = {
    "DS0": "Dense512 Dense256 Dense10",
    "DSR1": "Dense512 Dense256 Dense10(R)",
    "DSR2": "Dense512 Dense256(R) Dense10(R)",
    "DSR1-U": "Dense512 Dense256 Dense10(R*)",
    "DSR2-U": "Dense512 Dense256(R*) Dense10(R*)",
    "DD0": "Dense512 Dense512 Dense256 Dense256 Dense10",
    "DDR1": "Dense512 Dense512 Dense256 Dense256 Dense10(R)",
    "DDR2": "Dense512 Dense512 Dense256 Dense256(R) Dense10(R)",
    "DDR4": "Dense512 Dense512(R) Dense256(R) Dense256(R) Dense10(R)",
    "DDR1-U": "Dense512 Dense512 Dense256 Dense256 Dense10(R*)",
    "DDR2-U": "Dense512 Dense512 Dense256 Dense256(R*) Dense10(R*)",
    "DDR4-U": "Dense512 Dense512(R*) Dense256(R*) Dense256(R*) Dense10(R*)",
    "PG0": f"{_PG} Dense128 Dense10",
    "PGR1": f"{_PG} Dense128 Dense10(R)",
    "PGR2": f"{_PG} Dense128(R) Dense10(R)",
    "PGR1-U": f"{_PG} Dense128 Dense10(R*)",
    "PGR2-U": f"{_PG} Dense128(R*) Dense10(R*)",
    "PG-Untie": _UNTIE.format(r="") + " Dense128 Dense10",
    "PG-Untie-R1": _UNTIE.format(r="") + " Dense128 Dense10(R)",
    "PG-Untie-R2": _UNTIE.format(r="") + " Dense128(R) Dense10(R)",
    "PG-Untie-R1-U": _UNTIE.format(r="") + " Dense128 Dense10(R*)",
    "PG-Untie-R2-U": _UNTIE.format(r="") + " Dense128(R*) Dense10(R*)",
    "PGR3-Untie": _UNTIE.format(r="(R)") + " Dense128(R) Dense10(R)",
    "PG-Fix-Untie": _FIX.format(r="") + " Dense128 Dense10",
    "PG-Fix-Untie-R2": _FIX.format(r="") + " Dense128(R) Dense10(R)",
    "PG-Fix-Untie-R3": _FIX.format(r="(R)") + " Dense128(R) Dense10(R)",
    "PG-Fix-Untie-R2-U": _FIX.format(r="") + " Dense128(R*) Dense10(R*)",
    "PG-Fix-Untie-R3-U": _FIX.format(r="(R*)") + " Dense128(R*) Dense10(R*)",
}

_KINDS: dict[str, LayerKind] = {
    "dense": "dense",
    "conv": "conv",
    "untieconv": "untie",
    "fixconv": "fixconv",
    "pool": "pool",
}
_NAMES: dict[LayerKind, str] = {
    "dense": "Dense",
    "conv": "Conv",
    "untie": "UntieConv",
    "fixconv": "FixConv",
    "pool": "Pool",
}
_MARKS: dict[str, str] = {"r": "random", "r*": "random_updated", "r^*": "random_updated"}
_SHORT: dict[str, str] = {"random": "R", "random_updated": "R*"}
_TOKEN = re.compile(r"^(?P<kind>[A-Za-z]+?)(?P<body>\d[^()]*)(?:\((?P<mark>[^()]*)\))?$")
_KERNEL = r"(\d+)\s*[*x×]\s*(\d+)"
_BODY = {
    "dense": (re.compile(r"^(\d+)$"), "Dense<units>, e.g. Dense512"),
    "conv": (re.compile(rf"^{_KERNEL}/(\d+)$"), "Conv<k>*<k>/<channels>, e.g. Conv5*5/32"),
    "pool": (re.compile(rf"^{_KERNEL}$"), "Pool<k>*<k>, e.g. Pool3*3"),
}
_GROUPS = {"dense": "dense", "conv": "conv", "fixconv": "conv", "untie": "untied"}
_WEIGHT_NAME = re.compile(r"^(dense|conv|untie|fixconv)(\d+)$")


@dataclass(frozen=True)
class LayerSpec:
    """One token of a layer string: its kind, width (units or channels), kernel size and feedback mark."""

    kind: LayerKind
    width: int = 0
    kernel: int = 0
    feedback: str | None = None

    def __str__(self) -> str:
        name = _NAMES[self.kind]
        if self.kind == "dense":
            text = f"{name}{self.width}"
        elif self.kind == "pool":
            text = f"{name}{self.kernel}*{self.kernel}"
        else:
            text = f"{name}{self.kernel}*{self.kernel}/{self.width}"
        return text + (f"({_SHORT.get(self.feedback, self.feedback)})" if self.feedback else "")


def _parse_token(index: int, token: str, where: str) -> LayerSpec:
    """Parse one token; a UserError names its position and the form expected."""
    path = f"{where} token {index}"
    forms = "Dense<n>, Conv/UntieConv/FixConv<k>*<k>/<c> or Pool<k>*<k>, optionally marked (R) or (R*)"
    if token.lower() in {"softmax", "identity", "ce", "hl"}:
        raise UserError.field(path, token, "no output/loss token: the head is implicit, the loss is train.loss")
    match = _TOKEN.match(token)
    kind = _KINDS.get(match["kind"].lower()) if match else None
    if match is None or kind is None:
        raise UserError.field(path, token, forms)
    pattern, form = _BODY["conv" if kind in ("untie", "fixconv") else kind]
    body = pattern.match(match["body"])
    if body is None:
        raise UserError.field(path, token, form.replace("Conv", _NAMES[kind]))
    numbers = [int(g) for g in body.groups()]
    if 0 in numbers:
        raise UserError.field(path, token, "sizes >= 1")
    if kind != "dense" and numbers[0] != numbers[1]:
        raise UserError.field(path, token, "a square kernel, e.g. 5*5")
    feedback = None
    if match["mark"] is not None:
        mark = match["mark"].strip().replace(" ", "")
        feedback = _MARKS.get(mark.lower(), mark if plugins.is_import_path(mark) else mark.lower())
        try:
            rule_info(feedback)
        except UserError as exc:
            raise UserError.field(path, token, f"a mark (R), (R*) or a rule: {exc.expected}") from None
        if kind == "pool":
            raise UserError.field(path, token, "no feedback mark on a Pool layer")
    if kind == "dense":
        return LayerSpec("dense", width=numbers[0], feedback=feedback)
    if kind == "pool":
        return LayerSpec("pool", kernel=numbers[0])
    return LayerSpec(kind, width=numbers[2], kernel=numbers[0], feedback=feedback)


def parse_layers(text: str, *, where: str = "model.arch") -> list[LayerSpec]:
    """Parse a layer string into LayerSpecs; malformed tokens raise UserError naming token and position."""
    tokens = text.split()
    if not tokens:
        raise UserError.field(where, text, "a preset name or a layer string like 'Dense512 Dense10(R)'")
    specs = [_parse_token(i, token, where) for i, token in enumerate(tokens)]
    if specs[-1].kind != "dense":
        raise UserError.field(where, text, "a layer string ending in a Dense layer (the output layer)")
    return specs


def module_name(spec: LayerSpec, index: int) -> str:
    """The module name of the layer at token `index`: `<kind><index>` (`dense6`, `conv0`, `untie2`, `pool1`)."""
    return f"{spec.kind}{index}"


@dataclass(frozen=True)
class LayerRule:
    """The feedback rule one weight layer runs: its module name, the rule, whether a mark in the layer string chose
    it (else `feedback.mode` did) and the options the rule reads, with their values."""

    layer: str
    rule: str
    marked: bool
    options: tuple[tuple[str, Any], ...]

    def __str__(self) -> str:
        """`random`, `random_updated(decay=0.0)`, `sign_concordant(concordance=0.5, magnitude=uniform)`: the rule and
        the options it reads (one left at null, such as init_scale: W's init std, is not written)."""
        shown = ", ".join(f"{name}={value}" for name, value in self.options if value is not None)
        return f"{self.rule}({shown})" if shown else self.rule


@lru_cache(maxsize=256)
def _parsed(arch: str) -> tuple[LayerSpec, ...]:
    return tuple(parse_layers(resolve_arch(arch)))


USER_MODEL_OTHERS = "other_layers"  # a user's model: every layer `model.rules` does not name (an MLflow param key)


def layer_rules(
    arch: str | Sequence[LayerSpec], feedback: Mapping[str, Any], named: Mapping[str, str] | None = None
) -> list[LayerRule]:
    """The rule each weight layer of `arch` (a preset, a layer string or its parsed specs) runs: its mark, else
    `feedback['mode']`; and the options that rule reads from `feedback` (a FeedbackConfig as a dict). The one
    answer: `assemble` builds these rules, `fasweep validate` and the run record report them (torch-free for the
    seed rules). A user's model (`module:function`) is not built here: its layers are those `named` (`model.rules`,
    marked) and `other_layers`, every other Linear/Conv2d layer, on `feedback['mode']`."""

    def rule_of(layer: str, rule: str, marked: bool) -> LayerRule:
        options = tuple((o, feedback[o]) for o in rule_info(rule).options if o in feedback)
        return LayerRule(layer, rule, marked, options)

    if isinstance(arch, str) and is_user_model(arch):
        marked = [rule_of(layer, rule, True) for layer, rule in sorted((named or {}).items())]
        return [*marked, rule_of(USER_MODEL_OTHERS, str(feedback["mode"]), False)]
    specs = _parsed(arch) if isinstance(arch, str) else arch
    return [
        rule_of(module_name(spec, i), spec.feedback or str(feedback["mode"]), spec.feedback is not None)
        for i, spec in enumerate(specs)
        if spec.kind != "pool"
    ]


def feedback_read(rules: list[LayerRule]) -> set[str]:
    """The `feedback.*` fields a net with these layer rules reads: `mode` where a layer is unmarked, and every
    option of the rules that run."""
    unmarked = {"mode"} if any(not r.marked for r in rules) else set()
    return unmarked | {name for r in rules for name, _ in r.options}


def rules_text(rules: list[LayerRule]) -> str:
    """`dense0:bp dense1:bp dense2:random`: the rule each weight layer runs (the run record's `feedback.layers`)."""
    return " ".join(f"{r.layer}:{r.rule}" for r in rules)


def feedback_fields(path: str, value: Any) -> list[str]:
    """The `feedback.*` fields a setting of trial `path` sets (`feedback.decay` -> decay; `feedback` -> its keys)."""
    if path == "feedback":
        return list(value) if isinstance(value, dict) else []
    head, _, rest = path.partition(".")
    return [rest] if head == "feedback" and rest else []


def unread(field: str, rules: list[LayerRule], where: str = "") -> str:
    """The `expected ...` part of the error for a `feedback.<field>` set where no layer's rule reads it (`where`:
    e.g. ` of condition X`)."""
    return (
        f"a setting some layer reads: the layers{where} run {rules_text(rules)}, and none reads feedback.{field} (to "
        f"make it count: {what_reads(field)})"
    )


def what_reads(field: str) -> str:
    """What would make `feedback.<field>` count, for an error message: the rules that read an option, or an
    unmarked layer for `mode`."""
    if field == "mode":
        return "a weight layer without a mark in model.arch"
    readers = [rule for rule, names in RULE_OPTIONS.items() if field in names]
    marks = " or ".join(f"({_SHORT.get(rule, rule)})" for rule in readers)
    return f"feedback.mode: {' | '.join(readers)}, or a layer marked {marks}"


def format_layers(specs: list[LayerSpec]) -> str:
    """The canonical layer string of `specs` (parse_layers(format_layers(s)) == s)."""
    return " ".join(str(spec) for spec in specs)


def resolve_arch(arch: str) -> str:
    """The layer string of a preset name, or `arch` itself when it is a layer string."""
    if arch in PRESETS:
        return PRESETS[arch]
    token = _TOKEN.match(arch.strip())
    if len(arch.split()) == 1 and (token is None or token["kind"].lower() not in _KINDS):
        upper = {name.upper(): name for name in PRESETS}
        close = difflib.get_close_matches(arch.upper(), list(upper), n=1, cutoff=0.6)
        hint = f"did you mean {upper[close[0]]}? " if close else ""
        raise UserError.field("model.arch", arch, f"{hint}a preset ({', '.join(PRESETS)}) or a layer string")
    return arch


def is_user_model(arch: str) -> bool:
    """Whether `arch` names a user's model (see `user_model`), told without importing it."""
    return arch not in PRESETS and plugins.is_plugin("models", arch)


def user_model(arch: str) -> Callable[..., Any] | None:
    """The user's model function `arch` names (an import path `mypkg.models:lenet`, or a name an installed package
    registers in the entry point group `fasweep.models`), checked to be callable; None for a preset or a layer
    string. It is called as `fn(input_shape, num_outputs)` and returns an `nn.Module` (see `build_model`)."""
    if not is_user_model(arch):
        return None
    fn = plugins.find("models", arch, "model.arch", list(PRESETS))
    if not callable(fn):
        raise UserError.field("model.arch", arch, f"a function returning an nn.Module, not a {type(fn).__name__}")
    return fn


def layers_of(arch: str) -> list[LayerSpec] | None:
    """The layers of a preset or a layer string (a UserError naming the bad token); None for a user's model,
    checked to load (`user_model`)."""
    return None if user_model(arch) is not None else parse_layers(resolve_arch(arch))


def layer_group(name: str) -> str | None:
    """The L2 group ('conv', 'untied', 'dense') of a weight module name such as `untie2`; None otherwise."""
    match = _WEIGHT_NAME.match(name)
    return _GROUPS[match[1]] if match else None


def _pool_out(size: int, kernel: int) -> int:
    return (size + 2 * (kernel // 2) - kernel) // 2 + 1


def assemble(
    specs: list[LayerSpec],
    model_cfg: ModelConfig,
    feedback_cfg: FeedbackConfig,
    input_shape: tuple[int, ...],
    num_outputs: int,
    seed: int | None = None,
) -> torch.nn.Sequential:
    """Build the network of `specs` (no init_from, no finalize): FA layers for every weight layer.

    W comes from the global RNG, layer by layer; each rule draws from its own streams of (`seed`, token index)
    (`FeedbackRule.seed_streams`; None: `torch.initial_seed()`), so W does not depend on the rules.
    """
    import torch
    from torch import nn

    from fasweep.nn import FAConv2d, FALinear, UntiedConv2d, make_rule

    seed = torch.initial_seed() if seed is None else seed

    rules = {r.layer: r for r in layer_rules(specs, feedback_cfg.model_dump())}
    last_dense = max(i for i, s in enumerate(specs) if s.kind == "dense")
    shape = tuple(input_shape)
    layers: OrderedDict[str, nn.Module] = OrderedDict()
    pools_seen = 0
    for i, spec in enumerate(specs):
        if spec.kind == "pool":
            if len(shape) != 3:
                raise UserError.field(f"model.arch token {i}", str(spec), "Pool only before the first Dense layer")
            kind = "max" if model_cfg.pool == "max" or (model_cfg.pool == "poggio" and pools_seen == 0) else "avg"
            pad = spec.kernel // 2
            pool = (
                nn.MaxPool2d(spec.kernel, 2, pad) if kind == "max" else nn.AvgPool2d(spec.kernel, 2, pad, False, False)
            )
            layers[module_name(spec, i)] = pool
            shape = (shape[0], _pool_out(shape[1], spec.kernel), _pool_out(shape[2], spec.kernel))
            pools_seen += 1
            continue
        chosen = rules[module_name(spec, i)]
        rule = make_rule(chosen.rule, **dict(chosen.options)).seed_streams(seed, i)
        if spec.kind == "dense":
            if len(shape) != 1:
                layers["flatten"] = nn.Flatten()
                shape = (shape[0] * shape[1] * shape[2],)
            width = num_outputs if i == last_dense else spec.width
            layers[module_name(spec, i)] = FALinear(shape[0], width, feedback=rule)
            shape = (width,)
        else:
            if len(shape) != 3:
                raise UserError.field(f"model.arch token {i}", str(spec), "conv layers before any Dense layer")
            pad = spec.kernel // 2
            if spec.kind == "untie":
                layer = UntiedConv2d(
                    shape[0], spec.width, spec.kernel, (shape[1], shape[2]), padding=pad, feedback=rule
                )
            else:
                layer = FAConv2d(shape[0], spec.width, spec.kernel, padding=pad, feedback=rule)
            layers[module_name(spec, i)] = layer
            shape = (spec.width, shape[1] + 2 * pad - spec.kernel + 1, shape[2] + 2 * pad - spec.kernel + 1)
        if i == last_dense:
            break
        if model_cfg.batchnorm:
            layers[f"bn{i}"] = nn.BatchNorm2d(shape[0]) if len(shape) == 3 else nn.BatchNorm1d(shape[0])
        if model_cfg.activation != "linear":
            layers[f"act{i}"] = nn.ReLU() if model_cfg.activation == "relu" else nn.Tanh()
        if model_cfg.dropout > 0:
            layers[f"drop{i}"] = nn.Dropout(model_cfg.dropout)
    return nn.Sequential(layers)


def _weight_modules(model: torch.nn.Module) -> dict[int, str]:
    """Token index -> name of the weight module at that index."""
    return {int(m[2]): name for name, _ in model.named_children() if (m := _WEIGHT_NAME.match(name))}


def load_init(model: torch.nn.Module, init: InitFrom) -> None:
    """Copy the weights of `init.layers` from a checkpoint (matched by token index) and freeze them if asked."""
    import torch

    path = Path(init.checkpoint.removeprefix("file://")).expanduser()
    if not path.is_file():
        raise UserError.field("model.init_from.checkpoint", init.checkpoint, "an existing fasweep checkpoint file")
    state = torch.load(path, map_location="cpu", weights_only=True)
    state = state.get("model", state)
    sources = {int(m[2]): m[0] for key in state if (m := _WEIGHT_NAME.match(key.split(".")[0]))}
    targets = _weight_modules(model)
    for entry in init.layers:
        match = _WEIGHT_NAME.match(str(entry))
        index = int(match[2]) if match else entry if isinstance(entry, int) else None
        if index not in targets or index not in sources:
            raise UserError.field(
                "model.init_from.layers", entry, f"token indices of weight layers in both nets: {sorted(targets)}"
            )
        module = model.get_submodule(targets[index])
        for pname in ("weight", "bias"):
            param = getattr(module, pname, None)
            key = f"{sources[index]}.{pname}"
            if param is None or key not in state:
                continue
            if tuple(state[key].shape) != tuple(param.shape):
                raise UserError.field(
                    "model.init_from.layers", entry, f"a layer of shape {tuple(param.shape)}, checkpoint has {key}"
                )
            with torch.no_grad():
                param.copy_(state[key])
            if init.freeze:
                param.requires_grad_(False)


def build_model(
    model_cfg: ModelConfig,
    feedback_cfg: FeedbackConfig,
    input_shape: tuple[int, ...],
    num_outputs: int,
    seed: int | None = None,
) -> torch.nn.Module:
    """Build the net of `model_cfg.arch` for the data shape; load init_from; freeze FixConv; finalize (DFA).

    Seed the global RNG with the trial seed first; `seed` (default `torch.initial_seed()`) seeds the rules' own
    streams (`assemble`): one seed gives every rule the same forward weights.
    """
    from fasweep.nn import finalize

    fn = user_model(model_cfg.arch)
    if fn is not None:
        return finalize(_user_net(fn, model_cfg, feedback_cfg, input_shape, num_outputs, seed))
    if model_cfg.rules:
        raise UserError.field("model.rules", model_cfg.rules, "{} with a layer string (mark its layers instead)")
    specs = parse_layers(resolve_arch(model_cfg.arch))
    model = assemble(specs, model_cfg, feedback_cfg, input_shape, num_outputs, seed)
    fixed = [i for i, spec in enumerate(specs) if spec.kind == "fixconv"]
    init = model_cfg.init_from
    missing = [i for i in fixed if init is None or not any(str(e) in (str(i), f"fixconv{i}") for e in init.layers)]
    if missing:
        raise UserError.field(
            "model.init_from", init and init.layers, f"a checkpoint whose layers cover the FixConv layers {missing}"
        )
    if init is not None:
        load_init(model, init)
    for i in fixed:
        model.get_submodule(f"fixconv{i}").requires_grad_(False)
    return finalize(model)


def _user_net(
    fn: Callable[..., Any],
    model_cfg: ModelConfig,
    feedback_cfg: FeedbackConfig,
    input_shape: tuple[int, ...],
    num_outputs: int,
    seed: int | None,
) -> torch.nn.Module:
    """`fn(input_shape, num_outputs)` with its `nn.Linear`/`nn.Conv2d` layers made FA layers: `model.rules`' rule
    for a layer it names (by module name), else `feedback.mode`; each rule seeded by (seed, the layer's index)."""
    import torch
    from torch import nn

    from fasweep.nn import convert, make_rule

    seed = torch.initial_seed() if seed is None else seed
    model = fn(tuple(input_shape), num_outputs)
    if not isinstance(model, nn.Module):
        raise UserError.field(
            "model.arch", model_cfg.arch, f"a function returning an nn.Module, not a {type(model).__name__}"
        )
    names = [name for name, m in model.named_modules() if isinstance(m, nn.Linear | nn.Conv2d)]
    unknown = sorted(set(model_cfg.rules) - set(names))
    if not names or unknown:
        found = ", ".join(names) or "none"
        raise UserError.field(
            "model.rules" if names else "model.arch",
            unknown or model_cfg.arch,
            f"module names of its Linear/Conv2d layers: {found}",
        )

    rules = {r.layer: r for r in layer_rules(model_cfg.arch, feedback_cfg.model_dump(), model_cfg.rules)}

    def rule_for(name: str) -> Any:
        chosen = rules.get(name, rules[USER_MODEL_OTHERS])
        return make_rule(chosen.rule, **dict(chosen.options)).seed_streams(seed, names.index(name))

    return convert(model, rule_for)


def parameter_count(arch: str, input_shape: tuple[int, ...] = (3, 32, 32), num_outputs: int = 10) -> int:
    """Number of forward parameters (W and biases, not B) of `arch`, built on the meta device."""
    import torch

    with torch.device("meta"):
        model = assemble(parse_layers(resolve_arch(arch)), ModelConfig(), FeedbackConfig(), input_shape, num_outputs)
    return sum(p.numel() for p in model.parameters())


def model_bytes(
    model_cfg: ModelConfig, feedback_cfg: FeedbackConfig, input_shape: tuple[int, ...], num_outputs: int
) -> tuple[int, int]:
    """Bytes of the net's state (weights, biases, feedback matrices, buffers) and of its trainable parameters, built
    on the meta device (a user's net too): nothing is allocated, so a net larger than memory is measured too."""
    import torch

    from fasweep.nn import finalize

    fn = user_model(model_cfg.arch)
    specs = [] if fn is not None else parse_layers(resolve_arch(model_cfg.arch))
    with torch.device("meta"):
        if fn is not None:
            model = finalize(_user_net(fn, model_cfg, feedback_cfg, input_shape, num_outputs, None))
        else:
            model = finalize(assemble(specs, model_cfg, feedback_cfg, input_shape, num_outputs))
    frozen = tuple(f"fixconv{i}." for i, spec in enumerate(specs) if spec.kind == "fixconv")
    state = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    trainable = sum(p.numel() * p.element_size() for n, p in model.named_parameters() if not n.startswith(frozen))
    return state, trainable
