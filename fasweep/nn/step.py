"""The optimizer step of the seed report: batch-manhattan transform, the step, weight clipping."""

from __future__ import annotations

import math

import torch
from torch import nn

from fasweep.nn.untied import UntiedConv2d

WEIGHTED = (nn.Linear, nn.Conv2d, UntiedConv2d)
FLOAT32_MAX = torch.finfo(torch.float32).max


def update_overflows(lr: float, step: int, beta1: float | None = None) -> bool:
    """Whether a step's scale, `lr` (SGD) or Adam's `lr / (1 - beta1**step)` at its `step`-th step, is finite but
    beyond float32: torch cannot apply it (it raises), the update is as good as infinite, and the trial diverges
    before it, alone or packed (`fasweep.packed.optim`)."""
    scale = lr if beta1 is None else lr / (1 - beta1**step)
    return math.isfinite(scale) and abs(scale) > FLOAT32_MAX


def step_overflows(optimizer: torch.optim.Optimizer) -> bool:
    """`update_overflows` for the next step of a torch Adam or SGD (as `fasweep.train.make_optimizer` makes)."""
    for group in optimizer.param_groups:
        state = next((optimizer.state[p] for p in group["params"] if optimizer.state.get(p)), {})
        beta1 = group["betas"][0] if "betas" in group else None
        if update_overflows(group["lr"], int(state.get("step", 0)) + 1, beta1):
            return True
    return False


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
