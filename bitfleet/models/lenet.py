"""LeNet-5 (LeCun et al., 1998) with ReLU and max-pooling, the usual modern variant.

It has no normalisation layers on purpose: it is the small federated-learning workhorse, and
BatchNorm's running statistics are client-specific under non-IID data.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from bitfleet.models.normalize import check_model_args, input_normalize

#: LeNet-5 was designed for 32x32 inputs; 28x28 ones get a padding of 2 on the first conv.
_SIZES = (28, 32)


class LeNet5(nn.Module):
    """conv 6@5x5 -> pool -> conv 16@5x5 -> pool -> FC 120 -> FC 84 -> FC classes."""

    def __init__(
        self,
        num_classes: int = 10,
        in_channels: int = 1,
        image_size: int = 28,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
    ) -> None:
        super().__init__()
        check_model_args("lenet5", num_classes, in_channels, image_size, _SIZES)
        self.normalize = input_normalize(in_channels, mean, std)
        # Padding makes a 28x28 input behave like the original 32x32 one, so the flatten is
        # 16*5*5 for both and the parameter count is the classic one.
        padding = (32 - image_size) // 2
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, 6, kernel_size=5, padding=padding),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
            nn.Conv2d(6, 16, kernel_size=5),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
        )
        self.flatten = nn.Flatten()
        self.classifier = nn.Sequential(
            nn.Linear(16 * 5 * 5, 120),
            nn.ReLU(inplace=True),
            nn.Linear(120, 84),
            nn.ReLU(inplace=True),
            nn.Linear(84, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.flatten(self.features(self.normalize(x))))


def lenet5(
    num_classes: int = 10,
    in_channels: int = 1,
    image_size: int = 28,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
) -> LeNet5:
    """LeNet-5 for 28x28 or 32x32 inputs (61,706 parameters at 1x28x28 and 10 classes)."""
    return LeNet5(num_classes, in_channels, image_size, mean, std)
