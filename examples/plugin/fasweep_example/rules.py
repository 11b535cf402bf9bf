"""`ScaledSign`: sign-symmetric feedback, B = sign(W) * mean|W| * sign_scale (Xiao et al. 2018's sign symmetry)."""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import Tensor

from fasweep.nn import FeedbackRule
from fasweep.rule_options import Option


class ScaledSign(FeedbackRule):
    """B shares W's signs, every entry the same magnitude: W's mean magnitude times `sign_scale`."""

    mode = "scaled_sign"
    options: ClassVar[dict[str, Option]] = {
        "sign_scale": Option(1.0, lambda v: v > 0, "a positive number", "scaled_sign: |B| / mean |W|"),
    }
    sign_scale: float

    def matrix(self, weight: Tensor) -> Tensor:
        return torch.sign(weight).mul_(weight.abs().mean() * self.sign_scale)
