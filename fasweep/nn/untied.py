"""`UntiedConv2d`: a locally connected (untied) convolution, one weight per output position, with FA.

Weights are stored as they are used, (out positions P, in_channels * kh * kw, out_channels): the real
parameter count, never the seed's dense mostly-zero (C*H*W, O*P) matrix. The layer input is copied once
per forward into a padded, batch-innermost (C, H+2p, W+2p, N) tensor (a blocked 2-d transpose), the only
tensor saved for backward. The shared FA Function then runs `PositionLinearOp` on it: for a few output
rows at a time, their patches (P_rows, C*kh*kw, N) are gathered by one strided copy (batch innermost on both
sides) and multiplied by their positions' W (`bmm`); the input gradient B G^T is summed back (col2im) per
output row and kernel column in the same layout. On the CPU the rows of a chunk are chosen so that their patches fit in
`CHUNK_BYTES`: they stay in cache between the copy and the product, and no patches tensor of the whole
layer (100 MB at PG-Untie's second layer) is made, saved or paid for in page faults at every step; on CUDA
one chunk holds every row. A rule with its own dL/dx (dfa: B sized by the layer input) and packs use
`UntiedOp`, the same kernels with the layer input as x.
"""

from __future__ import annotations

import math
import threading
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules.utils import _pair

from fasweep.nn.layers import FALayer, _conv_padding, apply_feedback
from fasweep.nn.rules import FeedbackRule, LayerOp

CHUNK_BYTES = 4 << 20  # patches per chunk of output rows on the CPU (measured: 1-4 MiB best at PG-Untie's sizes)
_SCRATCH = threading.local()  # per thread: {dtype: CPU buffer}, one chunk's patches or G B^T at a time


def _chunk_buffer(like: Tensor, shape: tuple[int, ...]) -> Tensor:
    """A buffer of `shape` for one chunk's patches or G B^T; on the CPU one kept across calls and chunks (a fresh
    one of some MiB is a fresh mmap, paid in page faults at every chunk)."""
    if like.device.type != "cpu":
        return like.new_empty(shape)
    buffers: dict[torch.dtype, Tensor] | None = getattr(_SCRATCH, "buffers", None)
    if buffers is None:
        buffers = _SCRATCH.buffers = {}
    size = math.prod(shape)
    if like.dtype not in buffers or buffers[like.dtype].numel() < size:
        buffers[like.dtype] = like.new_empty(size)
    return buffers[like.dtype][:size].view(shape)


def batch_innermost(x: Tensor, op: UntiedOp) -> Tensor:
    """(N, C, H, W) -> contiguous (C, H+2p, W+2p, N): the input zero-padded, batch innermost."""
    if tuple(x.shape[-2:]) != op.input_size:
        raise ValueError(f"UntiedConv2d built for input size {op.input_size}, got {tuple(x.shape[-2:])}")
    (ph, pw) = op.padding
    if ph or pw:
        x = F.pad(x, (pw, pw, ph, ph))
    n = x.shape[0]
    return x.contiguous().view(n, -1).t().contiguous().view(*x.shape[1:], n)


def unpad(padded: Tensor, op: UntiedOp) -> Tensor:
    """The adjoint of `batch_innermost`: (C, H+2p, W+2p, N) -> contiguous (N, C, H, W) without the padding."""
    (ph, pw), (h, w) = op.padding, op.input_size
    return padded[:, ph : ph + h, pw : pw + w].permute(3, 0, 1, 2).contiguous()


class _BatchInnermost(torch.autograd.Function):
    """`batch_innermost` with autograd: backward is `unpad` (the layer's input gradient, B already applied)."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, op: UntiedOp) -> Tensor:  # type: ignore[override]
        ctx.op = op
        return batch_innermost(x, op)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:  # type: ignore[override]
        return unpad(grad, ctx.op), None


class PositionLinearOp:
    """Position-wise linear maths on the padded batch-innermost input xt (C, H+2p, W+2p, N): W (P, C*kh*kw, O)
    maps the patch at output position p to O channels, out (P, N, O).

    The bias is stored (O, out_h, out_w) and enters as (P, 1, O). The input gradient G B^T comes back in xt's
    shape. G is expected contiguous (P, N, O).
    """

    def __init__(self, op: UntiedOp) -> None:
        self.kernel_size, self.stride, self.output_size = op.kernel_size, op.stride, op.output_size
        self.padded_size = tuple(n + 2 * p for n, p in zip(op.input_size, op.padding, strict=True))

    def _chunks(self, like: Tensor, batch: int, features: int) -> list[tuple[int, int, slice]]:
        """(first row, end row, their positions) of each chunk of output rows, for patches of like's kind."""
        oh, ow = self.output_size
        rows = oh
        if like.device.type == "cpu":
            rows = max(1, min(oh, CHUNK_BYTES // (ow * features * batch * like.element_size())))
        return [(r, min(oh, r + rows), slice(r * ow, min(oh, r + rows) * ow)) for r in range(0, oh, rows)]

    def _patches(self, xt: Tensor, r0: int, r1: int) -> Tensor:
        """Contiguous (positions of rows [r0, r1), C*kh*kw, N): one strided copy, batch innermost on both sides."""
        c, hp, wp, n = xt.shape
        (sh, sw), (kh, kw), ow = self.stride, self.kernel_size, self.output_size[1]
        view = xt.as_strided(
            (r1 - r0, ow, c, kh, kw, n),
            (sh * wp * n, sw * n, hp * wp * n, wp * n, n, 1),
            xt.storage_offset() + r0 * sh * wp * n,
        )
        cols = _chunk_buffer(xt, view.shape).copy_(view)
        return cols.view((r1 - r0) * ow, c * kh * kw, n)

    def forward(self, xt: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        device = xt.device.type
        if torch.amp.is_autocast_available(device) and torch.is_autocast_enabled(device):
            # a no-grad forward under autocast: cast as it would (the out= products below are not autocast's)
            dtype = torch.get_autocast_dtype(device)
            xt, weight, bias = xt.to(dtype), weight.to(dtype), None if bias is None else bias.to(dtype)
        out = xt.new_empty(weight.shape[0], xt.shape[-1], weight.shape[2])
        bias = None if bias is None else bias.reshape(bias.shape[0], -1).t().unsqueeze(1)
        for r0, r1, pos in self._chunks(xt, xt.shape[-1], weight.shape[1]):
            cols = self._patches(xt, r0, r1).transpose(1, 2)
            if bias is None:
                torch.bmm(cols, weight[pos], out=out[pos])
            else:
                torch.baddbmm(bias[pos], cols, weight[pos], out=out[pos])
        return out

    def input_grad(self, grad_out: Tensor, matrix: Tensor, x: Tensor) -> Tensor:
        """G B^T per chunk, (P_rows, C*kh*kw, N), summed onto xt's (C, H+2p, W+2p, N) per output row and kernel
        column (x unused)."""
        (kh, kw), (sh, sw), ow = self.kernel_size, self.stride, self.output_size[1]
        n, features = grad_out.shape[1], matrix.shape[1]
        total = grad_out.new_zeros(features // (kh * kw), *self.padded_size, n)
        for r0, r1, pos in self._chunks(grad_out, n, features):
            cols = _chunk_buffer(grad_out, ((r1 - r0) * ow, features, n))
            torch.bmm(matrix[pos], grad_out[pos].transpose(1, 2), out=cols)
            cols = cols.view(r1 - r0, ow, -1, kh, kw, n)
            for r in range(r0, r1):  # one output row's kh kernel rows land on kh distinct input rows: one add per j
                for j in range(kw):
                    rows, columns = slice(r * sh, r * sh + kh), slice(j, j + sw * (ow - 1) + 1, sw)
                    total[:, rows, columns].add_(cols[r - r0, :, :, :, j].permute(1, 2, 0, 3))
        return total

    def param_grads(
        self, grad_out: Tensor, x: Tensor, weight: Tensor, need_weight: bool, need_bias: bool
    ) -> tuple[Tensor | None, Tensor | None]:
        grad_w = None
        if need_weight:
            grad_w = grad_out.new_empty(weight.shape)
            for r0, r1, pos in self._chunks(x, x.shape[-1], weight.shape[1]):
                torch.bmm(self._patches(x, r0, r1), grad_out[pos], out=grad_w[pos])
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
    composes `batch_innermost`, `PositionLinearOp` and `unpad`, the very kernels the layer's autograd path runs.
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
        self.positions = PositionLinearOp(self)

    def forward(self, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        return _to_image(self.positions.forward(batch_innermost(x, self), weight, bias), self.output_size)

    def input_grad(self, grad_out: Tensor, matrix: Tensor, x: Tensor) -> Tensor:
        return unpad(self.positions.input_grad(_by_position(grad_out), matrix, x), self)

    def param_grads(
        self, grad_out: Tensor, x: Tensor, weight: Tensor, need_weight: bool, need_bias: bool
    ) -> tuple[Tensor | None, Tensor | None]:
        xt = batch_innermost(x, self) if need_weight else x
        return self.positions.param_grads(_by_position(grad_out), xt, weight, need_weight, need_bias)


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
        """The input batch innermost (one copy, saved for dW), then the shared FA Function over positions."""
        if self.rule.own_input_grad():  # e.g. dfa, whose B is (outputs, C*H*W): the layer input as x
            return super().feedback_forward(x, feedback)
        op = self._op
        device = x.device.type
        if torch.is_autocast_enabled(device):
            x = x.to(torch.get_autocast_dtype(device))  # copied once, in the dtype the bmm runs in
        xt = _BatchInnermost.apply(x, op) if x.requires_grad else batch_innermost(x, op)
        out = apply_feedback(xt, self.weight, self.bias, feedback, op.positions, self.rule, contiguous_grad=True)
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
