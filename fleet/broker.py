"""Brokers bitfleet starts itself: an in-process one (amqtt), and a Mosquitto process.

Production fleets use Mosquitto (or a clustered broker, docs/protocol.md#beyond-one-broker). The
embedded amqtt broker exists so that `bitfleet demo` needs nothing installed beyond the Python
package; `MosquittoProcess` runs the real one where a command needs what only Mosquitto has (TLS
with the provisioned accounts and ACL for `demo --secure`, thousands of connections for `bench
fleet`).
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import socket
import subprocess
import threading
import time
from pathlib import Path

from bitfleet.extras import require


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nobody listens on right now (the OS picks it)."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


class _KnownAmqttRace(logging.Filter):
    """Drops amqtt 0.12's "dictionary changed size during iteration" when clients connect at
    once: asyncio logs it as unhandled, paho reconnects the client, nothing is lost. Every
    other asyncio error still shows."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        return not (isinstance(exc, RuntimeError) and "changed size during iteration" in str(exc))


class EmbeddedBroker:
    """amqtt on its own event loop in a daemon thread, anonymous, on loopback."""

    def __init__(self, host: str = "127.0.0.1", port: int | None = None) -> None:
        self.host = host
        self.port = port or free_port(host)
        self._loop = asyncio.new_event_loop()
        self._thread: threading.Thread | None = None
        self._broker = None

    @property
    def url(self) -> str:
        return f"mqtt://{self.host}:{self.port}"

    def start(self, timeout: float = 10.0) -> EmbeddedBroker:
        Broker = require(
            "amqtt.broker", "demo", "the embedded broker (or pass --broker mqtt://HOST:PORT)"
        ).Broker

        # amqtt logs every connection at INFO and its own shutdown at ERROR; neither helps a user.
        logging.getLogger("amqtt").setLevel(logging.CRITICAL)
        logging.getLogger("asyncio").addFilter(_KnownAmqttRace())
        config = {
            "listeners": {"default": {"type": "tcp", "bind": f"{self.host}:{self.port}"}},
            "plugins": {
                "amqtt.plugins.authentication.AnonymousAuthPlugin": {"allow_anonymous": True}
            },
        }
        self._broker = Broker(config, loop=self._loop)
        started = threading.Event()
        failure: list[BaseException] = []

        def run() -> None:
            asyncio.set_event_loop(self._loop)
            try:
                self._loop.run_until_complete(self._broker.start())
            except BaseException as exc:  # reported to the caller below
                failure.append(exc)
                started.set()
                return
            started.set()
            self._loop.run_forever()

        self._thread = threading.Thread(target=run, name="embedded-mqtt-broker", daemon=True)
        self._thread.start()
        if not started.wait(timeout) or failure:
            raise RuntimeError(f"embedded MQTT broker did not start on {self.url}: {failure}")
        return self

    def stop(self, timeout: float = 10.0) -> None:
        if self._thread is None or self._broker is None:
            return

        async def shutdown() -> None:
            try:
                await self._broker.shutdown()
            finally:  # amqtt leaves tasks behind; cancel them so none is destroyed pending
                others = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
                for task in others:
                    task.cancel()
                await asyncio.gather(*others, return_exceptions=True)

        future = asyncio.run_coroutine_threadsafe(shutdown(), self._loop)
        try:
            future.result(timeout)
        except Exception:  # shutting down anyway; amqtt's own cancellations are noise here
            logging.getLogger(__name__).debug("embedded broker shutdown", exc_info=True)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout)
        self._thread = None

    def __enter__(self) -> EmbeddedBroker:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def find_mosquitto() -> str:
    """The mosquitto binary: `$MOSQUITTO`, Debian's /usr/sbin/mosquitto, or one on PATH."""
    for candidate in (
        os.environ.get("MOSQUITTO"),
        "/usr/sbin/mosquitto",
        shutil.which("mosquitto"),
    ):
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    raise FileNotFoundError(
        "mosquitto is not installed: `sudo apt-get install mosquitto` (scripts/install.sh does "
        "it), or set MOSQUITTO to its path"
    )


def _accepts(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.2):
            return True
    except OSError:
        return False


class MosquittoProcess:
    """A mosquitto process with the config file `config`, listening on `host:port`.

    The config must name that listener; its output goes to `log`. Started by root, Mosquitto
    drops to its own user unless the config says `user root`.
    """

    def __init__(self, config: Path, port: int, log: Path, host: str = "127.0.0.1") -> None:
        self.config = config
        self.port = port
        self.host = host
        self.log = log
        self._process: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 10.0) -> MosquittoProcess:
        """Start it and wait until the port accepts connections; RuntimeError shows its log."""
        binary = find_mosquitto()
        self.log.parent.mkdir(parents=True, exist_ok=True)
        with self.log.open("ab") as out:
            self._process = subprocess.Popen(
                [binary, "-c", str(self.config)], stdout=out, stderr=subprocess.STDOUT
            )
        deadline = time.monotonic() + timeout
        while not _accepts(self.host, self.port):
            code = self._process.poll()
            if code is not None or time.monotonic() > deadline:
                self.stop()
                why = f"exited with code {code}" if code is not None else f"not up in {timeout} s"
                log_text = self.log.read_text(errors="replace")[-2000:]
                raise RuntimeError(f"mosquitto on port {self.port} {why}; its log:\n{log_text}")
            time.sleep(0.02)
        return self

    def stop(self) -> None:
        """Terminate it (a no-op when it is not running)."""
        process, self._process = self._process, None
        if process is None or process.poll() is not None:
            return
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()

    def __enter__(self) -> MosquittoProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
