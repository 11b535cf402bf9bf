"""`UntiedConv2d`: a locally connected (untied) convolution, one weight per output position, with FA.

Weights are stored as they are used, (out positions P, in_channels * kh * kw, out_channels): the real
parameter count, never the seed's dense mostly-zero (C*H*W, O*P) matrix. Forward and backward are
`unfold` + batched matmul over positions; the input gradient sends G back through B with `fold`.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules.utils import _pair

from fasweep.nn.layers import FALayer, _conv_padding
from fasweep.nn.rules import FeedbackRule, LayerOp


class UntiedOp:
    """Locally connected maths: W[p] maps the unfolded patch at output position p to O channels."""

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

    def _unfold(self, x: Tensor) -> Tensor:
        if tuple(x.shape[-2:]) != self.input_size:
            raise ValueError(f"UntiedConv2d built for input size {self.input_size}, got {tuple(x.shape[-2:])}")
        cols = F.unfold(x, self.kernel_size, padding=self.padding, stride=self.stride)  # (N, C*k*k, P)
        return cols.permute(2, 0, 1)  # (P, N, C*k*k)

    def forward(self, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        out = torch.bmm(self._unfold(x), weight)  # (P, N, O)
        out = out.permute(1, 2, 0).reshape(x.shape[0], weight.shape[2], *self.output_size)
        return out if bias is None else out + bias

    def _grad_by_position(self, grad_out: Tensor) -> Tensor:
        return grad_out.reshape(grad_out.shape[0], grad_out.shape[1], -1).permute(2, 0, 1)  # (P, N, O)

    def input_grad(self, grad_out: Tensor, matrix: Tensor, x: Tensor) -> Tensor:
        cols = torch.bmm(self._grad_by_position(grad_out), matrix.transpose(1, 2))  # (P, N, C*k*k)
        return F.fold(cols.permute(1, 2, 0), x.shape[-2:], self.kernel_size, padding=self.padding, stride=self.stride)

    def param_grads(
        self, grad_out: Tensor, x: Tensor, weight: Tensor, need_weight: bool, need_bias: bool
    ) -> tuple[Tensor | None, Tensor | None]:
        grad_w = None
        if need_weight:
            grad_w = torch.bmm(self._unfold(x).transpose(1, 2), self._grad_by_position(grad_out))
        return grad_w, (grad_out.sum(0) if need_bias else None)


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
