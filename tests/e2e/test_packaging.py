"""Packaging: the wheel a board installs carries the profiles and only what the agent needs.

The wheel is built from a copy of the source tree (so the checkout's `build/` and egg-info are
left alone) and installed with `pip --target`, never editable: that is how a board installs
bitfleet, and the only install where the profiles cannot come from the checkout by accident.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import zipfile
from email.parser import Parser
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PROFILES = sorted(p.name for p in (ROOT / "profiles").glob("*.toml"))
AGENT_DEPENDENCIES = {
    "torch",
    "torchvision",
    "numpy",
    "onnx",
    "onnxruntime",
    "paho-mqtt",
    "psutil",
    "safetensors",
    "tomli",
}
_NOT_SOURCE = shutil.ignore_patterns(
    ".git", ".venv", "build", "dist", "runs", "*.egg-info", "__pycache__", ".*_cache",
    ".hypothesis", "*.onnx",
)  # fmt: skip


def _pip(*args: str, cwd: Path) -> None:
    """Run pip offline in this interpreter; a failure shows pip's own output."""
    cmd = [sys.executable, "-m", "pip", "--disable-pip-version-check", *args, "--no-index"]
    done = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, f"{' '.join(cmd)} failed:\n{done.stdout}\n{done.stderr}"


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    work = tmp_path_factory.mktemp("packaging")
    source = work / "source"
    shutil.copytree(ROOT, source, symlinks=True, ignore=_NOT_SOURCE)
    _pip("wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(work), ".", cwd=source)
    (built,) = work.glob("bitfleet-*.whl")
    return built


def _requirements(wheel: Path) -> dict[str | None, set[str]]:
    """Requires-Dist of the wheel's METADATA: project names by extra (None: the base install)."""
    with zipfile.ZipFile(wheel) as zf:
        (name,) = [n for n in zf.namelist() if n.endswith(".dist-info/METADATA")]
        metadata = Parser().parsestr(zf.read(name).decode())
    by_extra: dict[str | None, set[str]] = {}
    for line in metadata.get_all("Requires-Dist") or []:
        project = re.match(r"[A-Za-z0-9._-]+", line)
        assert project, line
        extra = re.search(r"""extra\s*==\s*["']([^"']+)["']""", line)
        by_extra.setdefault(extra and extra.group(1), set()).add(project.group(0).lower())
    return by_extra


def test_wheel_ships_the_profiles_and_keeps_server_tools_in_extras(wheel):
    assert PROFILES, "no profiles/*.toml in the checkout"
    with zipfile.ZipFile(wheel) as zf:
        shipped = {Path(n).name for n in zf.namelist() if n.startswith("bitfleet/board_profiles/")}
    assert shipped == set(PROFILES)

    requires = _requirements(wheel)
    assert requires[None] == AGENT_DEPENDENCIES
    assert "amqtt" in requires["demo"] and "cryptography" in requires["demo"]
    assert "cryptography" in requires["coordinator"]
    assert "matplotlib" in requires["plots"]
    assert requires["all"] == {"bitfleet"}  # bitfleet[coordinator,demo,plots]
    assert {"pytest", "bitfleet"} <= requires["test"]


# Runs against the wheel's install: the cwd and the checkout leave sys.path before bitfleet is
# imported; the editable finder of a dev venv stays, last in sys.meta_path, and must not answer.
_RUN_INSTALLED = """
import json, os, sys
target, root = sys.argv[1], sys.argv[2]
sys.path[:] = [p for p in sys.path if p not in ("", os.getcwd(), root)]
assert sys.path[0] == target, sys.path
from bitfleet import profiles
from bitfleet.cli.main import main
print(json.dumps({"module": profiles.__file__, "dir": str(profiles.profiles_dir())}))
sys.exit(main(sys.argv[3:]))
"""


def test_non_editable_install_finds_its_board_profile(wheel, tmp_path):
    target = tmp_path / "site"
    _pip("install", "--no-deps", "-q", "--target", str(target), str(wheel), cwd=tmp_path)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "BITFLEET_PROFILES_DIR"}
    env["PYTHONPATH"] = str(target)
    out = elsewhere / "profile.json"
    done = subprocess.run(
        [sys.executable, "-c", _RUN_INSTALLED, str(target), str(ROOT)]
        + ["profile", "--no-steps", "--json", str(out)],
        cwd=elsewhere,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, f"{done.stdout}\n{done.stderr}"
    where = json.loads(done.stdout.splitlines()[0])
    # The installed copy answered, not the checkout through the editable finder.
    assert Path(where["module"]).is_relative_to(target), where
    assert Path(where["dir"]) == (target / "bitfleet" / "board_profiles").resolve(), where
    summary = json.loads(out.read_text())
    assert f"{summary['board']['name']}.toml" in PROFILES
    assert "closest known kind:" in done.stdout
