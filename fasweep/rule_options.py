"""The feedback rules by name: each rule's torch-free declaration (`RuleInfo`), its options and their one check.

Torch-free, so `fasweep.config` validates a spec, and `fasweep.packing` plans packs, with the very
declarations `fasweep.nn.rules` builds rules from: an option value refused here is refused by `fasweep validate`
and by a rule made in a Ray worker alike, and a rule that cannot pack runs alone by plan, never in a pack.

A rule is one `fasweep.nn.FeedbackRule` subclass that declares its name, options and packability on itself
(see there); `rule_info` reads that declaration from the class, found by an import path (`mypkg.rules:Mirror`)
or by a name an installed package registers in the entry point group `fasweep.rules` (fasweep's own
`weight_mirror` is one). Only the five seed rules are declared here instead, in `SEED_RULES`, because every
spec names one and validating a spec must not import torch; each entry names its class.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Literal, get_args

from fasweep import plugins
from fasweep.errors import UserError

Magnitude = Literal["uniform", "fixed_random", "batch_random"]


@dataclass(frozen=True)
class Option:
    """One rule option: its default, which values it takes (`accepts`) and how to say so (`expected`)."""

    default: Any
    accepts: Callable[[Any], bool]
    expected: str
    description: str

    def check(self, value: Any) -> Any:
        """`value` when this option takes it, else ValueError(what it expects) (Pydantic makes it one line)."""
        try:
            accepted = self.accepts(value)
        except TypeError:  # e.g. a string where a number belongs
            accepted = False
        if not accepted:
            raise ValueError(self.expected)
        return value


# the options fasweep's own rules share (fields of `feedback` in every config); a rule may declare its own
OPTIONS: dict[str, Option] = {
    "init_scale": Option(
        None,
        lambda v: v is None or (math.isfinite(v) and v > 0),
        "a positive finite std, or null for W's init",
        "std of random B; None: same as W's init",
    ),
    "concordance": Option(
        1.0, lambda v: 0.0 <= v <= 1.0, "a fraction in [0, 1]", "sign_concordant: fraction p of B's signs as W's"
    ),
    "magnitude": Option(
        "uniform",
        lambda v: v in get_args(Magnitude),
        "one of " + ", ".join(get_args(Magnitude)),
        "sign_concordant: |B| is sigma, |N(0, sigma)| drawn once, or redrawn every batch",
    ),
    "decay": Option(0.0, lambda v: 0.0 <= v < 1.0, "a number in [0, 1)", "random_updated: decay on W and B (KP)"),
}


@dataclass(frozen=True)
class RuleInfo:
    """What the spec validator and the pack planner know of a rule, without torch.

    `impl`: the import path of its `FeedbackRule` class; `options`: the option names it reads, each one of the
    shared `OPTIONS` or of its `own`; `packable`: True, or why its trials never share a pack (they run alone).
    """

    name: str
    impl: str
    options: tuple[str, ...] = ()
    own: Mapping[str, Option] = field(default_factory=lambda: MappingProxyType({}))
    packable: Literal[True] | str = True

    def option(self, name: str) -> Option:
        """The declaration of option `name` (read at call time: the shared ones from `OPTIONS`)."""
        return self.own[name] if name in self.own else OPTIONS[name]

    def check(self, name: str, value: Any) -> Any:
        """`value` for option `name` of this rule, else ValueError(what it expects)."""
        return self.option(name).check(value)


SEED_RULES: dict[str, RuleInfo] = {
    info.name: info
    for info in (
        RuleInfo("bp", "fasweep.nn.rules:Backprop"),
        RuleInfo("random", "fasweep.nn.rules:RandomFeedback", ("init_scale",)),
        RuleInfo("random_updated", "fasweep.nn.rules:UpdatedRandomFeedback", ("init_scale", "decay")),
        RuleInfo(
            "sign_concordant", "fasweep.nn.rules:SignConcordantFeedback", ("init_scale", "concordance", "magnitude")
        ),
        RuleInfo(
            "dfa",
            "fasweep.nn.rules:DirectFeedback",
            ("init_scale",),
            packable="its B is drawn lazily at the first backward, wired to one net's output error",
        ),
    )
}
# rule name -> the options it reads, for the seed rules (every config carries every shared option)
RULE_OPTIONS: dict[str, tuple[str, ...]] = {name: info.options for name, info in SEED_RULES.items()}
RULE_NAMES: tuple[str, ...] = tuple(SEED_RULES)


def rule_class(mode: str) -> type:
    """The `FeedbackRule` class of `mode` (a seed rule's name, an import path, or a registered name); loading it
    imports torch. A UserError for `feedback.mode` when it cannot be found or is not a rule."""
    if mode in SEED_RULES:
        return plugins.load(SEED_RULES[mode].impl, "feedback.mode")
    found = plugins.find("rules", mode, "feedback.mode", list(RULE_NAMES))
    if not (isinstance(found, type) and isinstance(getattr(found, "info", None), RuleInfo)):
        what = f"class {found.__name__}" if isinstance(found, type) else f"a {type(found).__name__}"
        raise UserError.field("feedback.mode", mode, f"a FeedbackRule subclass (fasweep.nn.FeedbackRule), not {what}")
    return found


def rule_info(mode: str) -> RuleInfo:
    """The declaration of rule `mode`: a seed rule's from `SEED_RULES` (no import), another's from its class."""
    return SEED_RULES[mode] if mode in SEED_RULES else rule_class(mode).info  # type: ignore[attr-defined]


def check_option(name: str, value: Any) -> Any:
    """`value` when the shared option `name` takes it, else ValueError(what it expects)."""
    return OPTIONS[name].check(value)


def require_option(name: str, value: Any, info: RuleInfo | None = None) -> Any:
    """`check_option` (or `info`'s check) for code outside a config: a refused value is a UserError naming
    `feedback.<name>`."""
    try:
        return info.check(name, value) if info is not None else check_option(name, value)
    except ValueError as exc:
        raise UserError.field(f"feedback.{name}", value, str(exc)) from None
