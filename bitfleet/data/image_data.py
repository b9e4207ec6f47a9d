"""An image classification data set held in memory, and its conversion to model input."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from bitfleet.data.specs import DatasetSpec

__all__ = ["ImageData", "to_float"]


@dataclass
class ImageData:
    """Train and test splits as tensors: images uint8 NCHW, labels int64; after
    `carve_validation` (bitfleet/data/validation.py) also the validation split carved from the
    training images, at `validation_fraction` of them.

    Images stay uint8 because a board with 1-4 GiB of memory holds them four times more cheaply
    than float32; convert a batch at a time with `to_float`.
    """

    train_x: torch.Tensor
    train_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    spec: DatasetSpec
    val_x: torch.Tensor | None = None
    val_y: torch.Tensor | None = None
    validation_fraction: float | None = None

    def __post_init__(self) -> None:
        # Checked once here so that a bad loader fails at load time, not in the middle of a round.
        expected = (self.spec.in_channels, self.spec.image_size, self.spec.image_size)
        splits = [("train", self.train_x, self.train_y), ("test", self.test_x, self.test_y)]
        if (self.val_x is None) != (self.val_y is None):
            raise ValueError(f"{self.spec.name}: validation images and labels come together")
        if self.val_x is not None:
            splits.append(("validation", self.val_x, self.val_y))
        for split, x, y in splits:
            if x.dtype != torch.uint8 or x.dim() != 4 or tuple(x.shape[1:]) != expected:
                raise ValueError(
                    f"{self.spec.name} {split} images: expected uint8 N x "
                    f"{' x '.join(map(str, expected))}, got {x.dtype} "
                    f"{tuple(x.shape)}"
                )
            if y.dtype != torch.int64 or y.dim() != 1 or len(y) != len(x):
                raise ValueError(
                    f"{self.spec.name} {split} labels: expected int64 of length "
                    f"{len(x)}, got {y.dtype} {tuple(y.shape)}"
                )
            if len(y) and (int(y.min()) < 0 or int(y.max()) >= self.spec.num_classes):
                raise ValueError(
                    f"{self.spec.name} {split} labels: outside [0, {self.spec.num_classes})"
                )


def to_float(x: torch.Tensor) -> torch.Tensor:
    """Scale uint8 pixels to float32 in [0, 1], the input every bitfleet model and export takes.

    Float input is taken to be in [0, 1] already and passes through untouched, so training code
    can be handed either stored uint8 images or prepared float batches. Normalisation by
    mean/std is left to the model itself, so that an exported ONNX graph takes the same [0, 1]
    pixels as the training code.
    """
    if x.is_floating_point():
        return x
    return x.to(torch.float32).div_(255.0)
