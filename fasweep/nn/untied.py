"""`UntiedConv2d`: a locally connected (untied) convolution, one weight per output position, with FA.

Weights are stored as they are used, (out positions P, in_channels * kh * kw, out_channels): the real
parameter count, never the seed's dense mostly-zero (C*H*W, O*P) matrix. Forward and backward are
patches made once per forward, (P, N, C*kh*kw) by one strided copy (batch innermost) and saved for
dW; the shared FA Function then runs a position-wise linear op (bmm over positions); dL/d(patches) = G B^T
is folded (col2im) onto the input by the patches' own backward. A rule with its own dL/dx (dfa: B sized by
the layer input) and packs use `UntiedOp`, the same kernels with the layer input as x.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules.utils import _pair

from fasweep.nn.layers import FALayer, _conv_padding, apply_feedback
from fasweep.nn.rules import FeedbackRule, LayerOp


def patches(x: Tensor, op: UntiedOp) -> Tensor:
    """(P, N, C*kh*kw): what `F.unfold(x).permute(2, 0, 1)` holds, as a transposed view of a contiguous
    (P, C*kh*kw, N) (bmm takes either orientation without a copy). Made by one strided copy with the batch
    innermost on both sides, from a (C, H+2p, W+2p, N) copy of the input (a blocked 2-d transpose)."""
    if tuple(x.shape[-2:]) != op.input_size:
        raise ValueError(f"UntiedConv2d built for input size {op.input_size}, got {tuple(x.shape[-2:])}")
    (ph, pw), (sh, sw) = op.padding, op.stride
    if ph or pw:
        x = F.pad(x, (pw, pw, ph, ph))
    n, c, h, w = x.shape
    xt = x.contiguous().view(n, -1).t().contiguous()  # (C*Hp*Wp, N)
    view = xt.as_strided((*op.output_size, c, *op.kernel_size, n), (sh * w * n, sw * n, h * w * n, w * n, n, 1))
    cols = view.contiguous()
    return cols.view(cols.shape[0] * cols.shape[1], -1, n).transpose(1, 2)


def fold_patches(cols: Tensor, op: UntiedOp) -> Tensor:
    """The adjoint of `patches`: (P, N, C*kh*kw) summed back onto an (N, C, H, W) input (col2im).

    col2im wants (N, C*kh*kw, P): made from contiguous (P, N*C*kh*kw) by a blocked 2-d transpose."""
    positions, n = cols.shape[:2]
    cols = cols.contiguous().view(positions, -1).t().contiguous().view(n, -1, positions)
    return F.fold(cols, op.input_size, op.kernel_size, padding=op.padding, stride=op.stride)


class _Patches(torch.autograd.Function):
    """`patches` with autograd: backward is `fold_patches` (the layer's input gradient, B already applied)."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, op: UntiedOp) -> Tensor:  # type: ignore[override]
        ctx.op = op
        return patches(x, op)

    @staticmethod
    def backward(ctx: Any, grad_cols: Tensor) -> tuple[Tensor, None]:  # type: ignore[override]
        return fold_patches(grad_cols, ctx.op), None


class PositionLinearOp:
    """Position-wise linear maths on patches: x (P, N, C*kh*kw), W (P, C*kh*kw, O) -> (P, N, O).

    The bias is stored (O, out_h, out_w) and enters as (P, 1, O). The input gradient G @ B^T goes to the
    patches; `_Patches` folds it onto the layer input. G is expected contiguous (P, N, O).
    """

    def __init__(self, output_size: tuple[int, ...]) -> None:
        self.output_size = output_size

    @staticmethod
    def forward(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        if bias is None:
            return torch.bmm(x, weight)
        return torch.baddbmm(bias.reshape(bias.shape[0], -1).t().unsqueeze(1), x, weight)

    @staticmethod
    def input_grad(grad_out: Tensor, matrix: Tensor, x: Tensor) -> Tensor:
        return torch.bmm(grad_out, matrix.transpose(1, 2))  # B^T a transposed view: no copy

    def param_grads(
        self, grad_out: Tensor, x: Tensor, weight: Tensor, need_weight: bool, need_bias: bool
    ) -> tuple[Tensor | None, Tensor | None]:
        grad_w = torch.bmm(x.transpose(1, 2), grad_out) if need_weight else None
        grad_b = grad_out.sum(1).t().reshape(grad_out.shape[2], *self.output_size) if need_bias else None
        return grad_w, grad_b


def _to_image(out: Tensor, output_size: tuple[int, ...]) -> Tensor:
    """(P, N, O) -> contiguous (N, O, out_h, out_w): one blocked 2-d transpose of (P, N*O)."""
    positions, n, o = out.shape
    return out.view(positions, n * o).t().contiguous().view(n, o, *output_size)


def _by_position(grad_out: Tensor) -> Tensor:
    """(N, O, out_h, out_w) -> contiguous (P, N, O): the inverse transpose."""
    n, o = grad_out.shape[:2]
    return grad_out.contiguous().view(n * o, -1).t().contiguous().view(-1, n, o)


class _ToImage(torch.autograd.Function):
    """`_to_image` whose backward is `_by_position` (both blocked transposes; autograd's would not be)."""

    @staticmethod
    def forward(ctx: Any, out: Tensor, output_size: tuple[int, ...]) -> Tensor:  # type: ignore[override]
        return _to_image(out, output_size)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:  # type: ignore[override]
        return _by_position(grad), None


class UntiedOp:
    """Locally connected maths on the layer input: W[p] maps the patch at output position p to O channels.

    The layer's op (`layer.op`: feedback rules such as dfa, a pack's per-member path, no-grad forwards); it
    composes `patches`, `PositionLinearOp` and `fold_patches`, the very kernels the layer's autograd path runs.
    """

    def __init__(
        self,
        kernel_size: tuple[int, int],
        stride: tuple[int, int],
        padding: tuple[int, int],
        input_size: tuple[int, int],
    ) -> None:
        self.kernel_size, self.stride, self.padding, self.input_size = kernel_size, stride, padding, input_size
        self.output_size = tuple(
            (n + 2 * p - k) // s + 1 for n, k, s, p in zip(input_size, kernel_size, stride, padding, strict=True)
        )
        self.positions = PositionLinearOp(self.output_size)

    def forward(self, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        return _to_image(self.positions.forward(patches(x, self), weight, bias), self.output_size)

    def input_grad(self, grad_out: Tensor, matrix: Tensor, x: Tensor) -> Tensor:
        return fold_patches(self.positions.input_grad(_by_position(grad_out), matrix, x), self)

    def param_grads(
        self, grad_out: Tensor, x: Tensor, weight: Tensor, need_weight: bool, need_bias: bool
    ) -> tuple[Tensor | None, Tensor | None]:
        cols = patches(x, self) if need_weight else x
        return self.positions.param_grads(_by_position(grad_out), cols, weight, need_weight, need_bias)


class UntiedConv2d(FALayer):
    """Locally connected 2-d convolution; `weight` (P, C*kh*kw, O), `bias` (O, out_h, out_w)."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | tuple[int, int],
        input_size: int | tuple[int, int],
        stride: int | tuple[int, int] = 1,
        padding: int | tuple[int, int] | str = 0,
        bias: bool = True,
        feedback: str | FeedbackRule = "random",
        *,
        device: Any = None,
        dtype: torch.dtype | None = None,
        **rule_options: Any,
    ) -> None:
        super().__init__()
        kernel, stride = _pair(kernel_size), _pair(stride)
        pad = _conv_padding(padding if isinstance(padding, str) else _pair(padding), kernel, (1, 1))
        self.in_channels, self.out_channels = in_channels, out_channels
        self._op = UntiedOp(kernel, stride, pad, _pair(input_size))
        positions = math.prod(self._op.output_size)
        if positions < 1:
            raise ValueError(f"UntiedConv2d: kernel {kernel} does not fit input {_pair(input_size)}")
        fan_in = in_channels * kernel[0] * kernel[1]
        factory = {"device": device, "dtype": dtype}
        self.weight = nn.Parameter(torch.empty(positions, fan_in, out_channels, **factory))
        self.register_parameter(
            "bias", nn.Parameter(torch.empty(out_channels, *self.output_size, **factory)) if bias else None
        )
        bound = 1.0 / math.sqrt(fan_in)  # nn.Conv2d's default init, per position
        with torch.no_grad():
            self.weight.uniform_(-bound, bound)
            if self.bias is not None:
                self.bias.uniform_(-bound, bound)
        self._attach_rule(feedback, rule_options, fan_in)

    @property
    def op(self) -> LayerOp:
        return self._op

    def feedback_forward(self, x: Tensor, feedback: Tensor) -> Tensor:
        """Patches once (one copy, saved for dW), then the shared FA Function over positions (bmm)."""
        if self.rule.own_input_grad():  # e.g. dfa, whose B is (outputs, C*H*W): the layer input as x
            return super().feedback_forward(x, feedback)
        op = self._op
        device = x.device.type
        if torch.is_autocast_enabled(device):
            x = x.to(torch.get_autocast_dtype(device))  # patches made once, in the dtype the bmm runs in
        cols = _Patches.apply(x, op) if x.requires_grad else patches(x, op)
        out = apply_feedback(cols, self.weight, self.bias, feedback, op.positions, self.rule, contiguous_grad=True)
        return _ToImage.apply(out, op.output_size)

    @property
    def output_size(self) -> tuple[int, ...]:
        """(out_h, out_w)."""
        return self._op.output_size

    def extra_repr(self) -> str:
        op = self._op
        return (
            f"{self.in_channels}, {self.out_channels}, kernel_size={op.kernel_size}, input_size={op.input_size}, "
            f"stride={op.stride}, padding={op.padding}, bias={self.bias is not None}"
        )

    @classmethod
    def from_conv2d(
        cls,
        conv: nn.Conv2d,
        input_size: int | tuple[int, int],
        feedback: str | FeedbackRule | None = None,
        **rule_options: Any,
    ) -> UntiedConv2d:
        """Untie a (trained) conv: every position starts with the conv's kernel, so outputs match it.

        `feedback` None: the conv's own rule if it is an FA layer, else `bp`.
        """
        if conv.groups != 1 or _pair(conv.dilation) != (1, 1) or conv.padding_mode != "zeros":
            raise ValueError("from_conv2d supports groups=1, dilation=1, padding_mode='zeros' only")
        if feedback is None:
            feedback = conv.rule if isinstance(conv, FALayer) else "bp"
        w = conv.weight.detach()
        untied = cls(
            conv.in_channels,
            conv.out_channels,
            conv.kernel_size,
            input_size,
            conv.stride,
            conv.padding,
            conv.bias is not None,
            feedback,
            device=w.device,
            dtype=w.dtype,
            **rule_options,
        )
        with torch.no_grad():
            untied.weight.copy_(w.reshape(w.shape[0], -1).t().expand_as(untied.weight))
            if untied.bias is not None and conv.bias is not None:
                untied.bias.copy_(conv.bias.detach()[:, None, None].expand_as(untied.bias))
        return untied
