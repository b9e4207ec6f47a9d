"""Whether a data set can be loaded, checked at start-up in one line an operator can act on.

The coordinator loads its test split when it first evaluates, the agent its data before it
registers: a daemon that finds the data missing only then has already connected, waited for a
fleet, or been restarted by systemd in a loop of multi-line errors. Both command lines call
`check_available` first, which searches exactly where the loaders search (without reading or
downloading anything) and, when nothing is there, says where it looked and how to get the data.
"""

from __future__ import annotations

from pathlib import Path

from bitfleet.data import cifar, fashion_mnist
from bitfleet.data.sources import DATA_DIR_ENV, DatasetNotFoundError
from bitfleet.data.specs import get_spec

__all__ = ["check_available"]


def check_available(dataset: str, data_dir: str | Path | None = None) -> None:
    """Raise DatasetNotFoundError (one line) unless `dataset` is found from `data_dir`.

    Also ValueError for an unknown data set name. Passes whenever the loader would find a copy,
    including its fall-backs ($BITFLEET_DATA_DIR, the Debian package, an earlier download),
    except that a `data_dir` which is not there at all fails: at start-up a named folder that
    is missing is a typo to fix, not a fall-back warning to miss.
    """
    get_spec(dataset)  # fails with the list of known names
    missing = data_dir is not None and not Path(data_dir).expanduser().is_dir()
    named = [f"data_dir: {data_dir}: no such directory"]
    if dataset == "fashion-mnist":
        how = (
            f"put {', '.join(fashion_mnist.FILE_NAMES)} (each may be .gz) into data_dir "
            f"or ${DATA_DIR_ENV}, or install Debian's package dataset-fashion-mnist "
            f"(sudo apt-get install dataset-fashion-mnist, into {fashion_mnist.DEBIAN_DIR})"
        )
        try:
            if not missing:
                fashion_mnist.find_fashion_mnist(data_dir)
                return
        except DatasetNotFoundError as exc:
            raise _one_line("Fashion-MNIST", exc.tried, how) from None
        raise _one_line("Fashion-MNIST", named, how)
    src = cifar.SOURCES[dataset]
    root, tried = (None, named) if missing else cifar.find_root(src, data_dir)
    if root is None:
        how = (
            f"extract {src.url} so that DIR/{src.folder} exists and name DIR as data_dir or "
            f"${DATA_DIR_ENV}"
        )
        raise _one_line(src.title, tried, how)


def _one_line(title: str, tried: list[str], how: str) -> DatasetNotFoundError:
    return DatasetNotFoundError(f"{title} not found ({'; '.join(tried)}): {how}", tried)
