"""Shared fixtures: a real Mosquitto broker per test, on a free port with its own config."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import NoReturn

import pytest

from fleet.broker import MosquittoProcess, find_mosquitto, free_port

#: Big enough for a 1 MiB chunk plus its header; bigger single messages are a bug to catch.
BROKER_MAX_PACKET = 2 * 1024 * 1024


def missing_part(why: str) -> NoReturn:
    """A part the README's set-up installs is missing: skip the test, or fail it when CI=true
    (CI ran that set-up, so the part missing there is a bug)."""
    if os.environ.get("CI") == "true":
        pytest.fail(why)
    pytest.skip(why)


def require_mosquitto() -> str:
    """The mosquitto binary; without one, skip the test, or fail it when CI=true."""
    try:
        return find_mosquitto()
    except FileNotFoundError as exc:
        missing_part(str(exc))


class Mosquitto:
    """A mosquitto process bound to 127.0.0.1:`port` (`fleet.broker.MosquittoProcess` with a
    config of its own); `restart()` keeps the port."""

    def __init__(self, binary: str, directory: Path) -> None:
        self.binary = binary
        self.port = free_port()
        self.url = f"mqtt://127.0.0.1:{self.port}"
        self.config = directory / "mosquitto.conf"
        self.log_path = directory / "mosquitto.log"
        self.config.write_text(
            f"listener {self.port} 127.0.0.1\n"
            "allow_anonymous true\n"
            "persistence false\n"
            f"max_packet_size {BROKER_MAX_PACKET}\n"
            "log_dest stderr\n"
            "log_type error\n"
            "log_type warning\n"
            "log_type notice\n"
        )
        self._process = MosquittoProcess(self.config, self.port, self.log_path)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def start(self, timeout: float = 10.0) -> None:
        try:
            self._process.start(timeout)
        except RuntimeError as exc:  # its message holds the broker's log
            pytest.fail(str(exc))

    def stop(self) -> None:
        """Terminate the broker (clients see the connection drop); a no-op if not running."""
        self._process.stop()

    def restart(self) -> None:
        self.stop()
        self.start()


def _running(kind: type[Mosquitto], tmp_path: Path) -> Iterator[Mosquitto]:
    """Start a broker of `kind` for one test; without mosquitto, skip, or fail when CI=true."""
    broker = kind(require_mosquitto(), tmp_path)
    broker.start()
    try:
        yield broker
    finally:
        broker.stop()


@pytest.fixture
def mosquitto(tmp_path: Path) -> Iterator[Mosquitto]:
    """A fresh broker for one test, on a free port with its own config."""
    yield from _running(Mosquitto, tmp_path)


# -- a broker with a provisioned fleet (`bitfleet coordinator provision`): TLS, passwords, ACL --


class SecureMosquitto(Mosquitto):
    """Mosquitto started with the config `fleet.provision` wrote, on a free port.

    `fleet` holds the accounts: `fleet.url(device_id)`, `fleet.coordinator_url`, `fleet.ca_file`.
    Listens on 127.0.0.1 only; clients may use `localhost` or `127.0.0.1`, both are in the
    server certificate.
    """

    def __init__(self, binary: str, directory: Path, devices: int = 3) -> None:
        from fleet.provision import provision

        self.binary = binary
        self.port = free_port()
        self.fleet = provision(
            "test",
            devices,
            directory / "fleet",
            hosts=["localhost"],
            port=self.port,
            bind="127.0.0.1",
        )
        self.url = self.fleet.coordinator_url
        self.config = self.fleet.conf
        self.log_path = directory / "mosquitto.log"
        if os.geteuid() == 0:
            # Started by root, Mosquitto drops to the `mosquitto` user, which cannot read the
            # 0600 files in pytest's private tmp directory; a real server chowns them instead.
            with self.config.open("a") as conf:
                conf.write("user root\n")
        self._process = MosquittoProcess(self.config, self.port, self.log_path)


@pytest.fixture
def secure_mosquitto(tmp_path: Path) -> Iterator[SecureMosquitto]:
    """A fresh provisioned broker (3 devices) for one test."""
    yield from _running(SecureMosquitto, tmp_path)  # type: ignore[misc]
