"""The rooms of the repository keep their import rule (docs/architecture.md#the-import-rule)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[3]
ROOMS = ("bitfleet", "edge_agent", "coordinator", "export", "fleet")
MAY_IMPORT = {
    "bitfleet": {"bitfleet"},
    "edge_agent": {"bitfleet", "edge_agent"},
    "coordinator": {"bitfleet", "coordinator"},
    "export": {"bitfleet", "export"},
    "fleet": set(ROOMS),
}


def _imported_rooms(path: Path) -> set[str]:
    """The rooms a module imports absolutely, at its top or inside functions."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
        else:
            continue
        found |= {n.split(".")[0] for n in names} & set(ROOMS)
    return found


@pytest.mark.parametrize("room", ROOMS)
def test_each_room_imports_only_what_it_may(room: str) -> None:
    modules = sorted((ROOT / room).rglob("*.py"))
    assert modules, f"{room}/ has no modules"
    wrong = {
        str(m.relative_to(ROOT)): sorted(_imported_rooms(m) - MAY_IMPORT[room]) for m in modules
    }
    assert {m: r for m, r in wrong.items() if r} == {}


def test_the_daemon_modules_stay_small() -> None:
    sizes = {p.name: len(p.read_text().splitlines()) for p in (ROOT / "coordinator").glob("*.py")}
    assert {name: n for name, n in sizes.items() if n > 500} == {}
    assert sizes["server.py"] <= 400, "the daemon's loop reads top to bottom"
