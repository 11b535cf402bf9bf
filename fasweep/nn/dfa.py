"""Direct feedback alignment wiring: `finalize(model)` routes the network's output error to its dfa layers."""

from __future__ import annotations

from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from fasweep.nn.rules import DirectFeedback

_HOOK_ATTR = "_fasweep_dfa_hook"


class DFAContext:
    """Holds e = dL/d(output) of the current backward; shared by the model's dfa rules."""

    def __init__(self) -> None:
        self.error: Tensor | None = None

    def capture(self, grad: Tensor) -> None:
        self.error = grad.detach()

    def on_forward(self, module: nn.Module, args: object, output: Tensor) -> None:
        self.error = None
        if isinstance(output, Tensor) and output.requires_grad:
            output.register_hook(self.capture)


def finalize(model: nn.Module) -> nn.Module:
    """Call once after building a network: wires dfa layers to the output error; a no-op without dfa."""
    old: RemovableHandle | None = model.__dict__.pop(_HOOK_ATTR, None)
    if old is not None:
        old.remove()
    rules = [m for m in model.modules() if isinstance(m, DirectFeedback)]
    if rules:
        context = DFAContext()
        for rule in rules:
            rule.context = context
        model.__dict__[_HOOK_ATTR] = model.register_forward_hook(context.on_forward)
    return model
