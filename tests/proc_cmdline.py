"""Which processes show a secret on their command line (docs/security.md#broker-credentials).

Every local user can read `/proc/PID/cmdline` of every process (that is what `ps` shows), so a
password passed as an argument is as good as published on a shared machine. Tests scan all of
them, repeatedly while their processes run (`CmdlineSampler`), since a short-lived process
would slip between two scans.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from types import TracebackType

__all__ = ["CmdlineSampler", "command_lines", "fleet_passwords", "processes_showing"]


def fleet_passwords(fleet_dir: Path) -> list[str]:
    """Every password of a provisioned fleet, once it is written; [] before (or mid-write)."""
    from fleet.provision import load_provisioned

    try:
        fleet = load_provisioned(fleet_dir)
    except (OSError, ValueError, KeyError):
        return []
    return [fleet.coordinator_password, *fleet.devices.values()]


def command_lines() -> dict[int, str]:
    """pid -> command line (arguments joined by spaces) of every process that can be read."""
    lines = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            raw = (entry / "cmdline").read_bytes()
        except OSError:  # gone meanwhile, or hidden from us
            continue
        if raw:  # kernel threads and zombies have none
            lines[int(entry.name)] = raw.rstrip(b"\0").replace(b"\0", b" ").decode(errors="replace")
    return lines


def _showing(lines: Mapping[int, str], secrets: Sequence[str]) -> list[str]:
    """'pid N: cmdline' for each line holding a secret, the secrets blanked out of the report."""
    found = []
    for pid, line in sorted(lines.items()):
        if any(secret in line for secret in secrets):
            for secret in secrets:
                line = line.replace(secret, "<secret>")
            found.append(f"pid {pid}: {line}")
    return found


def processes_showing(secrets: Iterable[str]) -> list[str]:
    """The processes whose command line holds any of `secrets`, now, as 'pid N: cmdline'."""
    wanted = [secret for secret in secrets if secret]  # "" is in every line
    return _showing(command_lines(), wanted) if wanted else []


class CmdlineSampler:
    """Scan all command lines every `interval` s in a thread, within a `with` block.

    `secrets()` gives the passwords to look for (empty while not yet known, e.g. before a demo
    has provisioned its fleet: such scans are skipped). `leaks` collects every process seen with
    one; `watched` (pid -> command line) the processes matching `watch` seen in scans that had
    secrets, so that a test can assert the processes it cares about were actually looked at.
    """

    def __init__(
        self,
        secrets: Callable[[], Sequence[str]],
        watch: Callable[[str], bool],
        interval: float = 0.05,
    ) -> None:
        self.secrets = secrets
        self.watch = watch
        self.interval = interval
        self.leaks: list[str] = []
        self.watched: dict[int, str] = {}
        self.scans = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="cmdline-sampler", daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            secrets = [secret for secret in self.secrets() if secret]
            if not secrets:
                continue
            lines = command_lines()
            self.scans += 1
            self.leaks += [leak for leak in _showing(lines, secrets) if leak not in self.leaks]
            self.watched.update({pid: line for pid, line in lines.items() if self.watch(line)})

    def __enter__(self) -> CmdlineSampler:
        self._thread.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._stop.set()
        self._thread.join()
