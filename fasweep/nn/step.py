"""The optimizer step for FA nets: batch-manhattan transform, the step, weight clipping, R* updates of B."""

from __future__ import annotations

import torch
from torch import nn

from fasweep.nn.layers import FALayer
from fasweep.nn.untied import UntiedConv2d

WEIGHTED = (nn.Linear, nn.Conv2d, UntiedConv2d)


@torch.no_grad()
def clip_weights(model: nn.Module, c: float) -> None:
    """Clamp the `weight` of every dense/conv/untied layer into [-c, c] (biases and norms untouched)."""
    for m in model.modules():
        if isinstance(m, WEIGHTED):
            m.weight.clamp_(-c, c)


@torch.no_grad()
def optimizer_step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    *,
    batch_manhattan: bool = False,
    weight_clip: float | None = None,
) -> None:
    """Use instead of `optimizer.step()`.

    Order: grads -> sign(grads) if `batch_manhattan`; the optimizer step; weights clipped to [-c, c];
    then every random_updated (R*) layer's B gets exactly W's total change (and its KP decay).
    """
    if batch_manhattan:
        for group in optimizer.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    p.grad.sign_()
    tracked = [
        m for m in model.modules() if isinstance(m, FALayer) and m.rule.updates_with_weight and m.weight.requires_grad
    ]
    for layer in tracked:
        layer.rule.before_step(layer.weight)
    try:
        optimizer.step()
        if weight_clip is not None:
            clip_weights(model, weight_clip)
    finally:
        for layer in tracked:
            layer.rule.after_step(layer.weight)
