"""Data sets and their federated splits.

Images are loaded as uint8 NCHW tensors with int64 labels (`load_dataset`), described by a
`DatasetSpec` that is known without loading; `partition` splits sample indices among clients,
IID or Dirichlet label-skewed, reproducibly from a seed.
"""

from bitfleet.data.datasets import load_dataset
from bitfleet.data.fashion_mnist import find_fashion_mnist
from bitfleet.data.idx import read_idx
from bitfleet.data.image_data import ImageData, to_float
from bitfleet.data.partition import (
    PARTITION_SCHEMES,
    dirichlet_partition,
    iid_partition,
    label_histogram,
    partition,
)
from bitfleet.data.sources import DATA_DIR_ENV, DatasetNotFoundError
from bitfleet.data.specs import DATASET_SPECS, DatasetSpec, get_spec
from bitfleet.data.validation import DEFAULT_VALIDATION_FRACTION, carve_validation

__all__ = [
    "DATASET_SPECS",
    "DATA_DIR_ENV",
    "DEFAULT_VALIDATION_FRACTION",
    "PARTITION_SCHEMES",
    "DatasetNotFoundError",
    "DatasetSpec",
    "ImageData",
    "carve_validation",
    "dirichlet_partition",
    "find_fashion_mnist",
    "get_spec",
    "iid_partition",
    "label_histogram",
    "load_dataset",
    "partition",
    "read_idx",
    "to_float",
]
