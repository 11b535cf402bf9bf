"""FA layers: `FALinear`, `FAConv2d` and the one autograd Function every layer kind (and a pack) shares.

The Function's backward returns the ordinary dL/dW and dL/db; only dL/dx goes through the rule
(`rule.input_grad`, normally the layer op's `input_grad` applied to B instead of W).
"""

from __future__ import annotations

from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fasweep.nn.rules import FeedbackRule, LayerOp, resolve_rule


class InputGradRule(Protocol):
    """What the Function's backward asks for dL/dx: a `FeedbackRule`, or a pack's `RuleStack` of its members'."""

    def input_grad(self, op: LayerOp, grad_out: Tensor, weight: Tensor, feedback: Tensor, x: Tensor) -> Tensor: ...


class _FeedbackFunction(torch.autograd.Function):
    """y = op.forward(x, W, b); backward: dx from the rule (B), dW and db as in stock autograd."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        x: Tensor,
        weight: Tensor,
        bias: Tensor | None,
        feedback: Tensor,
        op: LayerOp,
        rule: InputGradRule,
        contiguous_grad: bool,
    ) -> Tensor:
        ctx.save_for_backward(x, weight, feedback)
        ctx.op, ctx.rule, ctx.contiguous_grad = op, rule, contiguous_grad
        return op.forward(x, weight, bias)

    @staticmethod
    def backward(ctx: Any, grad_out: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        x, weight, feedback = ctx.saved_tensors
        if ctx.contiguous_grad:
            grad_out = grad_out.contiguous()
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        grad_x = ctx.rule.input_grad(ctx.op, grad_out, weight, feedback, x) if need_x else None
        grad_w = grad_b = None
        if need_w or need_b:
            grad_w, grad_b = ctx.op.param_grads(grad_out, x, weight, need_w, need_b)
        return grad_x, grad_w, grad_b, None, None, None, None


def apply_feedback(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    feedback: Tensor,
    op: LayerOp,
    rule: InputGradRule,
    contiguous_grad: bool = False,
) -> Tensor:
    """op.forward(x, W, b) whose backward sends dx through `rule` (B) and gives dW, db as stock autograd does.

    Under autocast it runs in the autocast dtype (the casts outside it carry grads back to fp32).
    `contiguous_grad`: G made contiguous first (a pack: each member's sums then run in the order they do alone).
    """
    device = x.device.type
    if not torch.is_autocast_enabled(device):
        return _FeedbackFunction.apply(x, weight, bias, feedback, op, rule, contiguous_grad)
    dtype = torch.get_autocast_dtype(device)
    x, weight, feedback = x.to(dtype), weight.to(dtype), feedback.to(dtype)
    bias = None if bias is None else bias.to(dtype)
    with torch.autocast(device, enabled=False):
        return _FeedbackFunction.apply(x, weight, bias, feedback, op, rule, contiguous_grad)


class FALayer(nn.Module):
    """Mixin for weight-bearing layers whose input gradient goes through `self.rule`."""

    weight: Tensor
    bias: Tensor | None
    rule: FeedbackRule

    def _attach_rule(self, feedback: str | FeedbackRule, options: dict[str, Any], fan_in: int) -> None:
        self.rule = resolve_rule(feedback, options)
        self.rule.bind(self.weight, fan_in)
        self.rule.track(self.weight)

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self.rule.track(self.weight)  # a deep copy or an unpickled layer: its weight is a new tensor

    @property
    def op(self) -> LayerOp:
        """The layer kind's maths (forward, input gradient through any W-shaped matrix, param grads)."""
        raise NotImplementedError

    @property
    def feedback_weight(self) -> Tensor:
        """B used in the last backward (W's shape; for dfa (num_outputs, input features))."""
        if self.rule.last is None:
            return self.rule.matrix(self.weight.detach()).detach()
        return self.rule.last

    def forward(self, x: Tensor) -> Tensor:
        weight, bias, op = self.weight, self.bias, self.op
        if not torch.is_grad_enabled() or not (x.requires_grad or weight.requires_grad):
            return op.forward(x, weight, bias)
        self.rule.track(weight)
        # B only matters when dL/dx is wanted (not for a first layer fed with data)
        feedback = self.rule.feedback_for_forward(weight) if x.requires_grad else weight.detach()
        return self.feedback_forward(x, feedback)

    def feedback_forward(self, x: Tensor, feedback: Tensor) -> Tensor:
        """The gradient-carrying forward with this step's B: the shared FA Function over the layer's op."""
        return apply_feedback(x, self.weight, self.bias, feedback, self.op, self.rule)


class LinearOp:
    """Dense maths, torch (out, in) convention; any leading dims on x."""

    @staticmethod
    def forward(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        return F.linear(x, weight, bias)

    @staticmethod
    def input_grad(grad_out: Tensor, matrix: Tensor, x: Tensor) -> Tensor:
        return grad_out @ matrix

    @staticmethod
    def param_grads(
        grad_out: Tensor, x: Tensor, weight: Tensor, need_weight: bool, need_bias: bool
    ) -> tuple[Tensor | None, Tensor | None]:
        g = grad_out.reshape(-1, grad_out.shape[-1])
        grad_w = g.t() @ x.reshape(-1, x.shape[-1]) if need_weight else None
        return grad_w, (g.sum(0) if need_bias else None)


class Conv2dOp:
    """2-d convolution maths via ATen's `convolution_backward` (the kernels stock autograd uses)."""

    def __init__(self, stride: tuple[int, ...], padding: tuple[int, ...], dilation: tuple[int, ...], groups: int):
        self.stride, self.padding, self.dilation, self.groups = list(stride), list(padding), list(dilation), groups

    def forward(self, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        return F.conv2d(x, weight, bias, self.stride, self.padding, self.dilation, self.groups)

    def _backward(self, grad_out: Tensor, x: Tensor, weight: Tensor, mask: list[bool]) -> tuple[Tensor, ...]:
        bias_sizes = [weight.shape[0]] if mask[2] else None
        return torch.ops.aten.convolution_backward(
            grad_out, x, weight, bias_sizes, self.stride, self.padding, self.dilation, False, [0, 0], self.groups, mask
        )

    def input_grad(self, grad_out: Tensor, matrix: Tensor, x: Tensor) -> Tensor:
        return self._backward(grad_out, x, matrix, [True, False, False])[0]

    def param_grads(
        self, grad_out: Tensor, x: Tensor, weight: Tensor, need_weight: bool, need_bias: bool
    ) -> tuple[Tensor | None, Tensor | None]:
        _, grad_w, grad_b = self._backward(grad_out, x, weight, [False, need_weight, need_bias])
        return grad_w, grad_b


class FALinear(FALayer, nn.Linear):
    """`nn.Linear` whose input gradient is G @ B under `feedback` (a mode name or a FeedbackRule)."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        feedback: str | FeedbackRule = "random",
        *,
        device: Any = None,
        dtype: torch.dtype | None = None,
        **rule_options: Any,
    ) -> None:
        nn.Linear.__init__(self, in_features, out_features, bias, device=device, dtype=dtype)
        self._attach_rule(feedback, rule_options, in_features)

    @property
    def op(self) -> LayerOp:
        return LinearOp


def _conv_padding(padding: Any, kernel_size: tuple[int, ...], dilation: tuple[int, ...]) -> tuple[int, ...]:
    """Integer padding for `nn.Conv2d`'s padding, resolving 'valid'/'same' (odd effective kernels only)."""
    if padding == "valid":
        return (0, 0)
    if padding == "same":
        totals = [d * (k - 1) for k, d in zip(kernel_size, dilation, strict=True)]
        if any(t % 2 for t in totals):
            raise ValueError("FA conv layers support padding='same' only for odd kernels")
        return tuple(t // 2 for t in totals)
    return tuple(padding)


class FAConv2d(FALayer, nn.Conv2d):
    """`nn.Conv2d` whose input gradient is conv_transpose2d(G, B) under `feedback` (zeros padding only)."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | tuple[int, int],
        stride: int | tuple[int, int] = 1,
        padding: int | tuple[int, int] | str = 0,
        bias: bool = True,
        feedback: str | FeedbackRule = "random",
        *,
        dilation: int | tuple[int, int] = 1,
        groups: int = 1,
        padding_mode: str = "zeros",
        device: Any = None,
        dtype: torch.dtype | None = None,
        **rule_options: Any,
    ) -> None:
        nn.Conv2d.__init__(
            self,
            in_channels,
            out_channels,
            kernel_size,
            stride,
            padding,
            dilation,
            groups,
            bias,
            padding_mode,
            device,
            dtype,
        )
        if self.padding_mode != "zeros":
            raise ValueError(f"FAConv2d supports padding_mode='zeros' only, got {self.padding_mode!r}")
        fan_in = (in_channels // groups) * self.kernel_size[0] * self.kernel_size[1]
        self._attach_rule(feedback, rule_options, fan_in)
        pad = _conv_padding(self.padding, self.kernel_size, self.dilation)
        self._op = Conv2dOp(self.stride, pad, self.dilation, groups)

    @property
    def op(self) -> LayerOp:
        return self._op
