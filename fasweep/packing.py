"""Which trials can share a pack (torch-free, for the spec's plan and the packed trainer): `packable(configs)` groups
them.

A pack is one data set, one architecture and one batched pass, so its members' configs agree in every field
except those in `PER_MEMBER` and the rules' options (`feedback.*` but `mode`: each member's rule keeps its own,
see `fasweep.nn.rules.RuleStack`), each of which the fused model keeps per member (`tests/test_pack.py` shows a
member equals the same trial alone). `feedback.mode` is compared through its effect: each layer's rule after the
layer string's marks. Everything else is shared: `data.*` (one data set on the device), the layers and
`model.*` (one pass), `train.optimizer`/`momentum`/`l2` (one update rule: a per-member momentum or L2 would
change torch's fused multiply-adds), `batch_size`, `loss`, `epochs`, `schedule`, `device`, `bf16`, `compile`;
with `data.val_fraction` > 0 also `train.seed` (the validation split follows it). A trial with a reason in
`not_packable` (dropout, or a rule whose declaration says it cannot pack) always runs alone.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
from collections.abc import Sequence
from typing import Any

from fasweep.config import TrialConfig, flatten
from fasweep.errors import UserError
from fasweep.models import format_layers, is_user_model, parse_layers, resolve_arch
from fasweep.rule_options import rule_info

PER_MEMBER: dict[str, str] = {
    "train.seed": "initial W and B, data order, augmentation: drawn from the member's own seed",
    "train.lr": "the stacked Adam/SGD takes one lr (and schedule position) per member",
    "train.weight_clip": "clipping bounds per member",
    "train.batch_manhattan": "sign(grad) per member",
    "train.alignment_every": "the probe is measured for the members it is due for",
}


def not_packable(config: TrialConfig) -> str | None:
    """Why `config` cannot share a pack with any other trial, or None."""
    if config.model.dropout > 0:
        return "model.dropout > 0: each trial's masks come from its own global RNG stream"
    if is_user_model(config.model.arch):
        return f"model.arch {config.model.arch}: a model of your own (a pack fuses layer strings only)"
    for mode in dict.fromkeys(_rules(config)):
        why = rule_info(mode).packable
        if why is not True:
            return f"feedback {mode}: {why}"
    return None


def _rules(config: TrialConfig) -> list[str]:
    specs = parse_layers(resolve_arch(config.model.arch))
    return [spec.feedback or config.feedback.mode for spec in specs if spec.kind != "pool"]


def pack_fields(config: TrialConfig) -> dict[str, Any]:
    """The fields members of one pack must share, `model.arch` as its layers with every rule spelt out."""
    fields = flatten(config.model_dump(mode="json"))
    for path in PER_MEMBER:
        if not (path == "train.seed" and config.data.val_fraction > 0):  # the validation split follows the seed
            fields.pop(path)
    for path in [p for p in fields if p.startswith("feedback.") and p != "feedback.mode"]:
        fields.pop(path)  # a rule option: each member's rule keeps its own
    if is_user_model(config.model.arch):
        return fields  # never packed (`not_packable`); its fields only say how two trials differ
    mode = fields.pop("feedback.mode")
    specs = parse_layers(resolve_arch(config.model.arch))
    fields["model.arch"] = format_layers(
        [spec if spec.kind == "pool" else dataclasses.replace(spec, feedback=spec.feedback or mode) for spec in specs]
    )
    return fields


def pack_differences(a: TrialConfig, b: TrialConfig) -> list[str]:
    """The fields that keep `a` and `b` out of one pack (`not_packable` reasons first)."""
    reasons = [r for r in (not_packable(a), not_packable(b)) if r]
    fa, fb = pack_fields(a), pack_fields(b)
    return reasons + sorted(k for k in fa.keys() | fb.keys() if fa.get(k) != fb.get(k))


def packable(configs: Sequence[TrialConfig], size: int | None = None, slots: int = 1) -> list[list[int]]:
    """Indices of `configs` grouped into packs of at most `size` (None: no limit), in order of first appearance.

    Each group of compatible trials is cut into packs of near-equal size (17 trials at most 16 a pack: 9 and 8);
    while there are fewer packs than `slots` (how many a cluster runs at once), the largest are cut further, so
    every slot trains (16 trials, 2 slots: 8 and 8)."""
    if size is not None and size < 1:
        raise UserError.field("pack", size, "an integer >= 1")
    groups: dict[str, list[int]] = {}
    order: list[list[int]] = []
    for i, config in enumerate(configs):
        key = None if not_packable(config) else json.dumps(pack_fields(config), sort_keys=True)
        if key is None or key not in groups:
            order.append([])
            if key is not None:
                groups[key] = order[-1]
        (order[-1] if key is None else groups[key]).append(i)
    step = size or max(len(configs), 1)
    cuts = [math.ceil(len(group) / step) for group in order]
    while order and sum(cuts) < slots:
        largest = max(range(len(order)), key=lambda g: math.ceil(len(order[g]) / cuts[g]))
        if len(order[largest]) <= cuts[largest]:
            break  # every pack is a single trial
        cuts[largest] += 1
    return [part for group, n in zip(order, cuts, strict=True) for part in _balanced(group, n)]


def _balanced(group: list[int], n: int) -> list[list[int]]:
    """`group` cut into `n` consecutive parts whose sizes differ by at most one (the larger first)."""
    small, extra = divmod(len(group), n)
    sizes = [small + (k < extra) for k in range(n)]
    starts = itertools.accumulate(sizes[:-1], initial=0)
    return [group[start : start + size] for start, size in zip(starts, sizes, strict=True)]
