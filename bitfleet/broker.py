"""An in-process MQTT broker (amqtt) so that `bitfleet demo` works on a bare machine.

Production fleets use Mosquitto (or a clustered broker, DESIGN section 9); this one exists so
that one command needs nothing installed beyond the Python package.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import threading


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
        from amqtt.broker import Broker

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
