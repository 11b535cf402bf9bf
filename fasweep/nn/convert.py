"""`convert`: swap the `nn.Linear`/`nn.Conv2d` of an existing model for FA layers with the same weights."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from fasweep.nn.dfa import finalize
from fasweep.nn.layers import FAConv2d, FALayer, FALinear
from fasweep.nn.rules import FeedbackRule

FeedbackFor = Callable[[str], str | FeedbackRule]  # a layer's module name -> its rule (a mode or a rule object)


def _fa_twin(module: nn.Linear | nn.Conv2d, feedback: str | FeedbackRule, options: dict[str, Any]) -> FALayer:
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


def _swap_children(module: nn.Module, feedback_for: FeedbackFor, options: dict[str, Any], prefix: str) -> None:
    for name, child in list(module.named_children()):
        if isinstance(child, nn.Linear | nn.Conv2d) and not isinstance(child, FALayer):
            setattr(module, name, _fa_twin(child, feedback_for(prefix + name), options))
        elif not isinstance(child, FALayer):
            _swap_children(child, feedback_for, options, f"{prefix}{name}.")


def _same(feedback: str | FeedbackRule) -> FeedbackFor:
    return lambda _name: feedback


def convert(model: nn.Module, feedback: str | FeedbackRule | FeedbackFor, **rule_options: Any) -> nn.Module:
    """Replace every plain `nn.Linear`/`nn.Conv2d` (in place) by an FA layer using `feedback`; returns model.

    `feedback`: a rule's mode (with `rule_options`), a rule object (copied per layer), or a function of the
    layer's module name (as `named_modules` spells it; '' for a bare layer) returning either, for a rule per layer.
    Layers that already are FA layers are kept; each new layer gets its own rule; dfa is wired (finalize).
    A bare `nn.Linear`/`nn.Conv2d` passed as `model` is returned as its FA twin.
    """
    feedback_for = feedback if not isinstance(feedback, str | FeedbackRule) else _same(feedback)
    if isinstance(model, nn.Linear | nn.Conv2d) and not isinstance(model, FALayer):
        return finalize(_fa_twin(model, feedback_for(""), rule_options))
    _swap_children(model, feedback_for, rule_options, "")
    return finalize(model)
