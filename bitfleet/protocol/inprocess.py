"""An in-memory stand-in for the MQTT broker, so `bitfleet simulate` runs the daemon's code.

The simulator puts many virtual boards and the coordinator in one process. They talk through
`InProcessBus` with the same calls they make on `MqttTransport` (publish, publish_many,
subscribe, a last will, retained messages, on_connect), so nothing above the transport knows it
is simulated. Each client gets its own delivery thread, as paho gives each client a network
thread: a handler never runs on the publisher's thread, and one slow handler delays only its
own client. Delivery is in publish order per client, which MQTT guarantees per topic.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable, Iterable, Sequence

__all__ = ["InProcessBus", "InProcessTransport", "topic_matches"]

log = logging.getLogger(__name__)


def topic_matches(pattern: str, topic: str) -> bool:
    """MQTT filter matching: `+` is one level, a trailing `#` any number of levels."""
    p_levels, t_levels = pattern.split("/"), topic.split("/")
    for i, p in enumerate(p_levels):
        if p == "#":
            return True
        if i >= len(t_levels) or (p != "+" and p != t_levels[i]):
            return False
    return len(p_levels) == len(t_levels)


class InProcessBus:
    """The broker: subscriptions, retained messages and last wills, all in this process."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._clients: dict[str, InProcessTransport] = {}
        self._retained: dict[str, bytes] = {}

    def transport(
        self,
        client_id: str,
        on_message: Callable[[str, bytes], None],
        **options: object,
    ) -> InProcessTransport:
        """A client of this bus; `options` are `MqttTransport`'s keywords that apply here."""
        return InProcessTransport(self, client_id, on_message, **options)  # type: ignore[arg-type]

    def _connect(self, client: InProcessTransport) -> None:
        with self._lock:
            old = self._clients.get(client.client_id)
            self._clients[client.client_id] = client
        if old is not None and old is not client:
            old._kill()  # a broker drops the older session with the same client id

    def _disconnect(self, client: InProcessTransport, *, clean: bool) -> None:
        with self._lock:
            if self._clients.get(client.client_id) is client:
                del self._clients[client.client_id]
        if not clean and client.will is not None:
            topic, payload, retain = client.will
            self.publish(topic, payload, retain)

    def publish(self, topic: str, payload: bytes, retain: bool = False) -> None:
        with self._lock:
            if retain:
                if payload:
                    self._retained[topic] = payload
                else:
                    self._retained.pop(topic, None)
            clients = list(self._clients.values())
        for client in clients:
            if any(topic_matches(p, topic) for p in client.subscriptions):
                client._deliver(topic, payload)

    def _subscribed(self, client: InProcessTransport, pattern: str) -> None:
        with self._lock:
            retained = [(t, p) for t, p in self._retained.items() if topic_matches(pattern, t)]
        for topic, payload in retained:
            client._deliver(topic, payload)


class InProcessTransport:
    """`MqttTransport`'s interface on an `InProcessBus`; see the module docstring."""

    def __init__(
        self,
        bus: InProcessBus,
        client_id: str,
        on_message: Callable[[str, bytes], None],
        *,
        will: tuple[str, bytes, bool] | None = None,
        subscriptions: Iterable[str] = (),
        on_connect: Callable[[], None] | None = None,
        ca_file: str | None = None,
    ) -> None:
        if not client_id:
            raise ValueError("client_id must not be empty")
        self.bus = bus
        self.client_id = client_id
        self.will = will
        self.subscriptions: list[str] = list(dict.fromkeys(subscriptions))
        self._on_message = on_message
        self._on_connect = on_connect
        self._inbox: queue.Queue[tuple[str, bytes] | None] = queue.Queue()
        self._thread: threading.Thread | None = None
        self._running = False

    def start(self, timeout: float = 10.0) -> None:
        if self._running:
            raise RuntimeError("transport already started")
        self._running = True
        self._thread = threading.Thread(
            target=self._loop, name=f"bus-{self.client_id}", daemon=True
        )
        self._thread.start()
        self.bus._connect(self)
        for pattern in self.subscriptions:
            self.bus._subscribed(self, pattern)
        if self._on_connect is not None:
            self._on_connect()

    def stop(self, flush_timeout: float = 5.0) -> None:
        """Disconnect cleanly: no last will, and queued deliveries are still handed over."""
        if not self._running:
            return
        self._running = False
        self.bus._disconnect(self, clean=True)
        self._inbox.put(None)
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(flush_timeout)

    def _kill(self) -> None:
        """Vanish without a goodbye: the bus publishes the last will (a board losing power)."""
        if self._running:
            self._running = False
            self.bus._disconnect(self, clean=False)
            self._inbox.put(None)

    @property
    def is_connected(self) -> bool:
        return self._running

    def wait_ready(self, timeout: float) -> bool:
        return self._running

    def publish(
        self,
        topic: str,
        payload: bytes,
        qos: int = 1,
        retain: bool = False,
        wait: bool = False,
        timeout: float = 30.0,
    ) -> None:
        self.publish_many(topic, [payload], qos=qos, retain=retain)

    def publish_many(
        self,
        topic: str,
        payloads: Sequence[bytes],
        qos: int = 1,
        retain: bool = False,
        wait: bool = True,
        timeout: float = 60.0,
    ) -> None:
        if not self._running:
            raise RuntimeError("transport is not started")
        for payload in payloads:
            self.bus.publish(topic, payload, retain)

    def subscribe(self, topic: str, timeout: float = 10.0) -> None:
        if topic not in self.subscriptions:
            self.subscriptions.append(topic)
            if self._running:
                self.bus._subscribed(self, topic)

    def unsubscribe(self, topic: str) -> None:
        if topic in self.subscriptions:
            self.subscriptions.remove(topic)

    def _deliver(self, topic: str, payload: bytes) -> None:
        if self._running:
            self._inbox.put((topic, payload))

    def _loop(self) -> None:
        while True:
            item = self._inbox.get()
            if item is None:
                return
            try:
                self._on_message(*item)
            except Exception:
                log.exception("dropped a message on topic %r: its handler raised", item[0])
