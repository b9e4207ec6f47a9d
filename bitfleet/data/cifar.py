"""CIFAR-10 and CIFAR-100 from a local directory in torchvision's layout.

torchvision reads the pickled batches and checks their checksums; this module decides where to
look, turns the NHWC arrays into the NCHW uint8 tensors the rest of bitfleet uses, and makes a
missing copy an error that says where it was looked for and how to get it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from bitfleet.data.image_data import ImageData
from bitfleet.data.sources import DatasetNotFoundError, cache_dir, user_roots
from bitfleet.data.specs import CIFAR10, CIFAR100, DatasetSpec

__all__ = ["SOURCES", "CifarSource", "find_root", "load_cifar"]


@dataclass(frozen=True)
class CifarSource:
    """Where one CIFAR data set comes from and what its extracted folder is called."""

    spec: DatasetSpec
    title: str
    torchvision_class: str
    folder: str
    url: str


SOURCES = {
    "cifar10": CifarSource(
        CIFAR10,
        "CIFAR-10",
        "CIFAR10",
        "cifar-10-batches-py",
        "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
    ),
    "cifar100": CifarSource(
        CIFAR100,
        "CIFAR-100",
        "CIFAR100",
        "cifar-100-python",
        "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz",
    ),
}


_log = logging.getLogger(__name__)


def _not_found(src: CifarSource, tried: list[str], extra: str = "") -> DatasetNotFoundError:
    lines = [
        f"{src.title} not found." + (f" {extra}" if extra else ""),
        f"Looked for {src.folder}/ in:",
        *(f"  - {t}" for t in tried),
        "Get it one of two ways:",
        f"  1. pass --data-dir DIR (data_dir=DIR), where DIR/{src.folder} is the extracted"
        f" {src.url}",
        "  2. pass --download (download=True) on a machine that is online; torchvision fetches"
        f" it into DIR, or {cache_dir()} when no --data-dir is given",
    ]
    return DatasetNotFoundError("\n".join(lines), tried)


def find_root(src: CifarSource, data_dir: str | Path | None) -> tuple[Path | None, list[str]]:
    """The folder holding `src` (None: nowhere) and each place looked at, in the loader's order:
    what `load_cifar` reads and `bitfleet.data.availability` checks at start-up."""
    roots = user_roots(data_dir) + [("earlier download", cache_dir())]
    tried: list[str] = []
    for label, root in roots:
        if root is None:
            tried.append(f"{label}: not set")
            continue
        # Accept the data set's own folder as well as its parent: both are what users type.
        found = root.parent if root.name == src.folder and root.is_dir() else root
        if (found / src.folder).is_dir():
            if data_dir is not None and label != "data_dir":
                # Not an error (the data are the same), but a mistyped path should not go unseen.
                _log.warning("%s not in data_dir (%s); using %s", src.title, tried[0], found)
            return found, tried
        tried.append(f"{label}: {root / src.folder}: no such directory")
    return None, tried


def load_cifar(name: str, data_dir: str | Path | None = None, download: bool = False) -> ImageData:
    """Load CIFAR-10 (`name="cifar10"`) or CIFAR-100 (`"cifar100"`) as uint8 NCHW tensors."""
    src = SOURCES[name]
    root, tried = find_root(src, data_dir)
    if root is None:
        if not download:
            raise _not_found(src, tried)
        root = Path(data_dir).expanduser() if data_dir is not None else cache_dir()
    # Imported here: torchvision is slow to import and the Fashion-MNIST path never needs it.
    import torchvision.datasets

    cls = getattr(torchvision.datasets, src.torchvision_class)
    try:
        train = cls(root=str(root), train=True, download=download)
        test = cls(root=str(root), train=False, download=download)
    except (OSError, RuntimeError) as exc:
        # torchvision says "not found or corrupted" for a missing or a damaged folder alike.
        raise _not_found(src, tried, f"Reading {root / src.folder} failed: {exc}") from exc

    def tensors(ds: torchvision.datasets.VisionDataset) -> tuple[torch.Tensor, torch.Tensor]:
        x = torch.from_numpy(ds.data).permute(0, 3, 1, 2).contiguous()
        return x, torch.as_tensor(ds.targets, dtype=torch.int64)

    train_x, train_y = tensors(train)
    test_x, test_y = tensors(test)
    return ImageData(train_x, train_y, test_x, test_y, src.spec)
