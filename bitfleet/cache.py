"""bitfleet's per-host cache: figures measured once on this machine and kept between runs.

The board model's host anchor (`edge_agent/board_model.py`) and the simulator's step costs
(`fleet/simulate/cost_model.py`) are measured once per host and cached here, so a run does not
time anything while it runs and two runs on one host use the same figures (docs/simulation.md).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import platform
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

CACHE_ENV = "BITFLEET_CACHE_DIR"


def cache_dir(folder: Path | None = None) -> Path:
    """The cache folder: `folder`, else $BITFLEET_CACHE_DIR, else $XDG_CACHE_HOME/bitfleet,
    else ~/.cache/bitfleet."""
    if folder is not None:
        return Path(folder)
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV])
    if os.environ.get("XDG_CACHE_HOME"):
        return Path(os.environ["XDG_CACHE_HOME"]) / "bitfleet"
    return Path.home() / ".cache" / "bitfleet"


def cpu_name() -> str:
    """The CPU's model name: /proc/cpuinfo's `model name`, else platform.processor()."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() == "model name" and value.strip():
                    return value.strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def read_json(path: Path) -> Any | None:
    """A cached JSON value, or None when the file is missing or unreadable (measure anew)."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:  # json.JSONDecodeError is a ValueError
        log.warning("cache file %s unreadable (%s): measuring anew", path, exc)
        return None


def write_json(path: Path, value: Any) -> None:
    """Write atomically (a temporary file, then os.replace), so a reader never sees half a
    file; a cache that cannot be written costs a measurement next time, nothing else."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                json.dump(value, f, indent=2, sort_keys=True)
                f.write("\n")
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
    except OSError as exc:
        log.warning("cannot write the cache file %s: %s", path, exc)


@contextlib.contextmanager
def file_lock(path: Path) -> Iterator[None]:
    """An exclusive lock on `path` (POSIX flock), so processes started together measure once,
    not all at once on the same cores; no lock where flock is absent or the folder is not
    writable."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX
        yield
        return
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        f = open(path, "a")  # noqa: SIM115 - held for the block
    except OSError:
        yield
        return
    with f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)
