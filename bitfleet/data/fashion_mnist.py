"""Fashion-MNIST: find the four IDX files wherever a machine keeps them, and load them.

Boards are often offline, so a download is the last resort and only on request: first the
directory the user named, then $BITFLEET_DATA_DIR, then Debian's `dataset-fashion-mnist`
package, then an earlier download in the cache. When all fail, the error says exactly how to
get the data.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch

from bitfleet.data.idx import read_idx
from bitfleet.data.image_data import ImageData
from bitfleet.data.sources import DatasetNotFoundError, cache_dir, user_roots
from bitfleet.data.specs import FASHION_MNIST

__all__ = ["DEBIAN_DIR", "FILE_NAMES", "find_fashion_mnist", "load_fashion_mnist"]

TRAIN_IMAGES = "train-images-idx3-ubyte"
TRAIN_LABELS = "train-labels-idx1-ubyte"
TEST_IMAGES = "t10k-images-idx3-ubyte"
TEST_LABELS = "t10k-labels-idx1-ubyte"
#: The four files, each found raw or with a `.gz` suffix.
FILE_NAMES = (TRAIN_IMAGES, TRAIN_LABELS, TEST_IMAGES, TEST_LABELS)

#: Where Debian's package `dataset-fashion-mnist` installs the files.
DEBIAN_DIR = Path("/usr/share/datasets/fashion-mnist")

_log = logging.getLogger(__name__)

# Inside a root: the files themselves, our own folder name, torchvision's download layout.
_SUBDIRS = ("", "fashion-mnist", "FashionMNIST/raw")


def _find_file(directory: Path, name: str) -> Path | None:
    # The raw file first: torchvision keeps both, and the raw one needs no decompression.
    for candidate in (directory / name, directory / f"{name}.gz"):
        if candidate.is_file():
            return candidate
    return None


def _search(root: Path) -> tuple[dict[str, Path] | None, str]:
    """Return the four files under `root`, or None and why, for the error message."""
    if not root.is_dir():
        return None, f"{root}: no such directory"
    partial = []
    for sub in _SUBDIRS:
        directory = root / sub
        if not directory.is_dir():
            continue
        found = {name: path for name in FILE_NAMES if (path := _find_file(directory, name))}
        if len(found) == len(FILE_NAMES):
            return found, ""
        if found:
            missing = [name for name in FILE_NAMES if name not in found]
            partial.append(f"{directory} lacks {', '.join(missing)}")
    if partial:
        return None, "; ".join(partial)
    return None, "no Fashion-MNIST files in " + ", ".join(str(root / s) for s in _SUBDIRS)


def _not_found(tried: list[str], extra: str = "") -> DatasetNotFoundError:
    files = ", ".join(FILE_NAMES)
    lines = [
        "Fashion-MNIST not found." + (f" {extra}" if extra else ""),
        "Tried:",
        *(f"  - {t}" for t in tried),
        "Get it one of three ways:",
        f"  1. pass --data-dir DIR (data_dir=DIR), where DIR holds {files} (each may be .gz)",
        f"  2. sudo apt-get install dataset-fashion-mnist   (installs them into {DEBIAN_DIR})",
        "  3. pass --download (download=True) on a machine that is online; torchvision fetches"
        f" them into DIR, or {cache_dir()} when no --data-dir is given",
    ]
    return DatasetNotFoundError("\n".join(lines), tried)


def find_fashion_mnist(
    data_dir: str | Path | None = None, download: bool = False
) -> dict[str, Path]:
    """Return the paths of the four files by name, searching in the documented order.

    Raises DatasetNotFoundError listing every place searched and the three ways to get the data.
    """
    roots = user_roots(data_dir) + [
        ("Debian package dataset-fashion-mnist", DEBIAN_DIR),
        ("earlier download", cache_dir()),
    ]
    tried: list[str] = []
    for label, root in roots:
        if root is None:
            tried.append(f"{label}: not set")
            continue
        found, why = _search(root)
        if found is not None:
            if data_dir is not None and label != "data_dir":
                # Not an error (the data are the same), but a mistyped path should not go unseen.
                _log.warning("Fashion-MNIST not in data_dir (%s); using %s", tried[0], root)
            return found
        tried.append(f"{label}: {why}")
    if not download:
        raise _not_found(tried)

    target = Path(data_dir).expanduser() if data_dir is not None else cache_dir()
    # Imported here: torchvision is slow to import and needed only on this rare path.
    from torchvision.datasets import FashionMNIST

    try:
        FashionMNIST(root=str(target), train=True, download=True)
    except (OSError, RuntimeError) as exc:
        raise _not_found(tried, f"Download into {target} failed: {exc}") from exc
    found, why = _search(target)
    if found is None:
        raise _not_found(tried + [f"download into {target}: {why}"])
    return found


def _check(path: Path, array: np.ndarray, ndim: int, what: str) -> None:
    if array.dtype != np.uint8 or array.ndim != ndim:
        raise ValueError(
            f"{path}: expected {what} ({ndim}-d uint8), got {array.ndim}-d {array.dtype}"
        )


def _load_split(images_path: Path, labels_path: Path) -> tuple[torch.Tensor, torch.Tensor]:
    images = read_idx(images_path)
    labels = read_idx(labels_path)
    size = FASHION_MNIST.image_size
    _check(images_path, images, 3, "images")
    if images.shape[1:] != (size, size):
        raise ValueError(
            f"{images_path}: images are {images.shape[1]}x{images.shape[2]}, "
            f"Fashion-MNIST's are {size}x{size}"
        )
    _check(labels_path, labels, 1, "labels")
    if len(labels) != len(images):
        raise ValueError(
            f"{labels_path}: {len(labels)} labels for the {len(images)} images in {images_path}"
        )
    if len(labels) and labels.max() >= FASHION_MNIST.num_classes:
        raise ValueError(
            f"{labels_path}: label {labels.max()} outside [0, {FASHION_MNIST.num_classes})"
        )
    return torch.from_numpy(images).unsqueeze(1), torch.from_numpy(labels.astype(np.int64))


def load_fashion_mnist(data_dir: str | Path | None = None, download: bool = False) -> ImageData:
    """Load Fashion-MNIST as uint8 N x 1 x 28 x 28 images and int64 labels.

    A file that is found but corrupt raises ValueError rather than falling through to the next
    location: silently training on another copy than the one the user named would hide the fault.
    """
    files = find_fashion_mnist(data_dir, download)
    train_x, train_y = _load_split(files[TRAIN_IMAGES], files[TRAIN_LABELS])
    test_x, test_y = _load_split(files[TEST_IMAGES], files[TEST_LABELS])
    return ImageData(train_x, train_y, test_x, test_y, FASHION_MNIST)
