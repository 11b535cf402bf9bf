"""`PackedNet`: the K nets of a pack (one architecture) as stacked tensors, run in one pass for all members.

`tensors[name][k]` is what `name` holds in member k's own `state_dict()`. Dense layers run as `baddbmm` over
(K, N, features). Images are (N, K*C, H, W), member k on channels [kC, (k+1)C): conv and untied layers run
batched (one grouped convolution, one batched matmul over (K, positions); CUDA's default) or as each member's
own op on its channels (the CPU's: faster there, and bitwise the trial alone, as bmm is for dense layers).
Pooling, activations and batch norm act per channel, so one call serves every member. Each layer's rules are a
`fasweep.nn.rules.RuleStack`: every member's own rule, its buffers slices of the stacked tensors, asked for B,
for dL/dx and around the optimizer step as the rule's class says (by default each member's own maths on its
slice); nothing here knows a rule by name. `optimizer_step` is `fasweep.nn.optimizer_step` (batch manhattan,
clipping, the rules' step hooks) for every member at once.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fasweep.errors import UserError
from fasweep.nn import FAConv2d, FALayer, FALinear, UntiedConv2d
from fasweep.nn.alignment import exact, layer_alignment
from fasweep.nn.layers import Conv2dOp, LinearOp, apply_feedback
from fasweep.nn.rules import RuleStack
from fasweep.nn.untied import UntiedOp
from fasweep.packed.optim import StackedOptimizer

Capture = dict[str, tuple[Tensor, Tensor | None]]  # FA layer name -> (its output, B used in the forward)
LossFn = Callable[[Tensor, Tensor], Tensor]


class _DenseOp:
    """Dense maths per member: x (K, N, in), W (K, out, in), b (K, out)."""

    member = LinearOp

    @staticmethod
    def split(grad_out: Tensor, x: Tensor, weight: Tensor) -> list[tuple[Tensor, Tensor]]:
        return list(zip(grad_out.unbind(0), x.unbind(0), strict=True))

    @staticmethod
    def join(grads: list[Tensor]) -> Tensor:
        return torch.stack(grads)

    @staticmethod
    def forward(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        wt = weight.transpose(1, 2)
        return torch.bmm(x, wt) if bias is None else torch.baddbmm(bias.unsqueeze(1), x, wt)

    @staticmethod
    def input_grad(grad_out: Tensor, matrix: Tensor, x: Tensor) -> Tensor:
        return torch.bmm(grad_out, matrix)

    @staticmethod
    def param_grads(
        grad_out: Tensor, x: Tensor, weight: Tensor, need_weight: bool, need_bias: bool
    ) -> tuple[Tensor | None, Tensor | None]:
        grad_w = torch.bmm(grad_out.transpose(1, 2), x) if need_weight else None
        return grad_w, (grad_out.sum(1) if need_bias else None)


class _Channels:
    """Image layers: member k on channels [kC, (k+1)C) of (N, K*C, H, W); `base` (`member`) is its op alone.
    `split` hands each member its G and x in the memory layout they have alone, `join` stacks its dL/dx back."""

    base: Any

    @property
    def member(self) -> Any:
        return self.base

    @staticmethod
    def _split(t: Tensor, members: int) -> list[Tensor]:
        return [c.contiguous() for c in t.chunk(members, 1)]

    def _split_grad(self, grad_out: Tensor, x: Tensor, weight: Tensor) -> list[Tensor]:
        """grad_out per member, strided as the layer's own output (autograd hands it so to the layer alone)."""
        k = len(weight)
        alone = self.base.forward(x.chunk(k, 1)[0].to("meta"), weight[0].to("meta"), None)
        return [torch.empty_strided(alone.shape, alone.stride(), dtype=g.dtype).copy_(g) for g in grad_out.chunk(k, 1)]

    def split(self, grad_out: Tensor, x: Tensor, weight: Tensor) -> list[tuple[Tensor, Tensor]]:
        return list(zip(self._split_grad(grad_out, x, weight), self._split(x, len(weight)), strict=True))

    @staticmethod
    def join(grads: list[Tensor]) -> Tensor:
        return torch.cat(grads, 1)


class _ConvOp(_Channels):
    """Conv maths of all members as one convolution with K times the groups; W (K, O, C, kh, kw)."""

    def __init__(self, base: Conv2dOp) -> None:
        self.base = base

    def _op(self, members: int) -> Conv2dOp:
        b = self.base
        return Conv2dOp(tuple(b.stride), tuple(b.padding), tuple(b.dilation), b.groups * members)

    def forward(self, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        return self._op(len(weight)).forward(x, weight.flatten(0, 1), None if bias is None else bias.flatten())

    def input_grad(self, grad_out: Tensor, matrix: Tensor, x: Tensor) -> Tensor:
        return self._op(len(matrix)).input_grad(grad_out, matrix.flatten(0, 1), x)

    def param_grads(
        self, grad_out: Tensor, x: Tensor, weight: Tensor, need_weight: bool, need_bias: bool
    ) -> tuple[Tensor | None, Tensor | None]:
        op = self._op(len(weight))
        grad_w, grad_b = op.param_grads(grad_out, x, weight.flatten(0, 1), need_weight, need_bias)
        return (
            None if grad_w is None else grad_w.view_as(weight),
            None if grad_b is None else grad_b.view(len(weight), -1),
        )


class _UntiedOp(_Channels):
    """Untied maths per member (`fasweep.nn.untied.UntiedOp` with a leading K): W (K, P, C*kh*kw, O)."""

    def __init__(self, base: UntiedOp) -> None:
        self.base = base

    def _unfold(self, x: Tensor, members: int) -> Tensor:
        b = self.base
        cols = F.unfold(x, b.kernel_size, padding=b.padding, stride=b.stride)  # (N, K*C*kh*kw, P)
        return cols.view(x.shape[0], members, -1, cols.shape[-1]).permute(1, 3, 0, 2)  # (K, P, N, C*kh*kw)

    @staticmethod
    def _by_position(grad_out: Tensor, members: int) -> Tensor:
        n = grad_out.shape[0]
        return grad_out.reshape(n, members, grad_out.shape[1] // members, -1).permute(1, 3, 0, 2)  # (K, P, N, O)

    def forward(self, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        k = len(weight)
        out = torch.matmul(self._unfold(x, k), weight)  # (K, P, N, O)
        out = out.permute(2, 0, 3, 1).reshape(x.shape[0], k * weight.shape[-1], *self.base.output_size)
        return out if bias is None else out + bias.flatten(0, 1)

    def input_grad(self, grad_out: Tensor, matrix: Tensor, x: Tensor) -> Tensor:
        b, k = self.base, len(matrix)
        cols = torch.matmul(self._by_position(grad_out, k), matrix.transpose(2, 3))  # (K, P, N, C*kh*kw)
        positions = cols.shape[1]
        cols = cols.permute(2, 0, 3, 1).reshape(x.shape[0], -1, positions)  # (N, K*C*kh*kw, P)
        return F.fold(cols, x.shape[-2:], b.kernel_size, padding=b.padding, stride=b.stride)

    def param_grads(
        self, grad_out: Tensor, x: Tensor, weight: Tensor, need_weight: bool, need_bias: bool
    ) -> tuple[Tensor | None, Tensor | None]:
        k = len(weight)
        grad_w = None
        if need_weight:
            grad_w = torch.matmul(self._unfold(x, k).transpose(2, 3), self._by_position(grad_out, k))
        grad_b = grad_out.sum(0).view(k, -1, *grad_out.shape[2:]) if need_bias else None
        return grad_w, grad_b


class _PerMember(_Channels):
    """A conv or untied layer's own op (`layer.op`) called once per member on its channels, in the memory
    layout it has alone: each member gets bitwise what it gets alone. The CPU's choice: there oneDNN's grouped
    convolution is 1.2-1.7x slower than K convolutions at PG0's sizes, and these layers are compute-bound."""

    def __init__(self, base: Any) -> None:
        self.base = base

    def forward(self, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        xs = self._split(x, len(weight))
        biases = [None] * len(weight) if bias is None else list(bias)
        return torch.cat([self.base.forward(xi, w, b) for xi, w, b in zip(xs, weight, biases, strict=True)], 1)

    def input_grad(self, grad_out: Tensor, matrix: Tensor, x: Tensor) -> Tensor:
        gs, xs = self._split_grad(grad_out, x, matrix), self._split(x, len(matrix))
        return torch.cat([self.base.input_grad(g, m, xi) for g, m, xi in zip(gs, matrix, xs, strict=True)], 1)

    def param_grads(
        self, grad_out: Tensor, x: Tensor, weight: Tensor, need_weight: bool, need_bias: bool
    ) -> tuple[Tensor | None, Tensor | None]:
        gs, xs = self._split_grad(grad_out, x, weight), self._split(x, len(weight))
        grads = [
            self.base.param_grads(g, xi, w, need_weight, need_bias) for g, xi, w in zip(gs, xs, weight, strict=True)
        ]
        grad_w, grad_b = zip(*grads, strict=True)
        return (torch.stack(grad_w) if need_weight else None), (torch.stack(grad_b) if need_bias else None)


class _FALayer:
    """One FA layer of every member: stacked W and b, and the members' rules as a `RuleStack`."""

    def __init__(
        self,
        name: str,
        layers: Sequence[FALayer],
        batched: bool,
        tensors: dict[str, Tensor],
        generators: Sequence[torch.Generator],
    ) -> None:
        self.name = name
        first = layers[0]
        self.image = not isinstance(first, FALinear)
        if isinstance(first, FALinear):
            self.op: Any = _DenseOp()  # bmm: on the CPU bitwise what the trial alone gets, and fast
        elif not batched:
            self.op = _PerMember(first.op)
        elif isinstance(first, FAConv2d):
            self.op = _ConvOp(first.op)
        else:
            self.op = _UntiedOp(first.op)
        self.rules = RuleStack([layer.rule for layer in layers], self._buffers(tensors), generators)

    def _buffers(self, tensors: dict[str, Tensor]) -> dict[str, Tensor]:
        """The stacked buffers of this layer's rules, by their names in the rule."""
        prefix = f"{self.name}.rule."
        return {n.removeprefix(prefix): t for n, t in tensors.items() if n.startswith(prefix)}

    def select(self, keep: list[int], tensors: dict[str, Tensor]) -> None:
        self.rules = self.rules.select(keep, self._buffers(tensors))

    def forward(self, net: PackedNet, x: Tensor, capture: Capture | None) -> Tensor:
        weight, bias = net.tensors[f"{self.name}.weight"], net.tensors.get(f"{self.name}.bias")
        if not torch.is_grad_enabled() or not (x.requires_grad or weight.requires_grad):
            out, matrix = self.op.forward(x, weight, bias), None
        else:
            # B only matters when dL/dx is wanted (not for a first layer fed with data)
            matrix = self.rules.matrix(weight) if x.requires_grad else None
            feedback = weight.detach() if matrix is None else matrix
            # G made contiguous (e.g. after a batch norm's layout change): sums in the order of a member alone
            out = apply_feedback(x, weight, bias, feedback, self.op, self.rules, contiguous_grad=True)
        if capture is not None:
            capture[self.name] = (out, matrix)
        return out

    def member(self, t: Tensor, k: int, members: int) -> Tensor:
        """Member k's part of a stacked output of this layer, in the layout of its own net."""
        return t.unflatten(1, (members, -1))[:, k] if self.image else t[k]


class _BatchNorm:
    """Batch norm of every member: one call over K*C channels (running stats and counts per member)."""

    def __init__(self, name: str, module: nn.modules.batchnorm._BatchNorm) -> None:
        if module.momentum is None or not module.affine or not module.track_running_stats:
            raise UserError.field(name, str(module), "batch norm with momentum, affine and running stats")
        self.name, self.eps, self.momentum = name, module.eps, module.momentum
        self.image = isinstance(module, nn.BatchNorm2d)

    def forward(self, net: PackedNet, x: Tensor, capture: Capture | None) -> Tensor:
        t = {p: net.tensors[f"{self.name}.{p}"] for p in ("weight", "bias", "running_mean", "running_var")}
        if net.training:
            net.tensors[f"{self.name}.num_batches_tracked"].add_(1)
        flat = not self.image
        if flat:  # (K, N, F) -> (N, K*F)
            x = x.transpose(0, 1).flatten(1)
        y = F.batch_norm(
            x,
            t["running_mean"].view(-1),
            t["running_var"].view(-1),
            t["weight"].flatten(),
            t["bias"].flatten(),
            net.training,
            self.momentum,
            self.eps,
        )
        return y.unflatten(1, (len(t["weight"]), -1)).transpose(0, 1).contiguous() if flat else y


class _Flatten:
    """(N, K*C, H, W) -> (K, N, C*H*W): each member's images flattened as `nn.Flatten` does."""

    def forward(self, net: PackedNet, x: Tensor, capture: Capture | None) -> Tensor:
        return x.reshape(x.shape[0], net.members, -1).transpose(0, 1).contiguous()


class _PerChannel:
    """A module that acts per channel or per element (pooling, activations): applied to the stack as is."""

    def __init__(self, module: nn.Module) -> None:
        self.module = module

    def forward(self, net: PackedNet, x: Tensor, capture: Capture | None) -> Tensor:
        return self.module(x)


_PER_CHANNEL = (nn.MaxPool2d, nn.AvgPool2d, nn.ReLU, nn.Tanh)
_Layer = _FALayer | _BatchNorm | _Flatten | _PerChannel


def _packed_layer(
    name: str,
    modules: Sequence[nn.Module],
    batched: bool,
    tensors: dict[str, Tensor],
    generators: Sequence[torch.Generator],
) -> _Layer:
    module = modules[0]
    if isinstance(module, FALinear | FAConv2d | UntiedConv2d):
        return _FALayer(name, [cast(FALayer, m) for m in modules], batched, tensors, generators)
    if isinstance(module, nn.BatchNorm1d | nn.BatchNorm2d):
        return _BatchNorm(name, module)
    if isinstance(module, nn.Flatten):
        return _Flatten()
    if isinstance(module, _PER_CHANNEL):
        return _PerChannel(module)
    raise UserError.field(name, type(module).__name__, "layers a pack can fuse (FA dense/conv/untied, pool, bn)")


class PackedNet:
    """K `nn.Sequential` nets of one architecture (as `fasweep.models.build_model` makes them) as one fused model.

    `generators[k]` draws member k's rules' per-step draws (its global RNG in a trial of its own);
    `batched`: conv and untied layers as one call for all members (grouped convolution, batched matmul) rather
    than one per member (`_PerMember`); None: on CUDA.
    """

    def __init__(
        self,
        models: Sequence[nn.Module],
        device: torch.device,
        generators: Sequence[torch.Generator] | None = None,
        batched: bool | None = None,
    ) -> None:
        template = models[0]
        names = [name for name, _ in template.named_children()]
        if any([n for n, _ in m.named_children()] != names for m in models):
            raise UserError("a pack needs members of one architecture")
        batched = device.type == "cuda" if batched is None else batched
        states = [m.state_dict() for m in models]
        self.tensors: dict[str, Tensor] = {n: torch.stack([s[n] for s in states]).to(device) for n in states[0]}
        self.trainable = [n for n, p in template.named_parameters() if p.requires_grad]
        for n in self.trainable:
            self.tensors[n].requires_grad_(True)
        self.generators = list(generators or [torch.Generator(device) for _ in models])
        self.layers = [
            _packed_layer(n, [m.get_submodule(n) for m in models], batched, self.tensors, self.generators)
            for n in names
        ]
        self.flat_input = isinstance(self.layers[0], _FALayer) and not self.layers[0].image
        self.training = True

    @property
    def members(self) -> int:
        return len(next(iter(self.tensors.values())))

    def fa_layers(self) -> list[_FALayer]:
        return [layer for layer in self.layers if isinstance(layer, _FALayer)]

    def forward(self, x: Tensor, capture: Capture | None = None) -> Tensor:
        """The members' outputs (K, N, outputs) for stacked inputs (`stack_inputs`/`shared_input`)."""
        for layer in self.layers:
            x = layer.forward(self, x, capture)
        return x

    __call__ = forward

    def stack_inputs(self, xs: Sequence[Tensor]) -> Tensor:
        """One batch per member -> the fused input: (K, N, D) for flat data, (N, K*C, H, W) for images."""
        return torch.stack(list(xs)) if self.flat_input else torch.stack(list(xs), 1).flatten(1, 2)

    def shared_input(self, x: Tensor) -> Tensor:
        """The same batch for every member (evaluation, alignment probe)."""
        k = self.members
        if self.flat_input:
            return x.unsqueeze(0).expand(k, *x.shape)
        return x.unsqueeze(1).expand(x.shape[0], k, *x.shape[1:]).flatten(1, 2)

    def select(self, keep: list[int]) -> None:
        """Keep only the members `keep` (in that order); their tensors, grads and options follow."""
        index = torch.tensor(keep, device=next(iter(self.tensors.values())).device)
        for name, t in self.tensors.items():
            new = t.detach().index_select(0, index).requires_grad_(t.requires_grad)
            if t.grad is not None:
                new.grad = t.grad.index_select(0, index)
            self.tensors[name] = new
        for layer in self.fa_layers():
            layer.select(keep, self.tensors)
        self.generators = [self.generators[i] for i in keep]

    @torch.no_grad()
    def write_member(self, k: int, model: nn.Module) -> None:
        """Copy member k's tensors into `model` (a net of the same architecture, on any device)."""
        for name, t in model.state_dict().items():
            t.copy_(self.tensors[name][k])

    def _stepped(self, optimizer: StackedOptimizer) -> list[tuple[_FALayer, Tensor]]:
        """The FA layers whose W the optimizer moves, with W, in the members' optimizer order (their rules' step
        hooks then run, and draw, in the order they do alone)."""
        layers = {f"{layer.name}.weight": layer for layer in self.fa_layers()}
        order = [name for group in optimizer.groups for name in group if name in layers]
        return [(layers[name], self.tensors[name]) for name in order]

    @torch.no_grad()
    def optimizer_step(
        self,
        optimizer: StackedOptimizer,
        *,
        batch_manhattan: Sequence[bool],
        weight_clip: Sequence[float | None],
    ) -> None:
        """`fasweep.nn.optimizer_step` for every member: sign(grads) where asked, the rules' `before_step`, the
        step, clipping to each member's (-c, c), the rules' `after_step`."""
        trainable = [self.tensors[n] for n in self.trainable]
        if any(batch_manhattan):
            mask = torch.tensor(batch_manhattan, device=trainable[0].device)
            for p in trainable:
                if p.grad is not None:
                    p.grad.copy_(torch.where(mask.view(-1, *[1] * (p.dim() - 1)), p.grad.sign(), p.grad))
        stepped = self._stepped(optimizer)
        for layer, w in stepped:
            layer.rules.before_step(w)
        optimizer.step(self.tensors)
        if any(c is not None for c in weight_clip):
            self._clip(weight_clip)
        for layer, w in stepped:
            layer.rules.after_step(w)

    def _clip(self, weight_clip: Sequence[float | None]) -> None:
        """`fasweep.nn.clip_weights`: every dense/conv/untied weight (frozen ones too) into member k's [-c, c]."""
        bounds = [float("inf") if c is None else c for c in weight_clip]
        for layer in self.fa_layers():
            w = self.tensors[f"{layer.name}.weight"]
            if len(set(bounds)) == 1:
                w.clamp_(-bounds[0], bounds[0])
            else:
                c = torch.tensor(bounds, dtype=w.dtype, device=w.device).view(-1, *[1] * (w.dim() - 1))
                w.clamp_(-c, c)

    def alignment(self, x: Tensor, y: Tensor, loss_fn: LossFn, members: Sequence[int]) -> list[dict[str, float]]:
        """`fasweep.nn.alignment` for the members `members` (stack indices) on the probe batch (x, y), one pass.

        Eval mode; the rules' per-step draws come from copies of the members' generators (theirs are left as
        they are).
        """
        layers = [layer for layer in self.fa_layers() if f"{layer.name}.weight" in self.trainable]
        if not layers:
            return [{} for _ in members]
        training, self.training = self.training, False
        weights = [self.tensors[f"{layer.name}.weight"] for layer in layers]
        stacks = [layer.rules for layer in self.fa_layers()]
        forked = [g.clone_state() for g in self.generators]  # as alignment's fork_rng
        try:
            for stack in stacks:
                stack.use_generators(forked)
            with torch.enable_grad():
                capture: Capture = {}
                loss = torch.stack([loss_fn(o, y) for o in self.forward(self.shared_input(x), capture)]).sum()
                targets = weights + [capture[layer.name][0] for layer in layers]
                fa = torch.autograd.grad(loss, targets, retain_graph=True, allow_unused=True)
                with exact(stacks):
                    bp = torch.autograd.grad(loss, targets, allow_unused=True)
            # a layer whose forward drew no B (a first layer) draws it now, from the forked generators too
            feedback = {
                layer.name: layer.rules.matrix(w) if capture[layer.name][1] is None else capture[layer.name][1]
                for layer, w in zip(layers, weights, strict=True)
            }
        finally:
            self.training = training
            for stack in stacks:
                stack.use_generators(self.generators)
        n, K = len(layers), self.members
        results = []
        for k in members:
            metrics: dict[str, float] = {}
            for i, layer in enumerate(layers):
                fa_out, bp_out = fa[n + i], bp[n + i]
                metrics |= layer_alignment(
                    layer.name,
                    None if fa[i] is None else fa[i][k],
                    None if bp[i] is None else bp[i][k],
                    None if fa_out is None else layer.member(fa_out, k, K),
                    None if bp_out is None else layer.member(bp_out, k, K),
                    feedback[layer.name][k],
                    weights[i][k],
                )
            results.append(metrics)
        return results
