"""Three-class toy images that a small CNN learns in a few steps, for training-method tests."""

from __future__ import annotations

import torch


def blobs(n: int = 512, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Three classes of 1x28x28 images told apart by which third of the image is bright."""
    gen = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 3, (n,), generator=gen)
    x = torch.rand(n, 1, 28, 28, generator=gen) * 0.3
    for c in range(3):
        x[y == c, :, :, c * 9 : c * 9 + 9] += 0.7
    return x.clamp(0, 1), y
