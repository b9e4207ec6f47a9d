"""The validation split: training images the coordinator holds back for its own decisions.

Everything the coordinator decides from an accuracy (FedHQ's fine stage and deploy-aware
SigAcc, the runtime re-allocation, each board's deploy choice) reads this split, never the
test split, which only reports (docs/round.md#validation). The images are carved from
the training set before it is split over the devices, so no device trains on them.

The carve depends only on the data set's size and the fraction, not on the job's seed: the
coordinator and agents started with `--data NAME:I/N` agree on it without talking, and every
seed of an experiment is validated on the same images.
"""

from __future__ import annotations

import dataclasses

import torch

from bitfleet.data.image_data import ImageData

DEFAULT_VALIDATION_FRACTION = 0.1
"""Keras's `validation_split` convention; 6,000 Fashion-MNIST images."""

CALIB_SAMPLES = 256
"""Validation images that calibrate activation ranges, wherever a model is deployed with
quantized activations (the coordinator's evaluations and candidates, `bitfleet export`): every
one of them sees the same ranges."""

_SEED = 0x5EED


def calibration_images(data: ImageData, n: int = CALIB_SAMPLES) -> torch.Tensor:
    """The first `n` validation images of carved `data`: what activation ranges are
    calibrated on, the coordinator's own images, not the devices' training data."""
    if data.val_x is None:
        raise ValueError("the data have no validation split (carve_validation)")
    return data.val_x[:n]


def check_fraction(fraction: float) -> float:
    """`fraction` if it holds back some but at most half of the training images."""
    if type(fraction) not in (int, float) or not 0 < fraction <= 0.5:
        raise ValueError(f"validation fraction must be in (0, 0.5], got {fraction!r}")
    return float(fraction)


def validation_indices(n_train: int, fraction: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(kept for training, held out for validation) indices of `n_train` training images, both
    sorted; at least one of each."""
    check_fraction(fraction)
    n_val = max(1, round(n_train * fraction))
    if n_train < 2 or n_val >= n_train:
        raise ValueError(
            f"cannot hold {fraction:g} of {n_train} training images back for validation "
            "and train on the rest"
        )
    order = torch.randperm(n_train, generator=torch.Generator().manual_seed(_SEED))
    return order[n_val:].sort().values, order[:n_val].sort().values


def carve_validation(data: ImageData, fraction: float) -> ImageData:
    """`data` with `fraction` of its training images moved to `val_x`/`val_y`. Data already
    carved at the same fraction come back as they are; another fraction is an error, since the
    devices' shards would then overlap the validation images."""
    if data.val_x is not None:
        if data.validation_fraction != check_fraction(fraction):
            raise ValueError(
                f"data already hold {data.validation_fraction:g} back for validation, "
                f"not {fraction:g}"
            )
        return data
    keep, held = validation_indices(len(data.train_y), fraction)
    return dataclasses.replace(
        data,
        train_x=data.train_x[keep],
        train_y=data.train_y[keep],
        val_x=data.train_x[held],
        val_y=data.train_y[held],
        validation_fraction=float(fraction),
    )
