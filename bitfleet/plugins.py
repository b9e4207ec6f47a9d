"""Pieces one role offers another, found by name through entry points.

Roles never import each other (docs/architecture.md#the-import-rule): the coordinator asks for "an
exporter named plain" here, and whichever installed package registered it under
`bitfleet.exporters` answers. The CLI finds role subcommands the same way, under
`bitfleet.commands`.
"""

from __future__ import annotations

from importlib.metadata import entry_points
from typing import Any


def load(group: str, name: str) -> Any:
    """The object registered as `name` in entry-point `group`; LookupError names what exists."""
    found = entry_points(group=group)
    for ep in found:
        if ep.name == name:
            return ep.load()
    known = sorted(ep.name for ep in found)
    raise LookupError(
        f"no {group!r} entry named {name!r} (known: {known}); is bitfleet installed with "
        "`pip install -e .`?"
    )


def load_all(group: str) -> dict[str, Any]:
    """Every object registered in `group`, by name, in a stable order."""
    return {ep.name: ep.load() for ep in sorted(entry_points(group=group), key=lambda e: e.name)}
