"""`lenet`: LeNet-5 for any small image size (padded convolutions), as a plain torch module."""

from __future__ import annotations

import torch
from torch import nn


class LeNet(nn.Module):
    def __init__(self, input_shape: tuple[int, ...], num_outputs: int) -> None:
        super().__init__()
        channels, height, width = input_shape
        self.features = nn.Sequential(
            nn.Conv2d(channels, 6, 5, padding=2),
            nn.ReLU(),
            nn.MaxPool2d(2, ceil_mode=True),
            nn.Conv2d(6, 16, 5, padding=2),
            nn.ReLU(),
            nn.MaxPool2d(2, ceil_mode=True),
        )
        with torch.no_grad():
            flat = self.features(torch.zeros(1, channels, height, width)).numel()
        self.fc1 = nn.Linear(flat, 120)
        self.fc2 = nn.Linear(120, 84)
        self.fc3 = nn.Linear(84, num_outputs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(x).flatten(1)
        return self.fc3(torch.relu(self.fc2(torch.relu(self.fc1(x)))))


def lenet(input_shape: tuple[int, ...], num_outputs: int) -> nn.Module:
    """The model fasweep builds for `model.arch: fasweep_example.models:lenet` (its Linear/Conv2d become FA)."""
    return LeNet(input_shape, num_outputs)
