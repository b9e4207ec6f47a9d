"""Where data sets are looked for, and the error that says where they were not found."""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["DATA_DIR_ENV", "DatasetNotFoundError", "cache_dir", "user_roots"]

#: Environment variable naming a directory that holds data sets, for when no --data-dir is given.
DATA_DIR_ENV = "BITFLEET_DATA_DIR"


class DatasetNotFoundError(FileNotFoundError):
    """No copy of a data set could be reached.

    A FileNotFoundError, so callers that already handle missing files handle this too; `tried`
    keeps the places that were searched, one line each, for programs that report them their way.
    """

    def __init__(self, message: str, tried: list[str]) -> None:
        super().__init__(message)
        self.tried = tried


def cache_dir() -> Path:
    """Directory that downloads go to when no data directory is given (XDG cache convention)."""
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "bitfleet"


def user_roots(data_dir: str | Path | None) -> list[tuple[str, Path | None]]:
    """The directories the user pointed at, as (label, directory) in search order.

    The explicit directory comes first, then $BITFLEET_DATA_DIR; an unset variable stays in the
    list as None so that the error message can say it was consulted.
    """
    roots: list[tuple[str, Path | None]] = []
    if data_dir is not None:
        roots.append(("data_dir", Path(data_dir).expanduser()))
    env = os.environ.get(DATA_DIR_ENV)
    roots.append((f"${DATA_DIR_ENV}", Path(env).expanduser() if env else None))
    return roots
