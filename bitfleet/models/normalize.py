"""The input contract every bitfleet model shares.

Models take raw pixels in [0, 1] (NCHW float32) and normalise inside themselves, so that a
checkpoint or an exported ONNX graph is self-contained: a board feeding it camera frames needs
no knowledge of the data set's statistics. The argument checks live here too, so that every
factory rejects the same bad inputs with the same messages.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence

import torch
from torch import nn

#: Smallest input side the architectures are designed for (Fashion-MNIST); below it the
#: downsampling stages of the deeper models leave feature maps smaller than 2x2.
MIN_IMAGE_SIZE = 28

#: Used when a caller gives no statistics: maps [0, 1] to [-1, 1], a safe guess for any data set.
DEFAULT_MEAN_STD = 0.5


class Normalize(nn.Module):
    """Per-channel `(x - mean) / std` as the model's first layer.

    The statistics are persistent buffers rather than parameters: they travel with the
    state dict and the ONNX export, but no optimiser or quantizer ever changes them.
    """

    mean: torch.Tensor
    std: torch.Tensor

    def __init__(self, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        if len(mean) == 0 or len(mean) != len(std):
            raise ValueError(
                f"mean and std need one value per channel, got {len(mean)} and {len(std)}"
            )
        if any(not s > 0 for s in std):
            raise ValueError(f"std must be positive in every channel, got {list(std)}")
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std

    def extra_repr(self) -> str:
        return f"mean={self.mean.flatten().tolist()}, std={self.std.flatten().tolist()}"


def input_normalize(
    in_channels: int, mean: Sequence[float] | None, std: Sequence[float] | None
) -> Normalize:
    """Build the first layer, filling in the default statistics so factories stay one-liners.

    A length mismatch is an error rather than a broadcast: grayscale statistics applied to an
    RGB data set (or the reverse) is almost always a configuration mistake.
    """
    mean = [DEFAULT_MEAN_STD] * in_channels if mean is None else list(mean)
    std = [DEFAULT_MEAN_STD] * in_channels if std is None else list(std)
    for label, values in (("mean", mean), ("std", std)):
        if len(values) != in_channels:
            raise ValueError(
                f"{label} has {len(values)} values but the model has {in_channels} input channels"
            )
    return Normalize(mean, std)


def check_model_args(
    model: str,
    num_classes: int,
    in_channels: int,
    image_size: int,
    sizes: Collection[int] | None = None,
) -> None:
    """Fail early with a message naming the model, instead of a shape error deep in forward.

    `sizes` lists the only input sides an architecture supports; None means it accepts any
    side of at least `MIN_IMAGE_SIZE` (models ending in global average pooling).
    """
    if num_classes < 1:
        raise ValueError(f"{model}: num_classes must be at least 1, got {num_classes}")
    if in_channels < 1:
        raise ValueError(f"{model}: in_channels must be at least 1, got {in_channels}")
    if sizes is not None and image_size not in sizes:
        raise ValueError(
            f"{model}: image_size {image_size} is not supported; use one of {sorted(sizes)}"
        )
    if sizes is None and image_size < MIN_IMAGE_SIZE:
        raise ValueError(
            f"{model}: image_size {image_size} is too small; it needs at least {MIN_IMAGE_SIZE}"
        )
