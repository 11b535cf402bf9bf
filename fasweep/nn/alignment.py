"""Alignment diagnostics: how far each FA layer's updates and signals are from exact backprop (degrees)."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn

from fasweep.nn.layers import FALayer


@contextmanager
def exact(rules: Sequence[Any]) -> Iterator[None]:
    """Inside this block `rules` (`FeedbackRule`s, or a pack's `RuleStack`s) behave as bp; restored on exit."""
    saved = [r.exact for r in rules]
    for r in rules:
        r.exact = True
    try:
        yield
    finally:
        for r, old in zip(rules, saved, strict=True):
            r.exact = old


@contextmanager
def exact_backprop(model: nn.Module) -> Iterator[nn.Module]:
    """Inside this block every FA layer of `model` behaves as `bp` (its B is W); restored on exit."""
    with exact([m.rule for m in model.modules() if isinstance(m, FALayer)]):
        yield model


def angle(a: Tensor, b: Tensor) -> float:
    """Angle in degrees between two tensors seen as flat vectors (NaN when either is zero)."""
    a, b = a.detach().flatten().double(), b.detach().flatten().double()
    denom = a.norm() * b.norm()
    if denom == 0:
        return math.nan
    return math.degrees(math.acos(max(-1.0, min(1.0, float(a @ b / denom)))))


def alignment(model: nn.Module, x: Tensor, y: Tensor, loss_fn: Callable[[Tensor, Tensor], Tensor]) -> dict[str, float]:
    """Per trainable FA layer `<name>`, on the probe batch (x, y), with the same weights:

    `angle/<name>` the layer's weight update under its rule vs the true BP gradient;
    `delta_angle/<name>` the signal reaching the layer's output vs BP's; `bw_angle/<name>` and
    `bw_norm_ratio/<name>` B vs W (|B|/|W|; not for dfa, whose B is not W-shaped).
    One forward, two backward passes, in eval mode, on a forked RNG; parameters' .grad are left alone.
    """
    layers = {n: m for n, m in model.named_modules() if isinstance(m, FALayer) and m.weight.requires_grad}
    if not layers:
        return {}
    outputs: dict[str, Tensor] = {}
    handles = [
        m.register_forward_hook(lambda _m, _i, out, name=name: outputs.__setitem__(name, out))
        for name, m in layers.items()
    ]
    modes = {m: m.training for m in model.modules()}
    devices = [x.device.index or 0] if x.is_cuda else []
    try:
        model.eval()
        with torch.random.fork_rng(devices=devices), torch.enable_grad():
            loss = loss_fn(model(x), y)
            names = [n for n in layers if n in outputs]
            targets = [layers[n].weight for n in names] + [outputs[n] for n in names]
            fa = torch.autograd.grad(loss, targets, retain_graph=True, allow_unused=True)
            with exact_backprop(model):
                bp = torch.autograd.grad(loss, targets, allow_unused=True)
            # a layer whose forward drew no B (a first layer) draws it here, on the forked RNG too
            feedback = {n: layers[n].feedback_weight for n in names}
    finally:
        for h in handles:
            h.remove()
        for m, mode in modes.items():
            m.train(mode)
    k = len(names)
    metrics: dict[str, float] = {}
    for i, name in enumerate(names):
        metrics |= layer_alignment(name, fa[i], bp[i], fa[k + i], bp[k + i], feedback[name], layers[name].weight)
    return metrics


def layer_alignment(
    name: str,
    fa_grad: Tensor | None,
    bp_grad: Tensor | None,
    fa_signal: Tensor | None,
    bp_signal: Tensor | None,
    feedback: Tensor,
    weight: Tensor,
) -> dict[str, float]:
    """The alignment metrics of layer `name` of one net (alone, or a pack's member) from its weight gradient and
    output signal under its rule (`fa_*`) and under backprop (`bp_*`), its B and W (see `alignment`); nothing
    where a gradient did not reach the layer."""
    if fa_grad is None or bp_grad is None or fa_signal is None or bp_signal is None:
        return {}
    metrics = {f"angle/{name}": angle(fa_grad, bp_grad), f"delta_angle/{name}": angle(fa_signal, bp_signal)}
    if feedback.shape == weight.shape:
        metrics[f"bw_angle/{name}"] = angle(feedback, weight)
        metrics[f"bw_norm_ratio/{name}"] = float(feedback.norm() / weight.detach().norm())
    return metrics
