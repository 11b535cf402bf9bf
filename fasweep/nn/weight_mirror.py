"""`weight_mirror` (Akrout et al. 2019, "Deep learning without weight transport"): B learns W from a mirror phase.

Shipped as a plugin is: one `FeedbackRule` class, registered under its name by the entry point group
`fasweep.rules` in fasweep's own pyproject.toml, exactly as a user's package would register it.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import Tensor

from fasweep.nn.rules import LayerOp, RandomFeedback
from fasweep.rule_options import OPTIONS, Option


def _rate(v: float) -> bool:
    return 0.0 <= v <= 1.0


class WeightMirror(RandomFeedback):
    """`weight_mirror`: dL/dx = G B with B, drawn random, taught W by a mirror phase after every optimizer step.

    The mirror phase feeds `mirror_batch` noise inputs xi ~ N(0, 1) (shaped like the layer's input, from the
    trial's RNG) through the layer without bias, y = W xi, and moves B by the layer's own weight gradient of that
    pass, dW(y, xi) = y xi^T for a dense layer, the correlation of y and xi for a conv or untied one:
    B <- (1 - mirror_decay) B + mirror_lr * dW(y, xi) / count, `count` the number of input-output pairs each
    weight sees (dW of all-ones; N for a dense layer), so that E[dW(y, xi) / count] = W for every layer kind and
    B tends to (mirror_lr / mirror_decay) W: the B-W angle falls as the noise averages out. The layer's input
    shape and op are those of its last backward (a first layer, which sends no dL/dx, is never mirrored).
    """

    mode = "weight_mirror"
    options: ClassVar[dict[str, Option]] = {
        "init_scale": OPTIONS["init_scale"],
        "mirror_lr": Option(0.05, _rate, "a number in [0, 1]", "weight_mirror: step of B towards the mirrored W"),
        "mirror_decay": Option(0.05, _rate, "a number in [0, 1]", "weight_mirror: decay of B per mirror step"),
        "mirror_batch": Option(
            32,
            lambda v: isinstance(v, int) and not isinstance(v, bool) and 1 <= v <= 4096,
            "an integer from 1 to 4096",
            "weight_mirror: noise inputs per mirror step",
        ),
    }
    mirror_lr: float
    mirror_decay: float
    mirror_batch: int

    def __init__(self, **options: object) -> None:
        super().__init__(**options)
        self._seen: tuple[LayerOp, tuple[int, ...]] | None = None  # the layer's op and input shape (one sample)
        self._count: Tensor | None = None

    def input_grad(self, op: LayerOp, grad_out: Tensor, weight: Tensor, feedback: Tensor, x: Tensor) -> Tensor:
        self._seen = (op, tuple(x.shape[1:]))
        return super().input_grad(op, grad_out, weight, feedback, x)

    def after_step(self, weight: Tensor) -> None:
        """One mirror step of B (nothing before the layer's first backward)."""
        if self._seen is None:
            return
        op, shape = self._seen
        w = weight.detach()
        noise = torch.randn((self.mirror_batch, *shape), generator=self.rng, dtype=w.dtype, device=w.device)
        mirrored, _ = op.param_grads(op.forward(noise, w, None), noise, w, True, False)
        if self._count is None or self._count.shape != w.shape:
            out = op.forward(torch.ones_like(noise), w, None)
            self._count, _ = op.param_grads(torch.ones_like(out), torch.ones_like(noise), w, True, False)
        self.B.mul_(1.0 - self.mirror_decay).addcdiv_(mirrored, self._count.clamp(min=1.0), value=self.mirror_lr)
