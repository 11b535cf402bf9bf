"""The optimizer step of the seed report: batch-manhattan transform, the step, weight clipping."""

from __future__ import annotations

import torch
from torch import nn

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
    """`optimizer.step()` with the seed report's transforms: grads -> sign(grads) if `batch_manhattan`; the step;
    weights clipped to [-c, c].

    R* layers need nothing here: their B follows W in optimizer step hooks (`fasweep.nn.rules`) that run after
    the clipping (an optimizer's own post-hook), so B still gets W's total change and then its KP decay.
    """
    if batch_manhattan:
        for group in optimizer.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    p.grad.sign_()
    if weight_clip is None:
        optimizer.step()
        return
    handle = optimizer.register_step_post_hook(lambda *_: clip_weights(model, weight_clip))
    try:
        optimizer.step()
    finally:
        handle.remove()
