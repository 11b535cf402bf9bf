"""`blobs`: a small synthetic image task, 4 classes = which quadrant of an 8x8 image holds a bright blob."""

from __future__ import annotations

import torch


def _split(n: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    labels = torch.randint(0, 4, (n,), generator=generator)
    images = torch.rand(n, 1, 8, 8, generator=generator) * 200
    rows, cols = (labels // 2) * 4, (labels % 2) * 4
    for i in range(n):
        images[i, 0, rows[i] : rows[i] + 4, cols[i] : cols[i] + 4] += 24
    return images.clamp_(0, 255).to(torch.uint8), labels


def blobs(root: str | None = None) -> tuple[torch.Tensor, ...]:
    """(x_train, y_train, x_test, y_test): 1,200 / 300 uint8 images (N, 1, 8, 8), the same on every call."""
    g = torch.Generator().manual_seed(0)
    return (*_split(1200, g), *_split(300, g))
