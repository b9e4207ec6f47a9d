"""A small Fashion-MNIST look-alike on disk, for tests that run the real loaders."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np


def write_idx(path: Path, array: np.ndarray) -> None:
    """A gzipped uint8 IDX file, written independently of the reader under test."""
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(
        int(d).to_bytes(4, "big") for d in array.shape
    )
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


def make_tiny_fmnist(folder: Path, n_train: int = 600, n_test: int = 200) -> Path:
    """10 classes, each a bright block at its own place: easy, so a broken loop shows."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        y = np.arange(n) % 10
        x = rng.integers(0, 60, size=(n, 28, 28))
        for c in range(10):
            r, col = divmod(c, 5)
            x[y == c, r * 14 : r * 14 + 14, col * 5 : col * 5 + 5] += 180
        write_idx(folder / f"{prefix}-images-idx3-ubyte.gz", x)
        write_idx(folder / f"{prefix}-labels-idx1-ubyte.gz", y)
    return folder
