"""Feedback rules by name, the options each takes, and the one check of every option.

Torch-free, so `fasweep.config` validates a spec with the very checks `fasweep.nn.rules` builds rules with:
an option value refused here is refused by `fasweep validate` and by a rule made in a Ray worker alike.
Adding a rule is one entry in `RULE_OPTIONS` (and its class in `fasweep.nn.rules`, keyed by the same name).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal, get_args

from fasweep.errors import UserError

Magnitude = Literal["uniform", "fixed_random", "batch_random"]


@dataclass(frozen=True)
class Option:
    """One rule option: its default, which values it takes (`accepts`) and how to say so (`expected`)."""

    default: Any
    accepts: Callable[[Any], bool]
    expected: str
    description: str


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

# rule name -> the options it reads (every rule takes every option; the others are ignored)
RULE_OPTIONS: dict[str, tuple[str, ...]] = {
    "bp": (),
    "random": ("init_scale",),
    "random_updated": ("init_scale", "decay"),
    "sign_concordant": ("init_scale", "concordance", "magnitude"),
    "dfa": ("init_scale",),
}
RULE_NAMES: tuple[str, ...] = tuple(RULE_OPTIONS)


def check_option(name: str, value: Any) -> Any:
    """`value` when option `name` takes it, else ValueError(what it expects) (Pydantic turns it into one line)."""
    try:
        accepted = OPTIONS[name].accepts(value)
    except TypeError:  # e.g. a string where a number belongs
        accepted = False
    if not accepted:
        raise ValueError(OPTIONS[name].expected)
    return value


def require_option(name: str, value: Any) -> Any:
    """`check_option` for code outside a config: a refused value is a UserError naming `feedback.<name>`."""
    try:
        return check_option(name, value)
    except ValueError as exc:
        raise UserError.field(f"feedback.{name}", value, str(exc)) from None
