"""One MQTT connection with the behaviour every bitfleet process needs, over paho-mqtt 2.x.

What paho leaves to its caller and this class does once: a broker URL with credentials and TLS;
a connect that fails loudly and fast when the broker is unreachable, but reconnects quietly (with
exponential backoff) once the process is running; subscriptions renewed on every reconnect (a
broker restart or a clean session forgets them); a last will, so the broker itself announces a
board that lost power; receive callbacks that can never kill the network thread; and publishes
that can wait for the broker's acknowledgement even across a reconnect.

Threading: paho runs one network thread (`loop_start`). `on_message` and the `on_connect` hook
run on it, so they must not block; `publish(..., wait=True)` from inside them would wait for an
acknowledgement that same thread has to read, and raises instead.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import unquote, urlsplit

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode

__all__ = ["BrokerAddress", "MqttTransport", "parse_broker_url"]

log = logging.getLogger(__name__)

_SCHEMES = {"mqtt": (1883, False), "mqtts": (8883, True)}


@dataclass(frozen=True)
class BrokerAddress:
    """Where the broker is and how to log in; `str()` never shows the password."""

    host: str
    port: int = 1883
    tls: bool = False
    username: str | None = None
    password: str | None = field(default=None, repr=False)

    def __str__(self) -> str:
        user = f"{self.username}@" if self.username else ""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{'mqtts' if self.tls else 'mqtt'}://{user}{host}:{self.port}"


def parse_broker_url(url: str | BrokerAddress) -> BrokerAddress:
    """Parse `mqtt://[user[:pass]@]host[:port]` (port 1883) or `mqtts://...` (TLS, port 8883).

    A `BrokerAddress` is returned as it is: the command lines resolve the password apart from
    the URL (`credentials.resolve_broker`, docs/security.md#broker-credentials) and hand the
    result to code that accepts either.
    """
    if isinstance(url, BrokerAddress):
        return url
    try:
        parts = urlsplit(url)
        port = parts.port
    except (TypeError, ValueError) as exc:
        raise ValueError(f"bad broker URL {url!r}: {exc}") from None
    if parts.scheme not in _SCHEMES:
        raise ValueError(f"bad broker URL {url!r}: scheme must be mqtt:// or mqtts://")
    if not parts.hostname:
        raise ValueError(f"bad broker URL {url!r}: no host")
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        raise ValueError(f"bad broker URL {url!r}: unexpected path, query or fragment")
    default_port, tls = _SCHEMES[parts.scheme]
    return BrokerAddress(
        host=parts.hostname,
        port=default_port if port is None else port,
        tls=tls,
        username=unquote(parts.username) if parts.username is not None else None,
        password=unquote(parts.password) if parts.password is not None else None,
    )


class MqttTransport:
    """A paho client (MQTT 3.1.1, callback API 2) wired for bitfleet; see the module docstring.

    `on_message(topic, payload)` receives every message on `subscriptions` (QoS 1). `will` is
    (topic, payload, retain), published by the broker at QoS 1 if this client vanishes without
    `stop()`. `on_connect` runs after every successful (re)connect, e.g. to publish "online".
    """

    def __init__(
        self,
        address: BrokerAddress | str,
        client_id: str,
        on_message: Callable[[str, bytes], None],
        *,
        will: tuple[str, bytes, bool] | None = None,
        ca_file: str | None = None,
        certfile: str | None = None,
        keyfile: str | None = None,
        subscriptions: Iterable[str] = (),
        on_connect: Callable[[], None] | None = None,
        keepalive: int = 30,
        clean_session: bool = True,
    ) -> None:
        if isinstance(address, str):
            address = parse_broker_url(address)
        if not client_id:
            raise ValueError("client_id must not be empty")
        self.address = address
        self.client_id = client_id
        self.keepalive = keepalive
        self._on_message_cb = on_message
        self._on_connect_cb = on_connect
        self._subscriptions: list[str] = list(dict.fromkeys(subscriptions))
        self._lock = threading.Lock()  # guards _subscriptions
        # Guards the connection state and acknowledgement tables below. Never held while calling
        # into paho: paho holds its own locks while it calls us.
        self._cond = threading.Condition()
        self._connected = False
        self._ready = False  # connected and every subscription acknowledged
        self._ready_mid: int | None = None
        self._refused: str | None = None
        # mid -> monotonic time of its acknowledgement. Keyed by mid (1..65535), hence bounded;
        # a waiter compares with the time it published, so a reused mid is never mistaken.
        self._pub_acks: dict[int, float] = {}
        self._unacked: dict[int, float] = {}  # QoS>0 mid -> when it was published
        self._sub_acks: dict[int, float] = {}
        self._network_thread: threading.Thread | None = None
        self._running = False

        client = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=client_id,
            protocol=mqtt.MQTTv311,
            clean_session=clean_session,
        )
        client.enable_logger(logging.getLogger(f"{__name__}.paho"))
        client.reconnect_delay_set(min_delay=1, max_delay=30)
        # 20 chunks of <= 1 MiB in flight keeps a link busy without flooding a small broker;
        # the outgoing queue is unbounded so that `publish_many` can hand over a whole model.
        # MQTT 3.1.1 has no client-side packet limit; the broker's `max_packet_size` is the one.
        client.max_inflight_messages_set(20)
        client.max_queued_messages_set(0)
        if address.username is not None:
            client.username_pw_set(address.username, address.password)
        if address.tls:
            client.tls_set(ca_certs=ca_file, certfile=certfile, keyfile=keyfile)
        elif ca_file or certfile or keyfile:
            raise ValueError(f"TLS files given but {address} is not an mqtts:// URL")
        if will is not None:
            will_topic, will_payload, will_retain = will
            client.will_set(will_topic, will_payload, qos=1, retain=will_retain)
        client.on_connect = self._handle_connect
        client.on_disconnect = self._handle_disconnect
        client.on_message = self._handle_message
        client.on_publish = self._handle_publish
        client.on_subscribe = self._handle_subscribe
        self._client = client

    # -- lifecycle --

    def start(self, timeout: float = 10.0) -> None:
        """Connect, start the network thread and wait until subscriptions are active.

        Raises ConnectionError if the broker cannot be reached, refuses the login, or does not
        answer within `timeout` seconds. After that, lost connections are retried forever.
        """
        if self._running:
            raise RuntimeError("transport already started")
        deadline = time.monotonic() + timeout
        self._refused = None
        self._client.connect_timeout = max(timeout, 0.1)
        try:
            self._client.connect(self.address.host, self.address.port, self.keepalive)
        except (OSError, ValueError) as exc:
            raise ConnectionError(f"cannot connect to MQTT broker {self.address}: {exc}") from exc
        self._running = True
        self._client.loop_start()
        with self._cond:
            self._cond.wait_for(
                lambda: self._ready or self._refused is not None,
                max(0.0, deadline - time.monotonic()),
            )
            ready, refused = self._ready, self._refused
        if not ready:
            self.stop()
            why = f"refused the connection: {refused}" if refused else f"no answer in {timeout} s"
            raise ConnectionError(f"MQTT broker {self.address} {why}")

    def stop(self, flush_timeout: float = 5.0) -> None:
        """Disconnect cleanly (the broker then does not publish the will) and stop the thread.

        While connected, first waits up to `flush_timeout` seconds for the broker to acknowledge
        QoS 1 messages still in flight, so that a last "offline" status is not lost.
        """
        if not self._running:
            return
        deadline = time.monotonic() + flush_timeout
        in_callback = threading.current_thread() is self._network_thread  # acks would never come
        with self._cond:
            while not in_callback and self._connected and self._unacked_left():
                if not self._cond.wait(max(0.0, deadline - time.monotonic())):
                    log.warning("stopping with %d unacknowledged messages", len(self._unacked))
                    break
        self._running = False
        self._client.disconnect()
        self._client.loop_stop()
        with self._cond:
            self._connected = self._ready = False
            self._cond.notify_all()

    @property
    def is_connected(self) -> bool:
        """Whether the broker has accepted the connection (subscriptions may still be pending)."""
        return self._connected

    def wait_ready(self, timeout: float) -> bool:
        """Wait until connected with all subscriptions acknowledged; False on timeout."""
        with self._cond:
            return self._cond.wait_for(lambda: self._ready, timeout)

    # -- sending --

    def publish(
        self,
        topic: str,
        payload: bytes,
        qos: int = 1,
        retain: bool = False,
        wait: bool = False,
        timeout: float = 30.0,
    ) -> None:
        """Publish one message; with `wait`, block until the broker acknowledged it.

        A QoS 1 message published while the connection is down is queued and sent after the
        reconnect; a QoS 0 one raises ConnectionError. `wait` raises TimeoutError on timeout.
        """
        self.publish_many(topic, [payload], qos=qos, retain=retain, wait=wait, timeout=timeout)

    def publish_many(
        self,
        topic: str,
        payloads: Sequence[bytes],
        qos: int = 1,
        retain: bool = False,
        wait: bool = True,
        timeout: float = 60.0,
    ) -> None:
        """Publish several messages (e.g. the chunks of one payload) in order, by default waiting
        until the broker acknowledged all of them."""
        if not self._running:
            raise RuntimeError("transport is not started")
        if wait and threading.current_thread() is self._network_thread:
            raise RuntimeError("cannot wait for an acknowledgement inside an MQTT callback")
        sent = time.monotonic()
        mids = []
        for payload in payloads:
            info = self._client.publish(topic, payload, qos=qos, retain=retain)
            if info.rc == MQTTErrorCode.MQTT_ERR_NO_CONN and qos > 0:
                pass  # kept in paho's queue and sent after the reconnect
            elif info.rc != MQTTErrorCode.MQTT_ERR_SUCCESS:
                raise ConnectionError(f"publish to {topic} failed: {mqtt.error_string(info.rc)}")
            mids.append(info.mid)
            if qos > 0:
                with self._cond:
                    self._unacked[info.mid] = sent
        if wait:
            self._wait_acks(self._pub_acks, mids, sent, timeout, f"publish to {topic}")

    def _unacked_left(self) -> bool:
        """Drop acknowledged entries from `_unacked`; True if any remain. Call under `_cond`."""
        for mid, sent in list(self._unacked.items()):
            if self._pub_acks.get(mid, -1.0) >= sent:
                del self._unacked[mid]
        return bool(self._unacked)

    def _wait_acks(
        self, acks: dict[int, float], mids: list[int], sent: float, timeout: float, what: str
    ) -> None:
        deadline = time.monotonic() + timeout
        with self._cond:
            for done, mid in enumerate(mids):
                if not self._cond.wait_for(
                    lambda mid=mid: acks.get(mid, -1.0) >= sent,
                    max(0.0, deadline - time.monotonic()),
                ):
                    raise TimeoutError(
                        f"{what}: {len(mids) - done} of {len(mids)} messages not acknowledged "
                        f"within {timeout} s"
                    )

    # -- subscriptions --

    def subscribe(self, topic: str, timeout: float = 10.0) -> None:
        """Add a subscription (QoS 1), kept across reconnects; waits for the broker if connected."""
        with self._lock:
            if topic in self._subscriptions:
                return
            self._subscriptions.append(topic)
        if not self._connected:
            return  # `_handle_connect` subscribes when the connection is back
        sent = time.monotonic()
        rc, mid = self._client.subscribe(topic, qos=1)
        in_callback = threading.current_thread() is self._network_thread
        if rc == MQTTErrorCode.MQTT_ERR_SUCCESS and mid is not None and not in_callback:
            self._wait_acks(self._sub_acks, [mid], sent, timeout, f"subscribe to {topic}")

    def unsubscribe(self, topic: str) -> None:
        """Drop a subscription (also from the set renewed on reconnect)."""
        with self._lock:
            if topic not in self._subscriptions:
                return
            self._subscriptions.remove(topic)
        if self._connected:
            self._client.unsubscribe(topic)

    # -- paho callbacks (network thread) --

    def _handle_connect(
        self, client: mqtt.Client, userdata: Any, flags: Any, reason: Any, properties: Any
    ) -> None:
        self._network_thread = threading.current_thread()
        if reason.is_failure:
            log.error("MQTT broker %s refused the connection: %s", self.address, reason)
            with self._cond:
                self._refused = str(reason)
                self._cond.notify_all()
            return
        with self._lock:
            topics = list(self._subscriptions)
        mid = None
        if topics:
            _, mid = client.subscribe([(t, 1) for t in topics])
        with self._cond:
            self._connected = True
            self._refused = None
            self._ready_mid = mid
            self._ready = not topics
            self._cond.notify_all()
        log.info("connected to MQTT broker %s as %s", self.address, self.client_id)
        if self._on_connect_cb is not None:
            try:
                self._on_connect_cb()
            except Exception:
                log.exception("on_connect hook failed")

    def _handle_disconnect(
        self, client: mqtt.Client, userdata: Any, flags: Any, reason: Any, properties: Any
    ) -> None:
        with self._cond:
            self._connected = self._ready = False
            self._cond.notify_all()
        if self._running:
            log.warning("lost MQTT broker %s (%s); reconnecting", self.address, reason)

    def _handle_message(
        self, client: mqtt.Client, userdata: Any, message: mqtt.MQTTMessage
    ) -> None:
        try:
            topic = message.topic
        except UnicodeDecodeError:
            log.warning("dropped a message whose topic is not UTF-8")
            return
        try:
            self._on_message_cb(topic, message.payload)
        except Exception:
            log.exception("dropped a message on topic %r: its handler raised", topic)

    def _handle_publish(
        self, client: mqtt.Client, userdata: Any, mid: int, reason: Any, properties: Any
    ) -> None:
        with self._cond:
            self._pub_acks[mid] = time.monotonic()
            self._unacked.pop(mid, None)
            self._cond.notify_all()

    def _handle_subscribe(
        self, client: mqtt.Client, userdata: Any, mid: int, reasons: Any, properties: Any
    ) -> None:
        refused = [r for r in reasons if r.is_failure]
        if refused:
            log.error(
                "MQTT broker %s refused a subscription (mid %d): %s", self.address, mid, refused
            )
        with self._cond:
            self._sub_acks[mid] = time.monotonic()
            if mid == self._ready_mid:
                self._ready = True
            self._cond.notify_all()
