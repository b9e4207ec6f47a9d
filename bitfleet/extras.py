"""Optional dependencies: a clear message naming the extra to install when one is missing.

A board installs bitfleet without extras (the agent needs none of them); the embedded broker,
provisioning and plots come with `bitfleet[demo]`, `bitfleet[coordinator]` and
`bitfleet[plots]` (docs/architecture.md#installing). `require` imports such a module where it is
needed, so a missing one says what to install instead of raising a bare ModuleNotFoundError.
"""

from __future__ import annotations

import importlib
from types import ModuleType


class MissingExtraError(ImportError):
    """An optional dependency is not installed; the message names the extra that brings it."""


def require(module: str, extra: str, what: str) -> ModuleType:
    """Import `module`, or raise MissingExtraError: "`what` needs PKG: pip install ..."."""
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as exc:
        package = module.split(".")[0]
        if exc.name is None or exc.name.split(".")[0] != package:
            raise  # something the optional package itself imports: not ours to explain
        raise MissingExtraError(
            f"{what} needs {package}: pip install 'bitfleet[{extra}]'"
        ) from None
