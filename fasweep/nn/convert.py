"""`convert`: swap the `nn.Linear`/`nn.Conv2d` of an existing model for FA layers with the same weights."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from fasweep.nn.dfa import finalize
from fasweep.nn.layers import FAConv2d, FALayer, FALinear
from fasweep.nn.rules import FeedbackRule


def _fa_twin(module: nn.Module, feedback: str | FeedbackRule, options: dict[str, Any]) -> FALayer | None:
    if not isinstance(module, nn.Linear | nn.Conv2d):
        return None
    w = module.weight
    factory = {"device": w.device, "dtype": w.dtype}
    new: FALayer
    if isinstance(module, nn.Linear):
        new = FALinear(module.in_features, module.out_features, module.bias is not None, feedback, **factory, **options)
    else:
        new = FAConv2d(
            module.in_channels,
            module.out_channels,
            module.kernel_size,
            module.stride,
            module.padding,
            module.bias is not None,
            feedback,
            dilation=module.dilation,
            groups=module.groups,
            padding_mode=module.padding_mode,
            **factory,
            **options,
        )
    with torch.no_grad():
        new.weight.copy_(w)
        if module.bias is not None:
            new.bias.copy_(module.bias)
    new.weight.requires_grad_(w.requires_grad)
    new.train(module.training)
    return new


def _swap_children(module: nn.Module, feedback: str | FeedbackRule, options: dict[str, Any]) -> None:
    for name, child in list(module.named_children()):
        if isinstance(child, FALayer):
            continue
        twin = _fa_twin(child, feedback, options)
        if twin is None:
            _swap_children(child, feedback, options)
        else:
            setattr(module, name, twin)


def convert(model: nn.Module, feedback: str | FeedbackRule, **rule_options: Any) -> nn.Module:
    """Replace every plain `nn.Linear`/`nn.Conv2d` (in place) by an FA layer using `feedback`; returns model.

    Layers that already are FA layers are kept; each new layer gets its own rule; dfa is wired (finalize).
    A bare `nn.Linear`/`nn.Conv2d` passed as `model` is returned as its FA twin.
    """
    if not isinstance(model, FALayer):
        twin = _fa_twin(model, feedback, rule_options)
        if twin is not None:
            return finalize(twin)
    _swap_children(model, feedback, rule_options)
    return finalize(model)
