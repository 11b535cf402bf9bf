"""Feedback rules: how a layer's feedback matrix B is made, and how the input gradient uses it.

A rule is one small `nn.Module` owned by one layer (its buffers travel in the layer's state_dict).
Every layer kind (dense, conv, untied) takes the same rules; the layer only supplies the maths of
"send G back through a matrix shaped like W" (`op.input_grad`). dL/dW and dL/db are never touched.
Rule names, their options and the options' checks live in `fasweep.rule_options` (torch-free, shared
with the spec validator); each rule here is keyed by its name there.

Random draws: a rule seeded with `seed_streams(seed, layer)` (as `fasweep.models` does for every layer it
builds) draws its B, sign mask and fixed magnitudes from streams of its own, each seeded by (seed, layer,
purpose), never from the global RNG: the forward weights W of a net then depend only on the seed and the layer
shapes, not on which rule each layer uses, so trials of one seed pair across rules. An unseeded rule draws from
the global RNG. batch_random's per-batch magnitudes always come from the global RNG (the trial's, checkpointed).

Scales: with `init_scale=None`, random B is drawn from W's own init, U(-1/sqrt(fan_in), 1/sqrt(fan_in));
sign-concordant magnitudes use sigma = init_scale or that distribution's std, 1/sqrt(3 fan_in), so
the RMS of B equals the RMS of a freshly initialised W for every magnitude option.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable
from typing import Any, ClassVar, Protocol

import torch
from torch import Tensor, nn
from torch.optim.optimizer import Optimizer, register_optimizer_step_post_hook, register_optimizer_step_pre_hook
from torch.utils.weak import WeakIdKeyDictionary

from fasweep.errors import UserError
from fasweep.rule_options import OPTIONS, RULE_OPTIONS, Magnitude, require_option


def stream_seed(seed: int, layer: int, purpose: str) -> int:
    """The seed of one random draw of a rule: layer `layer`'s `purpose` ("B", "signs", ...) in the trial of `seed`."""
    digest = hashlib.blake2b(f"fasweep/{seed}/{layer}/{purpose}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


class LayerOp(Protocol):
    """The maths of one layer kind; `input_grad` sends G back through any matrix shaped like W (x: the input)."""

    def forward(self, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor: ...

    def input_grad(self, grad_out: Tensor, matrix: Tensor, x: Tensor) -> Tensor: ...

    def param_grads(
        self, grad_out: Tensor, x: Tensor, weight: Tensor, need_weight: bool, need_bias: bool
    ) -> tuple[Tensor | None, Tensor | None]: ...


class FeedbackRule(nn.Module):
    """Base rule. Subclasses set `mode`, override `matrix` (B for this step), and optionally `input_grad`.

    Keyword options are those `RULE_OPTIONS[mode]` lists, each checked by `fasweep.rule_options`.
    """

    mode: ClassVar[str]
    init_scale: float | None = None

    def __init__(self, **options: Any) -> None:
        super().__init__()
        names = RULE_OPTIONS[self.mode]
        unknown = sorted(set(options) - set(names))
        if unknown:
            raise TypeError(f"the {self.mode} rule takes options {list(names)}, not {unknown}")
        for name in names:
            setattr(self, name, require_option(name, options.get(name, OPTIONS[name].default)))
        self.fan_in = 0
        self.bound = False
        self.exact = False  # set by `exact_backprop`: behave as bp
        self.last: Tensor | None = None  # B used by the last gradient-carrying forward
        self.stream: tuple[int, int] | None = None  # (seed, layer) of `seed_streams`; None: the global RNG

    def options(self) -> dict[str, Any]:
        """Constructor keyword options, to make an unbound copy of this rule."""
        return {name: getattr(self, name) for name in RULE_OPTIONS[self.mode]}

    def unbound_copy(self) -> FeedbackRule:
        """A fresh rule with the same options (a rule belongs to one layer)."""
        return type(self)(**self.options())

    def seed_streams(self, seed: int, layer: int) -> FeedbackRule:
        """Draw this rule's random tensors from streams of (seed, layer, purpose) instead of the global RNG."""
        self.stream = (seed, layer)
        return self

    def generator(self, purpose: str) -> torch.Generator | None:
        """A CPU generator for one draw (`purpose`) of this rule, or None (the global RNG) for an unseeded rule."""
        if self.stream is None:
            return None
        return torch.Generator().manual_seed(stream_seed(*self.stream, purpose))

    def bind(self, weight: Tensor, fan_in: int) -> None:
        """Attach to a layer's weight: draw whatever B needs (called once by the layer)."""
        self.fan_in = fan_in
        self.bound = True

    def draw(self, like: Tensor, purpose: str, fill: Callable[[Tensor, torch.Generator | None], Tensor]) -> Tensor:
        """`fill(empty tensor shaped like `like`, generator)` from this rule's `purpose` stream, on like's device."""
        g = None if like.is_meta else self.generator(purpose)
        out = torch.empty(like.shape, dtype=like.dtype, device=like.device if g is None else "cpu")
        return fill(out, g).to(like.device)

    def draw_like_init(self, weight: Tensor, purpose: str = "B") -> Tensor:
        """A tensor shaped like `weight` from N(0, init_scale), or W's init U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
        if self.init_scale is not None:
            return self.draw(weight, purpose, lambda t, g: t.normal_(0.0, self.init_scale, generator=g))
        bound = 1.0 / math.sqrt(self.fan_in)
        return self.draw(weight, purpose, lambda t, g: t.uniform_(-bound, bound, generator=g))

    def matrix(self, weight: Tensor) -> Tensor:
        """B to send the gradient back through, for the forward pass about to run."""
        raise NotImplementedError

    def feedback_for_forward(self, weight: Tensor) -> Tensor:
        """B for a gradient-carrying forward; remembered as `last` (what `layer.feedback_weight` shows)."""
        with torch.no_grad():
            b = weight.detach() if self.exact else self.matrix(weight.detach())
        self.last = b
        return b

    def input_grad(self, op: LayerOp, grad_out: Tensor, weight: Tensor, feedback: Tensor, x: Tensor) -> Tensor:
        """dL/dx as this rule defines it: G sent back through B (W under `exact_backprop`)."""
        return op.input_grad(grad_out, weight if self.exact else feedback, x)

    def track(self, weight: Tensor) -> None:
        """Called by the layer with its weight when copied or unpickled and at every gradient-carrying forward."""

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self.options().items())

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:  # type: ignore[no-untyped-def]
        # lazily shaped buffers (DFA's B before its first backward) take the saved shape
        for name, buf in self._buffers.items():
            saved = state_dict.get(prefix + name)
            if buf is not None and saved is not None and saved.shape != buf.shape:
                self._buffers[name] = torch.empty(saved.shape, dtype=buf.dtype, device=buf.device)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


class Backprop(FeedbackRule):
    """`bp`: B is W itself, exact backpropagation."""

    mode = "bp"

    def matrix(self, weight: Tensor) -> Tensor:
        return weight


class RandomFeedback(FeedbackRule):
    """`random` (Lillicrap et al. 2016): a fixed random B, drawn once, kept as a buffer."""

    mode = "random"

    def bind(self, weight: Tensor, fan_in: int) -> None:
        super().bind(weight, fan_in)
        self.register_buffer("B", self.draw_like_init(weight.detach()))

    def matrix(self, weight: Tensor) -> Tensor:
        return self.B


class UpdatedRandomFeedback(RandomFeedback):
    """`random_updated` (R*): random B that receives exactly W's update at every optimizer step.

    Whatever calls `optimizer.step()` (any `torch.optim.Optimizer`; `fasweep.nn.optimizer_step` too), global
    optimizer step hooks (below) snapshot this layer's W before the step and add W_after - W_before to B
    after it. With `decay` > 0 both W and B then shrink by (1 - decay) (Kolen-Pollack): B - W decays to 0.
    """

    mode = "random_updated"
    decay: float

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        self._before: Tensor | None = None  # W at the start of the optimizer step under way

    def bind(self, weight: Tensor, fan_in: int) -> None:
        super().bind(weight, fan_in)
        self.track(weight)

    def track(self, weight: Tensor) -> None:
        # also from a copied or unpickled layer, and at every eager forward (a replaced Parameter is found again);
        # a compiled forward skips it (dynamo would break the graph on the map)
        if not torch.compiler.is_compiling() and _FOLLOWED.get(weight) is not self:
            _FOLLOWED[weight] = self

    @torch.no_grad()
    def before_step(self, weight: Tensor) -> None:
        """Remember W before the optimizer moves it."""
        self._before = weight.detach().clone()

    @torch.no_grad()
    def after_step(self, weight: Tensor) -> None:
        """B += W_after - W_before, then the decay; nothing when no step of this weight began."""
        if self._before is None:
            return
        self.B.sub_(self._before).add_(weight)
        self._before = None
        if self.decay:
            self.B.mul_(1.0 - self.decay)
            weight.mul_(1.0 - self.decay)


# --- R* under any optimizer: global step hooks -------------------------------------------------------
# The map is filled by the rules themselves (`track`) and holds weights weakly. The post-hook runs
# after an optimizer's own post-hooks (torch calls those first), so `optimizer_step`'s clipping is part of
# the change B receives.
_FOLLOWED: WeakIdKeyDictionary = WeakIdKeyDictionary()  # an R* layer's weight -> its rule


def _followed_in(optimizer: Optimizer) -> list[tuple[Tensor, UpdatedRandomFeedback]]:
    if not _FOLLOWED:
        return []
    params = (p for group in optimizer.param_groups for p in group["params"] if p.requires_grad)
    return [(p, rule) for p in params if (rule := _FOLLOWED.get(p)) is not None]


def _before_optimizer_step(optimizer: Optimizer, args: Any, kwargs: Any) -> None:
    for weight, rule in _followed_in(optimizer):
        rule.before_step(weight)


def _after_optimizer_step(optimizer: Optimizer, args: Any, kwargs: Any) -> None:
    for weight, rule in _followed_in(optimizer):
        rule.after_step(weight)


register_optimizer_step_pre_hook(_before_optimizer_step)
register_optimizer_step_post_hook(_after_optimizer_step)


def _permutation(out: Tensor, generator: torch.Generator | None) -> Tensor:
    return torch.randperm(out.numel(), generator=generator, out=out)


class SignConcordantFeedback(FeedbackRule):
    """`sign_concordant` (Liao, Leibo & Poggio 2016): B = M * sign(W) * s, recomputed from the current W.

    s is a fixed +-1 mask with exactly round(p * numel) entries +1 (drawn once), so a fraction p of B's
    signs agree with W's. M: `uniform` (sigma everywhere), `fixed_random` (|N(0, sigma)| drawn once) or
    `batch_random` (|N(0, sigma)| redrawn for every batch), sigma as in the module docstring.
    Buffer `signed_magnitude` holds s * M (s alone for batch_random), so B costs two passes over W.
    """

    mode = "sign_concordant"
    concordance: float
    magnitude: Magnitude

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        self.sigma = 0.0

    def bind(self, weight: Tensor, fan_in: int) -> None:
        super().bind(weight, fan_in)
        self.sigma = self.init_scale if self.init_scale is not None else 1.0 / math.sqrt(3.0 * fan_in)
        n = weight.numel()
        order = self.draw(torch.empty(n, dtype=torch.long, device=weight.device), "signs", _permutation)
        agree = torch.zeros(n, dtype=torch.bool, device=weight.device)
        agree[order[: round(self.concordance * n)]] = True
        signs = torch.where(agree, 1.0, -1.0).to(weight.dtype).view_as(weight)
        if self.magnitude == "uniform":
            signs *= self.sigma
        elif self.magnitude == "fixed_random":
            signs *= self.draw(weight.detach(), "magnitude", lambda t, g: t.normal_(generator=g).abs_())
            signs *= self.sigma
        self.register_buffer("signed_magnitude", signs)

    def _draw_magnitude(self, weight: Tensor) -> Tensor:
        return torch.randn_like(weight).abs_().mul_(self.sigma)

    def matrix(self, weight: Tensor) -> Tensor:
        b = torch.sign(weight).mul_(self.signed_magnitude)
        return b.mul_(self._draw_magnitude(weight)) if self.magnitude == "batch_random" else b


class DirectFeedback(FeedbackRule):
    """`dfa` (Nøkland 2016): the layer's input gets e @ B_i, e = dL/d(network output), B_i fixed random.

    B_i has shape (num_outputs, input features) and is drawn (from W's init distribution) at the first
    backward, when both are known. `fasweep.nn.finalize(model)` wires `context` to the network output.
    """

    mode = "dfa"

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        self.context: Any = None  # DFAContext, set by finalize
        self.register_buffer("B", torch.empty(0))

    def bind(self, weight: Tensor, fan_in: int) -> None:
        super().bind(weight, fan_in)
        self.B = self.B.to(device=weight.device, dtype=weight.dtype)

    def matrix(self, weight: Tensor) -> Tensor:
        return self.B

    def input_grad(self, op: LayerOp, grad_out: Tensor, weight: Tensor, feedback: Tensor, x: Tensor) -> Tensor:
        if self.exact:
            return op.input_grad(grad_out, weight, x)
        error = None if self.context is None else self.context.error
        if error is None or error.shape[0] != x.shape[0]:
            raise RuntimeError("dfa layer has no output error for this batch: call fasweep.nn.finalize(model)")
        e = error.reshape(error.shape[0], -1)
        if self.B.numel() == 0:
            like = torch.empty(e.shape[1], x[0].numel(), dtype=e.dtype, device=e.device)
            self.B = self.draw_like_init(like, "dfa")
        self.last = self.B
        return (e.to(self.B.dtype) @ self.B).view(x.shape).to(x.dtype)


RULES: dict[str, type[FeedbackRule]] = {
    r.mode: r for r in (Backprop, RandomFeedback, UpdatedRandomFeedback, SignConcordantFeedback, DirectFeedback)
}


def make_rule(mode: str, **options: Any) -> FeedbackRule:
    """Build an (unbound) rule by mode name; the options (`rule_options.OPTIONS`) a mode does not use are ignored."""
    if mode not in RULES:
        raise UserError.field("feedback.mode", mode, "one of " + ", ".join(RULES))
    unknown = sorted(set(options) - set(OPTIONS))
    if unknown:
        raise TypeError(f"unknown rule options {unknown}; expected some of {list(OPTIONS)}")
    return RULES[mode](**{name: value for name, value in options.items() if name in RULE_OPTIONS[mode]})


def resolve_rule(feedback: str | FeedbackRule, options: dict[str, Any]) -> FeedbackRule:
    """A layer's rule from its `feedback` argument: a mode name (+ options) or a rule object."""
    if isinstance(feedback, FeedbackRule):
        if options:
            raise TypeError("pass rule options to make_rule, not to the layer, when feedback is a FeedbackRule")
        return feedback.unbound_copy() if feedback.bound else feedback
    return make_rule(feedback, **options)
