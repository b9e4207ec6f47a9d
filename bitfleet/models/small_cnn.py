"""A small two-conv CNN, the common baseline of FL papers (FedAvg's "CNN" in spirit).

Dropout-free: with a few local epochs per round dropout mostly slows convergence, and it makes
train-mode and eval-mode outputs differ, which would blur float-versus-quantized comparisons.
No normalisation layers, for the same non-IID reason as LeNet-5.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from bitfleet.models.normalize import check_model_args, input_normalize


class SmallCNN(nn.Module):
    """conv 32@3x3 -> pool -> conv 64@3x3 -> pool -> FC 128 -> FC classes."""

    def __init__(
        self,
        num_classes: int = 10,
        in_channels: int = 1,
        image_size: int = 28,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
    ) -> None:
        super().__init__()
        check_model_args("small_cnn", num_classes, in_channels, image_size)
        self.normalize = input_normalize(in_channels, mean, std)
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, 32, kernel_size=3, padding=1),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
            nn.Conv2d(32, 64, kernel_size=3, padding=1),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
        )
        self.flatten = nn.Flatten()
        # The flatten keeps spatial detail (no global pooling), so its width follows the input.
        side = image_size // 4
        self.classifier = nn.Sequential(
            nn.Linear(64 * side * side, 128),
            nn.ReLU(inplace=True),
            nn.Linear(128, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.flatten(self.features(self.normalize(x))))


def small_cnn(
    num_classes: int = 10,
    in_channels: int = 1,
    image_size: int = 28,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
) -> SmallCNN:
    """Small CNN for any input side >= 28; its first FC layer is sized for `image_size`."""
    return SmallCNN(num_classes, in_channels, image_size, mean, std)
