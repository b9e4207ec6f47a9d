"""One entry point that loads any supported data set by name."""

from __future__ import annotations

from pathlib import Path

from bitfleet.data.cifar import load_cifar
from bitfleet.data.fashion_mnist import load_fashion_mnist
from bitfleet.data.image_data import ImageData
from bitfleet.data.specs import get_spec

__all__ = ["load_dataset"]


def load_dataset(
    name: str, data_dir: str | Path | None = None, download: bool = False
) -> ImageData:
    """Load `name` (see DATASET_SPECS) from local files, downloading only when asked to.

    Downloads are opt-in because boards are often offline or metered: a silent download attempt
    would turn a wrong path into a long timeout instead of an error that says what to do.
    Raises ValueError for an unknown name and DatasetNotFoundError when no copy is reachable.
    """
    get_spec(name)  # fails with the list of known names
    if name == "fashion-mnist":
        return load_fashion_mnist(data_dir, download)
    return load_cifar(name, data_dir, download)
