"""Feedback rules: how a layer's feedback matrix B is made, how the input gradient uses it, what happens around
each optimizer step, and the same for the members of a pack.

A rule is one `FeedbackRule` subclass (see there), owned by one layer as a small `nn.Module` (its buffers travel in
the layer's state_dict). Every layer kind (dense, conv, untied) takes the same rules; the layer only supplies
the maths of "send G back through a matrix shaped like W" (`op.input_grad`). dL/dW and dL/db are never touched.
A rule is found by name through `fasweep.rule_options`, the torch-free registry the spec validator and the pack
planner read.

Random draws: a rule seeded with `seed_streams(seed, layer)` (as `fasweep.models` does for every layer it
builds) draws its B, sign mask and fixed magnitudes from streams of its own, each seeded by (seed, layer,
purpose), never from the global RNG: the forward weights W of a net then depend only on the seed and the layer
shapes, not on which rule each layer uses, so trials of one seed pair across rules. An unseeded rule draws from
the global RNG. Draws made every step (batch_random's magnitudes) come from `rule.rng`: None, the global RNG
(the trial's, checkpointed), alone; the member's stand-in for it in a pack.

Scales: with `init_scale=None`, random B is drawn from W's own init, U(-1/sqrt(fan_in), 1/sqrt(fan_in));
sign-concordant magnitudes use sigma = init_scale or that distribution's std, 1/sqrt(3 fan_in), so
the RMS of B equals the RMS of a freshly initialised W for every magnitude option.
"""

from __future__ import annotations

import copy
import hashlib
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any, ClassVar, Protocol

import torch
from torch import Tensor, nn
from torch.optim.optimizer import Optimizer, register_optimizer_step_post_hook, register_optimizer_step_pre_hook
from torch.utils.weak import WeakIdKeyDictionary

from fasweep.errors import UserError
from fasweep.rule_options import OPTIONS, SEED_RULES, Magnitude, Option, RuleInfo, require_option, rule_class


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


class StackedOp(LayerOp, Protocol):
    """A pack's op of one layer kind over every member's stacked tensors (`fasweep.packed.net`): `member` is the op
    of one member alone, `split` hands each member its (G, x) as it gets them alone, `join` stacks their dL/dx."""

    member: LayerOp

    def split(self, grad_out: Tensor, x: Tensor, weight: Tensor) -> list[tuple[Tensor, Tensor]]: ...

    def join(self, grads: list[Tensor]) -> Tensor: ...


class FeedbackRule(nn.Module):
    """Base rule. A rule is one subclass: its declaration, its maths for one model, its hooks around the optimizer
    step, and its maths for the members of a pack.

    Declaration (class attributes of plain values, read once into `info`, the torch-free
    `fasweep.rule_options.RuleInfo` the spec validator and the pack planner use): `mode` its name; `options`
    {name: Option} the keyword options it takes, fasweep's shared ones as `OPTIONS[name]` (fields of `feedback`)
    and its own (`feedback.<name>` in a config); `packable` True, or False / a string saying why its trials
    never share a pack (the plan then runs them alone). The five seed rules set `info` to their entry of
    `rule_options.SEED_RULES` instead, so that validating a spec never imports torch.

    One model: `bind` (draw what B needs, once), `matrix` (B for the forward about to run), `input_grad` (dL/dx;
    by default the layer op's maths through B), `before_step`/`after_step` (around every optimizer step that moves
    W, clipping included; a rule overriding either follows its weight, see `track`). Draws made every step come
    from `self.rng` (None: the global RNG).

    A pack (`fasweep.packed.PackedNet`): the class methods `stacked_*`, given a `RuleStack` (every member's rule,
    its options its own, its buffers slices of the pack's stacked tensors). By default each member runs its own
    methods above on its slice, which is bitwise what it does alone; a rule overrides them only to batch the work,
    and a subclass that redefines a method of one model gets the default pack version of it back.
    """

    mode: ClassVar[str]
    info: ClassVar[RuleInfo]
    steps: ClassVar[bool] = False  # whether it has hooks around the optimizer step (set from the class)
    init_scale: float | None = None

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        for method, stacked in _STACKED.items():  # a parent's batched pack maths never stands in for new maths
            if method in cls.__dict__ and stacked not in cls.__dict__:
                setattr(cls, stacked, FeedbackRule.__dict__[stacked])
        cls.steps = cls.before_step is not FeedbackRule.before_step or cls.after_step is not FeedbackRule.after_step
        if "mode" in cls.__dict__ and "info" not in cls.__dict__:
            cls.info = _declared(cls)

    def __init__(self, **options: Any) -> None:
        super().__init__()
        info = self.info
        unknown = sorted(set(options) - set(info.options))
        if unknown:
            raise TypeError(f"the {info.name} rule takes options {list(info.options)}, not {unknown}")
        for name in info.options:
            value = options[name] if name in options else info.option(name).default
            setattr(self, name, require_option(name, value, info))
        self.fan_in = 0
        self.bound = False
        self.exact = False  # set by `exact_backprop`: behave as bp
        self.last: Tensor | None = None  # B used by the last gradient-carrying forward
        self.stream: tuple[int, int] | None = None  # (seed, layer) of `seed_streams`; None: the global RNG
        self.rng: torch.Generator | None = None  # draws made every step; None: the global RNG

    def option_values(self) -> dict[str, Any]:
        """Constructor keyword options, to make an unbound copy of this rule."""
        return {name: getattr(self, name) for name in self.info.options}

    def unbound_copy(self) -> FeedbackRule:
        """A fresh rule with the same options (a rule belongs to one layer)."""
        return type(self)(**self.option_values())

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
        """dL/dx as this rule defines it: G sent back through B (W under `exact_backprop`). A rule overriding it
        gets the layer's own op and input (an untied layer's too, not its patches)."""
        return op.input_grad(grad_out, weight if self.exact else feedback, x)

    @classmethod
    def own_input_grad(cls) -> bool:
        """Whether this rule defines dL/dx itself (not as the layer op's maths through B)."""
        return cls.input_grad is not FeedbackRule.input_grad

    def before_step(self, weight: Tensor) -> None:
        """Called with W (no grad) before every optimizer step that moves it."""

    def after_step(self, weight: Tensor) -> None:
        """Called with W (no grad) after every optimizer step that moved it, clipping included."""

    def track(self, weight: Tensor) -> None:
        """Follow `weight` through optimizer steps when this rule has step hooks. The layer calls it when it binds
        the rule, when copied or unpickled, and at every gradient-carrying eager forward (a replaced Parameter is
        found again); a compiled forward skips it (dynamo would break the graph on the map)."""
        if self.steps and not torch.compiler.is_compiling() and _FOLLOWED.get(weight) is not self:
            _FOLLOWED[weight] = self

    # --- the members of a pack (see `RuleStack`) -------------------------------------------------------------

    def member_view(self, buffers: Mapping[str, Tensor], rng: torch.Generator | None) -> FeedbackRule:
        """A copy of this rule (options, streams, state) whose buffers are `buffers` (a pack member's slices) and
        whose every-step draws come from `rng`."""
        twin = copy.copy(self)
        twin._buffers = {**self._buffers, **buffers}
        twin.rng = rng
        return twin

    @classmethod
    def stacked_matrix(cls, stack: RuleStack, weight: Tensor) -> Tensor:
        """Every member's B (stacked) for the forward about to run, W stacked: each member's `matrix`."""
        return torch.stack([rule.matrix(w) for rule, w in zip(stack.rules, weight, strict=True)])

    @classmethod
    def stacked_input_grad(
        cls, stack: RuleStack, op: StackedOp, grad_out: Tensor, weight: Tensor, feedback: Tensor, x: Tensor
    ) -> Tensor:
        """Every member's dL/dx: the pack op's maths through the stacked B (W while exact), or, for a rule with
        its own `input_grad`, each member's on its own (G, x) with the op it has alone."""
        if not cls.own_input_grad():
            return op.input_grad(grad_out, weight if stack.exact else feedback, x)
        parts = op.split(grad_out, x, weight)
        grads = [
            rule.input_grad(op.member, g, w, b, xk)
            for rule, (g, xk), w, b in zip(stack.rules, parts, weight, feedback, strict=True)
        ]
        return op.join(grads)

    @classmethod
    def stacked_before_step(cls, stack: RuleStack, weight: Tensor) -> None:
        """`before_step` of every member, on its slice of the stacked W."""
        for rule, w in zip(stack.rules, weight, strict=True):
            rule.before_step(w)

    @classmethod
    def stacked_after_step(cls, stack: RuleStack, weight: Tensor) -> None:
        """`after_step` of every member, on its slice of the stacked W."""
        for rule, w in zip(stack.rules, weight, strict=True):
            rule.after_step(w)

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self.option_values().items())

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:  # type: ignore[no-untyped-def]
        # lazily shaped buffers (DFA's B before its first backward) take the saved shape
        for name, buf in self._buffers.items():
            saved = state_dict.get(prefix + name)
            if buf is not None and saved is not None and saved.shape != buf.shape:
                self._buffers[name] = torch.empty(saved.shape, dtype=buf.dtype, device=buf.device)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


# each method of one model -> its pack version: a subclass redefining the first gets the default (per member) second
_STACKED = {
    "matrix": "stacked_matrix",
    "input_grad": "stacked_input_grad",
    "before_step": "stacked_before_step",
    "after_step": "stacked_after_step",
}


def _declared(cls: type[FeedbackRule]) -> RuleInfo:
    """The `RuleInfo` a rule class declares (`mode`, `options`, `packable`); a TypeError says what is wrong."""
    where = f"{cls.__module__}:{cls.__qualname__}"
    options = dict(getattr(cls, "options", {}))
    for name, option in options.items():
        if not isinstance(option, Option):
            raise TypeError(f"{where}: options[{name!r}] is not a fasweep.rule_options.Option")
        if name in OPTIONS and option is not OPTIONS[name]:
            raise TypeError(f"{where}: option {name!r} is fasweep's shared one: use OPTIONS[{name!r}] or rename it")
    packable = getattr(cls, "packable", True)
    if packable is not True and not isinstance(packable, str):
        packable = f"the {cls.mode} rule declares packable = {packable!r}"
    own = {name: option for name, option in options.items() if name not in OPTIONS}
    return RuleInfo(cls.mode, where, tuple(options), own, packable)


class RuleStack:
    """One layer's rules in a pack (`fasweep.packed.PackedNet`): `rules[k]` is member k's rule with its buffers
    as slices of the pack's stacked `buffers` (its own methods update the stack in place) and its every-step
    draws from the member's generator. What the pack's layer asks of its rules; `exact` as in `exact_backprop`."""

    def __init__(
        self,
        rules: Sequence[FeedbackRule],
        buffers: Mapping[str, Tensor],
        generators: Sequence[torch.Generator | None],
    ) -> None:
        info = rules[0].info
        one_rule = len({type(rule) for rule in rules}) == 1
        if not one_rule or info.packable is not True:
            why = "one rule per layer" if not one_rule else info.packable
            raise UserError.field("pack feedback", sorted(r.info.name for r in rules), f"rules that pack ({why})")
        self.cls = type(rules[0])
        self.buffers = dict(buffers)
        self.rules = [
            rule.member_view({name: t[k] for name, t in buffers.items()}, g)
            for k, (rule, g) in enumerate(zip(rules, generators, strict=True))
        ]
        self._exact = False

    @property
    def exact(self) -> bool:
        """Whether the members behave as bp (their B is W), as under `exact_backprop`."""
        return self._exact

    @exact.setter
    def exact(self, value: bool) -> None:
        self._exact = value
        for rule in self.rules:
            rule.exact = value

    def use_generators(self, generators: Sequence[torch.Generator]) -> None:
        """Every-step draws of member k from `generators[k]` from now on."""
        for rule, g in zip(self.rules, generators, strict=True):
            rule.rng = g

    def select(self, keep: list[int], buffers: Mapping[str, Tensor]) -> RuleStack:
        """The stack of members `keep` (in that order) over their new stacked `buffers`."""
        return RuleStack([self.rules[i] for i in keep], buffers, [self.rules[i].rng for i in keep])

    @torch.no_grad()
    def matrix(self, weight: Tensor) -> Tensor:
        """Every member's B for the forward about to run (W while exact)."""
        w = weight.detach()
        return w if self.exact else self.cls.stacked_matrix(self, w)

    def input_grad(self, op: Any, grad_out: Tensor, weight: Tensor, feedback: Tensor, x: Tensor) -> Tensor:
        """What the shared FA Function's backward asks for dL/dx."""
        return self.cls.stacked_input_grad(self, op, grad_out, weight, feedback, x)

    @torch.no_grad()
    def before_step(self, weight: Tensor) -> None:
        """The members' `before_step`, W stacked."""
        if self.cls.steps:
            self.cls.stacked_before_step(self, weight)

    @torch.no_grad()
    def after_step(self, weight: Tensor) -> None:
        """The members' `after_step`, W stacked."""
        if self.cls.steps:
            self.cls.stacked_after_step(self, weight)


class Backprop(FeedbackRule):
    """`bp`: B is W itself, exact backpropagation."""

    mode = "bp"
    info = SEED_RULES["bp"]

    def matrix(self, weight: Tensor) -> Tensor:
        return weight

    @classmethod
    def stacked_matrix(cls, stack: RuleStack, weight: Tensor) -> Tensor:
        return weight


class RandomFeedback(FeedbackRule):
    """`random` (Lillicrap et al. 2016): a fixed random B, drawn once, kept as a buffer."""

    mode = "random"
    info = SEED_RULES["random"]

    def bind(self, weight: Tensor, fan_in: int) -> None:
        super().bind(weight, fan_in)
        self.register_buffer("B", self.draw_like_init(weight.detach()))

    def matrix(self, weight: Tensor) -> Tensor:
        return self.B

    @classmethod
    def stacked_matrix(cls, stack: RuleStack, weight: Tensor) -> Tensor:
        return stack.buffers["B"]


class UpdatedRandomFeedback(RandomFeedback):
    """`random_updated` (R*): random B that receives exactly W's update at every optimizer step.

    Whatever calls `optimizer.step()` (any `torch.optim.Optimizer`; `fasweep.nn.optimizer_step` too), global
    optimizer step hooks (below) snapshot this layer's W before the step and add W_after - W_before to B
    after it. With `decay` > 0 both W and B then shrink by (1 - decay) (Kolen-Pollack): B - W decays to 0.
    """

    mode = "random_updated"
    info = SEED_RULES["random_updated"]
    decay: float

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        self._before: Tensor | None = None  # W at the start of the optimizer step under way

    def before_step(self, weight: Tensor) -> None:
        """Remember W before the optimizer moves it."""
        self._before = weight.detach().clone()

    def after_step(self, weight: Tensor) -> None:
        """B += W_after - W_before, then the decay; nothing when no step of this weight began."""
        if self._before is None:
            return
        self.B.sub_(self._before).add_(weight)
        self._before = None
        if self.decay:
            self.B.mul_(1.0 - self.decay)
            weight.mul_(1.0 - self.decay)


# --- step hooks under any optimizer ------------------------------------------------------------------------
# The map is filled by the rules themselves (`track`) and holds weights weakly. The post-hook runs after an
# optimizer's own post-hooks (torch calls those first), so `optimizer_step`'s clipping is part of the change a
# rule sees.
_FOLLOWED: WeakIdKeyDictionary = WeakIdKeyDictionary()  # a weight whose rule has step hooks -> its rule


def _followed_in(optimizer: Optimizer) -> list[tuple[Tensor, FeedbackRule]]:
    if not _FOLLOWED:
        return []
    params = (p for group in optimizer.param_groups for p in group["params"] if p.requires_grad)
    return [(p, rule) for p in params if (rule := _FOLLOWED.get(p)) is not None]


@torch.no_grad()
def _before_optimizer_step(optimizer: Optimizer, args: Any, kwargs: Any) -> None:
    for weight, rule in _followed_in(optimizer):
        rule.before_step(weight)


@torch.no_grad()
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
    `batch_random` (|N(0, sigma)| redrawn for every batch, from `rng`), sigma as in the module docstring.
    Buffer `signed_magnitude` holds s * M (s alone for batch_random), so B costs two passes over W.
    """

    mode = "sign_concordant"
    info = SEED_RULES["sign_concordant"]
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
        m = torch.randn(weight.shape, generator=self.rng, dtype=weight.dtype, device=weight.device)
        return m.abs_().mul_(self.sigma)

    def matrix(self, weight: Tensor) -> Tensor:
        b = torch.sign(weight).mul_(self.signed_magnitude)
        return b.mul_(self._draw_magnitude(weight)) if self.magnitude == "batch_random" else b

    @classmethod
    def stacked_matrix(cls, stack: RuleStack, weight: Tensor) -> Tensor:
        """One pass over the stack (no per-member copies); batch_random members' magnitudes from their own rngs."""
        b = torch.sign(weight).mul_(stack.buffers["signed_magnitude"])
        rules: list[SignConcordantFeedback] = stack.rules  # type: ignore[assignment]
        if any(r.magnitude == "batch_random" for r in rules):
            ones = torch.ones_like(weight[0])
            pairs = zip(rules, weight, strict=True)
            b.mul_(torch.stack([r._draw_magnitude(w) if r.magnitude == "batch_random" else ones for r, w in pairs]))
        return b


class DirectFeedback(FeedbackRule):
    """`dfa` (Nøkland 2016): the layer's input gets e @ B_i, e = dL/d(network output), B_i fixed random.

    B_i has shape (num_outputs, input features) and is drawn (from W's init distribution) at the first
    backward, when both are known. `fasweep.nn.finalize(model)` wires `context` to the network output.
    """

    mode = "dfa"
    info = SEED_RULES["dfa"]

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


RULES: dict[str, type[FeedbackRule]] = {  # the seed rules, by name
    r.mode: r for r in (Backprop, RandomFeedback, UpdatedRandomFeedback, SignConcordantFeedback, DirectFeedback)
}


def make_rule(mode: str, **options: Any) -> FeedbackRule:
    """Build an (unbound) rule by mode (a seed rule's name, an import path or a registered name, see
    `fasweep.rule_options`); options the rule does not take are ignored, names no rule of it knows a TypeError."""
    cls: type[FeedbackRule] = rule_class(mode)
    taken = cls.info.options
    unknown = sorted(name for name in options if name not in OPTIONS and name not in taken)
    if unknown:
        raise TypeError(f"unknown rule options {unknown}; expected some of {sorted({*OPTIONS, *taken})}")
    return cls(**{name: value for name, value in options.items() if name in taken})


def resolve_rule(feedback: str | FeedbackRule, options: dict[str, Any]) -> FeedbackRule:
    """A layer's rule from its `feedback` argument: a mode name (+ options) or a rule object."""
    if isinstance(feedback, FeedbackRule):
        if options:
            raise TypeError("pass rule options to make_rule, not to the layer, when feedback is a FeedbackRule")
        return feedback.unbound_copy() if feedback.bound else feedback
    return make_rule(feedback, **options)
