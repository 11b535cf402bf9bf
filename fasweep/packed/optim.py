"""`StackedOptimizer`: the members' optimizers (Adam or SGD, as `fasweep.trial.make_optimizer` makes them) as one
elementwise update of the stacked tensors.

Adam and SGD are elementwise, so K of them over K slices are one update over the stack: member k's slice gets
the ops of torch's own single-tensor Adam/SGD in the same order, with its own lr and step count (members that
agree in them share each op), or for a fused Adam (`make_optimizer`'s) torch's fused kernel on each member's
slice as a tensor of its own, which gives it bitwise what its own optimizer would (`tests/test_pack.py` checks
against K `torch.optim` instances). The members' torch optimizers stay the holders of their hyperparameters and
lr (their schedulers move it) and of the `state_dict` format; their own state is moved into the stack.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from fasweep.errors import UserError
from fasweep.nn.step import update_overflows

_ADAM = {"amsgrad": False, "maximize": False, "decoupled_weight_decay": False}
_SGD = {"dampening": 0, "maximize": False}


def _runs(values: Sequence[Any]) -> list[tuple[slice, Any]]:
    """Runs of consecutive members with equal `values`: the stack's rows and their value (one run when all agree)."""
    out: list[tuple[slice, Any]] = []
    start = 0
    for k in range(1, len(values) + 1):
        if k == len(values) or values[k] != values[start]:
            out.append((slice(start, k), values[start]))
            start = k
    return out


def _hyperparameters(optimizer: torch.optim.Optimizer) -> list[dict[str, Any]]:
    """Each param group's settings but its params, lr and kernel choice (`fused`: each member keeps its own)."""
    skip = ("params", "lr", "initial_lr", "fused")
    return [{k: v for k, v in g.items() if k not in skip} for g in optimizer.param_groups]


class StackedOptimizer:
    """K torch optimizers of one kind and hyperparameters (lr aside) over the stacked tensors of a `PackedNet`."""

    def __init__(self, optimizers: Sequence[torch.optim.Optimizer], models: Sequence[nn.Module], device: Any):
        self.optimizers = list(optimizers)
        first = self.optimizers[0]
        self.adam = isinstance(first, torch.optim.Adam)
        # torch's fused Adam kernel or its single-tensor ops, per member: a checkpoint written before
        # `make_optimizer` chose the fused kernel resumes with the optimizer it was saved with
        self.fused = [self.adam and bool(o.param_groups[0].get("fused")) for o in self.optimizers]
        fixed = _ADAM if self.adam else _SGD
        if not isinstance(first, torch.optim.Adam | torch.optim.SGD) or any(
            g.get(key, value) != value for g in first.param_groups for key, value in fixed.items()
        ):
            raise UserError.field("train.optimizer", type(first).__name__, "adam or sgd as make_optimizer builds them")
        self.hyper = _hyperparameters(first)
        if any(_hyperparameters(o) != self.hyper for o in self.optimizers):
            raise UserError("a pack needs members whose optimizers differ in lr only")
        self.groups: list[list[str]] = []
        for model, opt in zip(models, self.optimizers, strict=True):
            names = {id(p): n for n, p in model.named_parameters()}
            groups = [[names[id(p)] for p in g["params"]] for g in opt.param_groups]
            if self.groups and groups != self.groups:
                raise UserError("a pack needs members with the same parameter groups")
            self.groups = groups
        keys = ("exp_avg", "exp_avg_sq") if self.adam else ("momentum_buffer",) if self._momentum else ()
        self.steps = [self._steps(opt) for opt in self.optimizers]
        params = [[p for g in opt.param_groups for p in g["params"]] for opt in self.optimizers]
        self.state: dict[str, dict[str, Tensor]] = {}
        self.scratch: dict[tuple[int, torch.dtype, torch.device], Tensor] = {}
        for i, name in enumerate(n for names in self.groups for n in names):
            self.state[name] = {
                key: torch.stack(
                    [
                        opt.state[ps[i]][key] if key in opt.state.get(ps[i], {}) else torch.zeros_like(ps[i])
                        for opt, ps in zip(self.optimizers, params, strict=True)
                    ]
                ).to(device)
                for key in keys
            }
        for opt in self.optimizers:
            opt.state.clear()  # moved into the stack

    @property
    def _momentum(self) -> bool:
        return any(h.get("momentum", 0) != 0 for h in self.hyper)

    @staticmethod
    def _steps(opt: torch.optim.Optimizer) -> int:
        """Steps taken so far (Adam's `step`; SGD: 1 once a momentum buffer exists), read from its state."""
        for state in opt.state.values():
            return int(state["step"]) if "step" in state else 1
        return 0

    def overflows(self) -> list[bool]:
        """Per member, whether its next step's scale overflows float32 (`update_overflows`): it diverges before it."""
        beta1 = [h["betas"][0] if self.adam else None for h in self.hyper]
        return [
            any(update_overflows(g["lr"], s + 1, b) for g, b in zip(opt.param_groups, beta1, strict=True))
            for opt, s in zip(self.optimizers, self.steps, strict=True)
        ]

    def select(self, keep: list[int]) -> None:
        """Keep only the members `keep` (in that order)."""
        self.optimizers = [self.optimizers[i] for i in keep]
        self.steps = [self.steps[i] for i in keep]
        self.fused = [self.fused[i] for i in keep]
        for state in self.state.values():
            for key, t in state.items():
                state[key] = t.index_select(0, torch.tensor(keep, device=t.device))

    def _scratch(self, like: Tensor, slot: int) -> Tensor:
        """Scratch space shaped as `like` (slot 0 or 1), kept across steps: on the CPU a fresh temporary of a
        stacked tensor's size is a fresh mmap, paid again in page faults at every step."""
        key, size = (slot, like.dtype, like.device), like.numel()
        if key not in self.scratch or self.scratch[key].numel() < size:
            self.scratch[key] = torch.empty(size, dtype=like.dtype, device=like.device)
        return self.scratch[key][:size].view(like.shape)

    @torch.no_grad()
    def step(self, tensors: dict[str, Tensor]) -> None:
        """One step of every member's optimizer on the grads of `tensors` (all members take a step)."""
        self.steps = [s + 1 for s in self.steps]
        for g, (names, hyper) in enumerate(zip(self.groups, self.hyper, strict=True)):
            lrs = [opt.param_groups[g]["lr"] for opt in self.optimizers]
            for name in names:
                p = tensors[name]
                if p.grad is None:
                    continue
                if not self.adam:
                    self._sgd(p, p.grad, self.state[name], lrs, hyper)
                    continue
                for rows, fused in _runs(self.fused):
                    state = {key: t[rows] for key, t in self.state[name].items()}
                    adam = self._fused_adam if fused else self._adam
                    adam(p[rows], p.grad[rows], state, lrs[rows], self.steps[rows], hyper)

    def _adam(
        self, p: Tensor, grad: Tensor, state: dict[str, Tensor], lrs: list[float], steps: list[int], h: dict[str, Any]
    ) -> None:
        # torch.optim.adam._single_tensor_adam op for op, its temporaries in scratch space
        beta1, beta2 = h["betas"]
        if h["weight_decay"] != 0:
            grad = torch.add(grad, p, alpha=h["weight_decay"], out=self._scratch(p, 1))
        exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
        exp_avg.lerp_(grad, 1 - beta1)
        exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        denom = torch.sqrt(exp_avg_sq, out=self._scratch(p, 0))
        scalars = [(lr / (1 - beta1**s), (1 - beta2**s) ** 0.5) for lr, s in zip(lrs, steps, strict=True)]
        for rows, (step_size, bias_correction2_sqrt) in _runs(scalars):
            denom[rows].div_(bias_correction2_sqrt).add_(h["eps"])
            p[rows].addcdiv_(exp_avg[rows], denom[rows], value=-step_size)

    @staticmethod
    def _fused_adam(
        p: Tensor, grad: Tensor, state: dict[str, Tensor], lrs: list[float], steps: list[int], h: dict[str, Any]
    ) -> None:
        # torch.optim.adam._fused_adam: one kernel call per run of members with one lr, each member's slice a
        # tensor of its own (the kernel's vector loop and scalar tail then split it as they do the trial's)
        beta1, beta2 = h["betas"]
        for rows, lr in _runs(lrs):
            members = range(rows.start, rows.stop)
            torch._fused_adam_(
                [p[k] for k in members],
                [grad[k] for k in members],
                [state["exp_avg"][k] for k in members],
                [state["exp_avg_sq"][k] for k in members],
                [],
                [torch.tensor(float(steps[k]), device=p.device) for k in members],
                amsgrad=False,
                lr=lr,
                beta1=beta1,
                beta2=beta2,
                weight_decay=h["weight_decay"],
                eps=h["eps"],
                maximize=False,
            )

    def _sgd(self, p: Tensor, grad: Tensor, state: dict[str, Tensor], lrs: list[float], h: dict[str, Any]) -> None:
        # torch.optim.sgd._single_tensor_sgd; a fresh momentum buffer is zeros, so 0 * m + grad = torch's clone
        if h["weight_decay"] != 0:
            grad = torch.add(grad, p, alpha=h["weight_decay"], out=self._scratch(p, 1))
        if h["momentum"] != 0:
            buf = state["momentum_buffer"]
            buf.mul_(h["momentum"]).add_(grad, alpha=1)
            grad = torch.add(grad, buf, alpha=h["momentum"], out=self._scratch(p, 0)) if h["nesterov"] else buf
        for rows, lr in _runs(lrs):
            p[rows].add_(grad[rows], alpha=-lr)

    def member_state_dict(self, k: int) -> dict[str, Any]:
        """Member k's optimizer `state_dict()`, as its own torch optimizer would give it (tensors on the CPU)."""
        opt = self.optimizers[k]
        out = opt.state_dict()
        if self.steps[k] == 0:
            return out
        index = 0
        for names in self.groups:
            for name in names:
                entry = {key: t[k].detach().cpu().clone() for key, t in self.state[name].items()}
                if self.adam:
                    entry = {"step": torch.tensor(float(self.steps[k])), **entry}
                if entry:
                    out["state"][index] = entry
                index += 1
        return out
