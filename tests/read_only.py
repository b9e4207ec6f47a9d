"""Directories that refuse new files, also to root: CI runs the tests as root."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Callable
from pathlib import Path


def make_read_only(*dirs: Path) -> Callable[[], None] | None:
    """Stop new entries in `dirs`; return the undo, or None where this machine cannot.

    chmod 0555 stops every user but root. For root, the immutable flag does (`chattr +i`: ext4,
    xfs, btrfs; needs CAP_LINUX_IMMUTABLE): nothing can be created, renamed or removed in the
    directory, while files already open there, such as SQLite's, stay writable.
    """
    names = [str(d) for d in dirs]
    if os.geteuid() != 0:
        for d in dirs:
            d.chmod(0o555)

        def writable() -> None:
            for d in dirs:
                d.chmod(0o755)

        return writable
    try:
        done = subprocess.run(["chattr", "+i", *names], capture_output=True)
    except FileNotFoundError:  # no e2fsprogs
        return None

    def mutable() -> None:
        subprocess.run(["chattr", "-i", *names], capture_output=True)

    if done.returncode != 0:
        mutable()  # any directory that did take the flag
        return None
    return mutable
