"""Tests for bitfleet.data: IDX reading, data set lookup and loading, federated partitions."""

from __future__ import annotations

import gzip
import logging
import os
import re
import struct
import urllib.error
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision.datasets
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from bitfleet.data import (
    DATASET_SPECS,
    DatasetNotFoundError,
    dirichlet_partition,
    get_spec,
    iid_partition,
    label_histogram,
    load_dataset,
    partition,
    read_idx,
    to_float,
)
from bitfleet.data import fashion_mnist as fm

# ---------------------------------------------------------------------------------------------
# Helpers: an IDX writer independent of the reader under test, and tiny Fashion-MNIST copies.

_CODES = {
    np.dtype(np.uint8): 0x08,
    np.dtype(np.int8): 0x09,
    np.dtype(np.int16): 0x0B,
    np.dtype(np.int32): 0x0C,
    np.dtype(np.float32): 0x0D,
    np.dtype(np.float64): 0x0E,
}


def idx_bytes(array: np.ndarray) -> bytes:
    header = bytes([0, 0, _CODES[array.dtype], array.ndim])
    header += struct.pack(f">{array.ndim}I", *array.shape)
    return header + array.astype(array.dtype.newbyteorder(">")).tobytes()


def write_idx(path: Path, array: np.ndarray, gz: bool) -> Path:
    data = idx_bytes(array)
    if gz:
        path = path.with_name(path.name + ".gz")
        data = gzip.compress(data)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def make_fashion_mnist(
    directory: Path, gz: bool, n_train: int = 7, n_test: int = 3, seed: int = 0
) -> dict[str, np.ndarray]:
    """Write a tiny random Fashion-MNIST copy; return the arrays written, by file name."""
    rng = np.random.default_rng(seed)
    arrays = {
        fm.TRAIN_IMAGES: rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8),
        fm.TRAIN_LABELS: rng.integers(0, 10, n_train, dtype=np.uint8),
        fm.TEST_IMAGES: rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8),
        fm.TEST_LABELS: rng.integers(0, 10, n_test, dtype=np.uint8),
    }
    for name, array in arrays.items():
        write_idx(directory / name, array, gz)
    return arrays


@pytest.fixture
def isolated(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Hide every copy of the data this machine may hold: no env var, no Debian dir, no cache."""
    monkeypatch.delenv("BITFLEET_DATA_DIR", raising=False)
    monkeypatch.setattr(fm, "DEBIAN_DIR", tmp_path / "no-debian")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    return tmp_path


# ---------------------------------------------------------------------------------------------
# IDX files


@settings(max_examples=40, deadline=None)
@given(
    array=hnp.arrays(
        dtype=st.sampled_from(sorted(_CODES, key=str)),
        shape=hnp.array_shapes(min_dims=1, max_dims=4, min_side=0, max_side=5),
    ),
    gz=st.booleans(),
)
def test_read_idx_round_trips_every_dtype(tmp_path_factory, array: np.ndarray, gz: bool) -> None:
    path = write_idx(tmp_path_factory.mktemp("idx") / "a-idx", array, gz)
    got = read_idx(path)
    assert got.dtype == array.dtype.newbyteorder("=")
    assert got.shape == array.shape
    np.testing.assert_array_equal(got, array)


@pytest.mark.parametrize("gz", [False, True], ids=["raw", "gz"])
@pytest.mark.parametrize("subdir", ["", "fashion-mnist", "FashionMNIST/raw"])
def test_load_fashion_mnist_from_generated_idx(isolated: Path, gz: bool, subdir: str) -> None:
    arrays = make_fashion_mnist(isolated / "data" / subdir, gz)
    data = load_dataset("fashion-mnist", data_dir=isolated / "data")

    assert data.spec is get_spec("fashion-mnist")
    assert data.train_x.shape == (7, 1, 28, 28) and data.test_x.shape == (3, 1, 28, 28)
    assert data.train_x.dtype == data.test_x.dtype == torch.uint8
    assert data.train_y.dtype == data.test_y.dtype == torch.int64
    np.testing.assert_array_equal(data.train_x[:, 0].numpy(), arrays[fm.TRAIN_IMAGES])
    np.testing.assert_array_equal(data.train_y.numpy(), arrays[fm.TRAIN_LABELS])
    np.testing.assert_array_equal(data.test_x[:, 0].numpy(), arrays[fm.TEST_IMAGES])
    np.testing.assert_array_equal(data.test_y.numpy(), arrays[fm.TEST_LABELS])


def _corrupt_magic(data: bytes) -> bytes:
    return b"\x01\x02" + data[2:]


def _truncate(data: bytes) -> bytes:
    return data[:-10]


def _bad_dims(data: bytes) -> bytes:
    return data[:4] + struct.pack(">I", 8) + data[8:]  # header claims one more image


@pytest.mark.parametrize("gz", [False, True], ids=["raw", "gz"])
@pytest.mark.parametrize("damage", [_corrupt_magic, _truncate, _bad_dims])
def test_corrupt_idx_raises_value_error_naming_the_file(isolated: Path, gz: bool, damage) -> None:
    make_fashion_mnist(isolated, gz=False)
    path = isolated / fm.TRAIN_IMAGES
    data = damage(path.read_bytes())
    if gz:
        path.unlink()
        path = path.with_name(path.name + ".gz")
        data = gzip.compress(data)
    path.write_bytes(data)
    with pytest.raises(ValueError, match=re.escape(str(path))):
        load_dataset("fashion-mnist", data_dir=isolated)


def test_truncated_gzip_stream_raises_value_error_naming_the_file(tmp_path: Path) -> None:
    path = write_idx(tmp_path / "labels-idx1-ubyte", np.arange(200, dtype=np.uint8), gz=True)
    path.write_bytes(path.read_bytes()[:-20])
    with pytest.raises(ValueError, match=re.escape(str(path))):
        read_idx(path)


def test_wrong_image_size_and_label_count_are_rejected(isolated: Path) -> None:
    make_fashion_mnist(isolated, gz=False)
    write_idx(isolated / fm.TEST_IMAGES, np.zeros((3, 32, 32), np.uint8), gz=False)
    with pytest.raises(ValueError, match="32x32"):
        load_dataset("fashion-mnist", data_dir=isolated)
    make_fashion_mnist(isolated, gz=False)
    write_idx(isolated / fm.TEST_LABELS, np.zeros(4, np.uint8), gz=False)
    with pytest.raises(ValueError, match="4 labels for the 3 images"):
        load_dataset("fashion-mnist", data_dir=isolated)


# ---------------------------------------------------------------------------------------------
# Finding the data


def test_missing_fashion_mnist_names_the_three_ways_and_the_paths_tried(isolated: Path) -> None:
    missing = isolated / "does-not-exist"
    with pytest.raises(DatasetNotFoundError) as info:
        load_dataset("fashion-mnist", data_dir=missing)
    message = str(info.value)
    assert isinstance(info.value, FileNotFoundError)
    assert "--data-dir DIR" in message
    for name in fm.FILE_NAMES:
        assert name in message
    assert "sudo apt-get install dataset-fashion-mnist" in message
    assert "--download" in message and "online" in message
    for tried in (missing, fm.DEBIAN_DIR, isolated / "cache" / "bitfleet"):
        assert str(tried) in message
    assert "$BITFLEET_DATA_DIR: not set" in message
    assert len(info.value.tried) == 4


def test_incomplete_directory_names_the_missing_file(isolated: Path) -> None:
    make_fashion_mnist(isolated / "d", gz=True)
    (isolated / "d" / f"{fm.TEST_LABELS}.gz").unlink()
    with pytest.raises(DatasetNotFoundError, match=f"lacks {fm.TEST_LABELS}"):
        load_dataset("fashion-mnist", data_dir=isolated / "d")


def test_lookup_order_data_dir_then_env_then_debian(
    isolated: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    explicit = make_fashion_mnist(isolated / "explicit", gz=False, n_train=5, seed=1)
    env = make_fashion_mnist(isolated / "env", gz=True, n_train=6, seed=2)
    debian = make_fashion_mnist(isolated / "debian", gz=True, n_train=4, seed=3)
    monkeypatch.setattr(fm, "DEBIAN_DIR", isolated / "debian")
    monkeypatch.setenv("BITFLEET_DATA_DIR", str(isolated / "env"))

    def train_labels(**kwargs) -> np.ndarray:
        return load_dataset("fashion-mnist", **kwargs).train_y.numpy()

    np.testing.assert_array_equal(
        train_labels(data_dir=isolated / "explicit"), explicit[fm.TRAIN_LABELS]
    )
    np.testing.assert_array_equal(train_labels(), env[fm.TRAIN_LABELS])
    with caplog.at_level(logging.WARNING, logger=fm.__name__):
        np.testing.assert_array_equal(
            train_labels(data_dir=isolated / "typo"), env[fm.TRAIN_LABELS]
        )
    assert str(isolated / "typo") in caplog.text  # a mistyped --data-dir does not go unseen
    monkeypatch.delenv("BITFLEET_DATA_DIR")
    np.testing.assert_array_equal(train_labels(), debian[fm.TRAIN_LABELS])


def test_download_only_when_asked(isolated: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[Path] = []

    class FakeFashionMNIST:
        """Stands in for torchvision's class: writes files where torchvision would."""

        def __init__(self, root: str, train: bool, download: bool) -> None:
            calls.append(Path(root))
            make_fashion_mnist(Path(root) / "FashionMNIST" / "raw", gz=False)

    monkeypatch.setattr(torchvision.datasets, "FashionMNIST", FakeFashionMNIST)
    with pytest.raises(DatasetNotFoundError):
        load_dataset("fashion-mnist")
    assert calls == []

    data = load_dataset("fashion-mnist", data_dir=isolated / "mine", download=True)
    assert calls == [isolated / "mine"] and len(data.train_y) == 7
    load_dataset("fashion-mnist", download=True)
    assert calls[-1] == isolated / "cache" / "bitfleet"
    load_dataset("fashion-mnist")  # the earlier download is found without downloading again
    load_dataset("fashion-mnist", data_dir=isolated / "mine", download=True)
    assert len(calls) == 2


def test_failed_download_says_so(isolated: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def offline(root: str, train: bool, download: bool) -> None:
        raise urllib.error.URLError("Name or service not known")

    monkeypatch.setattr(torchvision.datasets, "FashionMNIST", offline)
    with pytest.raises(DatasetNotFoundError, match="failed: .*Name or service not known"):
        load_dataset("fashion-mnist", download=True)


@pytest.mark.parametrize(
    ("name", "folder"), [("cifar10", "cifar-10-batches-py"), ("cifar100", "cifar-100-python")]
)
def test_missing_cifar_names_where_and_how(isolated: Path, name: str, folder: str) -> None:
    with pytest.raises(DatasetNotFoundError) as info:
        load_dataset(name, data_dir=isolated / "nowhere")
    message = str(info.value)
    assert str(isolated / "nowhere" / folder) in message
    assert str(isolated / "cache" / "bitfleet" / folder) in message
    assert "--data-dir DIR" in message and "--download" in message
    assert "cs.toronto.edu" in message


@pytest.mark.parametrize("point_at_folder", [False, True])
def test_cifar_is_converted_to_uint8_nchw(
    isolated: Path, monkeypatch: pytest.MonkeyPatch, point_at_folder: bool
) -> None:
    (isolated / "cifar-10-batches-py").mkdir()
    rng = np.random.default_rng(0)
    split_data = {
        True: rng.integers(0, 256, (5, 32, 32, 3), dtype=np.uint8),
        False: rng.integers(0, 256, (2, 32, 32, 3), dtype=np.uint8),
    }

    class FakeCIFAR10:
        """torchvision's CIFAR10 interface: NHWC uint8 `data`, list `targets`."""

        def __init__(self, root: str, train: bool, download: bool) -> None:
            assert Path(root) == isolated and not download
            self.data = split_data[train]
            self.targets = list(range(len(self.data)))

    monkeypatch.setattr(torchvision.datasets, "CIFAR10", FakeCIFAR10)
    data_dir = isolated / "cifar-10-batches-py" if point_at_folder else isolated
    data = load_dataset("cifar10", data_dir=data_dir)
    assert data.train_x.shape == (5, 3, 32, 32) and data.train_x.dtype == torch.uint8
    assert data.train_x.is_contiguous()
    np.testing.assert_array_equal(data.train_x.permute(0, 2, 3, 1).numpy(), split_data[True])
    np.testing.assert_array_equal(data.test_y.numpy(), [0, 1])
    assert data.test_y.dtype == torch.int64


def test_unknown_name_lists_the_known_ones() -> None:
    with pytest.raises(ValueError, match="fashion-mnist, cifar10, cifar100"):
        load_dataset("mnist")


# ---------------------------------------------------------------------------------------------
# Specs and conversion


def test_specs_are_consistent() -> None:
    assert {n: s.num_classes for n, s in DATASET_SPECS.items()} == {
        "fashion-mnist": 10,
        "cifar10": 10,
        "cifar100": 100,
    }
    for spec in DATASET_SPECS.values():
        assert len(set(spec.class_names)) == spec.num_classes
        assert len(spec.mean) == len(spec.std) == spec.in_channels
    assert get_spec("cifar100").class_names[-1] == "worm"


def test_to_float_scales_uint8_and_passes_float_through() -> None:
    x = torch.tensor([[0, 51, 255]], dtype=torch.uint8)
    y = to_float(x)
    assert y.dtype == torch.float32
    torch.testing.assert_close(y, torch.tensor([[0.0, 0.2, 1.0]]))
    assert x.dtype == torch.uint8 and int(x[0, 2]) == 255
    f = torch.tensor([0.25])
    assert to_float(f) is f


# ---------------------------------------------------------------------------------------------
# The real data set, from the Debian package


def test_real_fashion_mnist_from_debian_package(monkeypatch: pytest.MonkeyPatch) -> None:
    if not fm.DEBIAN_DIR.is_dir() and os.environ.get("CI") != "true":
        pytest.skip(f"{fm.DEBIAN_DIR} absent: sudo apt-get install dataset-fashion-mnist")
    monkeypatch.delenv("BITFLEET_DATA_DIR", raising=False)
    data = load_dataset("fashion-mnist")
    assert len(data.train_x) == 60000 and len(data.test_x) == 10000
    assert data.spec.num_classes == 10
    np.testing.assert_array_equal(np.bincount(data.train_y.numpy()), np.full(10, 6000))
    np.testing.assert_array_equal(np.bincount(data.test_y.numpy()), np.full(10, 1000))
    x = to_float(data.train_x)
    assert x.mean().item() == pytest.approx(data.spec.mean[0], abs=1e-4)
    assert x.std().item() == pytest.approx(data.spec.std[0], abs=1e-4)


# ---------------------------------------------------------------------------------------------
# Partitions

label_arrays = hnp.arrays(np.int64, st.integers(0, 400), elements=st.integers(0, 9))
seeds = st.integers(0, 2**32 - 1)


def assert_exact_cover(parts: list[np.ndarray], n: int, n_clients: int) -> None:
    assert len(parts) == n_clients
    for part in parts:
        assert np.all(np.diff(part) > 0)  # sorted, no repeats within a client
    np.testing.assert_array_equal(np.sort(np.concatenate(parts)), np.arange(n))


@given(n=st.integers(1, 3000), n_clients=st.integers(1, 50), seed=seeds)
def test_iid_every_sample_exactly_once_in_balanced_shares(
    n: int, n_clients: int, seed: int
) -> None:
    n_clients = min(n_clients, n)
    parts = iid_partition(n, n_clients, seed)
    assert_exact_cover(parts, n, n_clients)
    sizes = [len(p) for p in parts]
    assert max(sizes) - min(sizes) <= 1


@given(labels=label_arrays, n_clients=st.integers(1, 20), alpha=st.floats(0.01, 1000.0), seed=seeds)
def test_dirichlet_every_sample_exactly_once(
    labels: np.ndarray, n_clients: int, alpha: float, seed: int
) -> None:
    parts = dirichlet_partition(labels, n_clients, alpha, seed, min_size=0)
    assert_exact_cover(parts, len(labels), n_clients)
    hists = [label_histogram(labels, p, 10) for p in parts]
    np.testing.assert_array_equal(np.sum(hists, axis=0), np.bincount(labels, minlength=10))


@given(
    labels=label_arrays,
    n_clients=st.integers(1, 20),
    alpha=st.floats(0.05, 100.0),
    min_size=st.integers(1, 10),
    seed=seeds,
)
def test_dirichlet_min_size_is_respected_or_refused(
    labels: np.ndarray, n_clients: int, alpha: float, min_size: int, seed: int
) -> None:
    if n_clients * min_size > len(labels):
        with pytest.raises(ValueError, match="n_clients"):
            dirichlet_partition(labels, n_clients, alpha, seed, min_size=min_size)
        return
    try:
        parts = dirichlet_partition(labels, n_clients, alpha, seed, min_size, max_tries=50)
    except ValueError as exc:
        assert "50 tries" in str(exc)  # refused loudly, never a short client
        return
    assert_exact_cover(parts, len(labels), n_clients)
    assert min(len(p) for p in parts) >= min_size


def test_dirichlet_min_size_met_on_a_feasible_split() -> None:
    labels = np.repeat(np.arange(10), 100)
    parts = dirichlet_partition(labels, 20, alpha=0.3, seed=0, min_size=20)
    assert min(len(p) for p in parts) >= 20


@given(
    scheme=st.sampled_from(["iid", "dirichlet"]),
    n_clients=st.integers(2, 10),
    seed=seeds,
    other=seeds,
)
def test_partitions_are_a_function_of_the_seed(
    scheme: str, n_clients: int, seed: int, other: int
) -> None:
    labels = np.tile(np.arange(10), 30)
    first = partition(labels, n_clients, scheme, seed, alpha=0.5)
    again = partition(labels, n_clients, scheme, seed, alpha=0.5)
    assert all(np.array_equal(a, b) for a, b in zip(first, again, strict=True))
    if other != seed:
        moved = partition(labels, n_clients, scheme, other, alpha=0.5)
        assert not all(np.array_equal(a, b) for a, b in zip(first, moved, strict=True))


def test_partition_dispatches_by_name() -> None:
    labels = np.repeat(np.arange(10), 20)
    for got, want in [
        (partition(labels, 4, "iid", 3), iid_partition(len(labels), 4, 3)),
        (partition(labels, 4, "dirichlet", 3, alpha=0.2), dirichlet_partition(labels, 4, 0.2, 3)),
    ]:
        assert all(np.array_equal(a, b) for a, b in zip(got, want, strict=True))


def mean_total_variation(labels: np.ndarray, parts: list[np.ndarray], num_classes: int) -> float:
    """Mean over clients of the TV distance between client and global label distributions."""
    hists = np.stack([label_histogram(labels, p, num_classes) for p in parts]).astype(float)
    client = hists / hists.sum(axis=1, keepdims=True)
    overall = np.bincount(labels, minlength=num_classes) / len(labels)
    return float(0.5 * np.abs(client - overall).sum(axis=1).mean())


@settings(max_examples=25, deadline=None)
@given(seed=seeds)
def test_dirichlet_skew_grows_as_alpha_shrinks(seed: int) -> None:
    labels = np.repeat(np.arange(10), 500)
    skew = [
        mean_total_variation(labels, dirichlet_partition(labels, 10, alpha, seed), 10)
        for alpha in (0.1, 1.0, 100.0)
    ]
    assert skew[0] > skew[1] > skew[2]
    assert skew[2] < 0.1  # alpha = 100 is close to IID


def test_label_histogram_counts_and_checks_range() -> None:
    labels = np.array([0, 2, 2, 1, 2])
    np.testing.assert_array_equal(label_histogram(labels, np.array([1, 2, 3]), 4), [0, 1, 2, 0])
    with pytest.raises(ValueError, match=r"\[0, 2\)"):
        label_histogram(labels, np.arange(5), 2)


@pytest.mark.parametrize(
    ("call", "pattern"),
    [
        (lambda y: dirichlet_partition(y, 4, 0.0, 0), "alpha"),
        (lambda y: dirichlet_partition(y, 4, -1.0, 0), "alpha"),
        (lambda y: dirichlet_partition(y, 4, float("nan"), 0), "alpha"),
        (lambda y: dirichlet_partition(y, 4, float("inf"), 0), "alpha"),
        (lambda y: dirichlet_partition(y, 0, 1.0, 0), "n_clients"),
        (lambda y: dirichlet_partition(y, 4, 1.0, 0, min_size=-1), "min_size"),
        (lambda y: dirichlet_partition(y, 4, 1.0, 0, min_size=6), "min_size=6"),
        (lambda y: dirichlet_partition(y, 4, 1.0, 0, max_tries=0), "max_tries"),
        (lambda y: dirichlet_partition(y.reshape(2, 10), 4, 1.0, 0), "labels"),
        (lambda y: dirichlet_partition(y.astype(float), 4, 1.0, 0), "labels"),
        (
            lambda y: dirichlet_partition(
                np.repeat([0, 1], 10), 10, 1e-3, 0, min_size=2, max_tries=3
            ),
            "raise alpha",
        ),
        (lambda y: iid_partition(3, 4, 0), "n_clients"),
        (lambda y: iid_partition(20, 0, 0), "n_clients"),
        (lambda y: partition(y, 4, "shards", 0), "iid, dirichlet"),
    ],
)
def test_bad_partition_arguments_raise(call, pattern: str) -> None:
    with pytest.raises(ValueError, match=pattern):
        call(np.arange(20) % 5)
