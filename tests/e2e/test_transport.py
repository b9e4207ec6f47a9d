"""MqttTransport against a real mosquitto: round trips, chunked blobs, last will, reconnects."""

from __future__ import annotations

import logging
import os
import queue
import select
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import pytest

from bitfleet.protocol import (
    MqttTransport,
    Reassembler,
    Topics,
    decode_message,
    encode_message,
    split_payload,
)

TOPICS = Topics(fleet="test")


@pytest.fixture
def connect(mosquitto) -> Iterator[Callable[..., tuple[MqttTransport, queue.Queue]]]:
    """Start transports on the test's broker; each one's messages land in its own queue."""
    started: list[MqttTransport] = []

    def make(client_id: str, subscriptions: Sequence[str] = (), **kwargs: Any):
        inbox: queue.Queue[tuple[str, bytes]] = queue.Queue()
        handler = kwargs.pop("on_message", lambda topic, payload: inbox.put((topic, payload)))
        transport = MqttTransport(
            mosquitto.url, client_id, handler, subscriptions=list(subscriptions), **kwargs
        )
        transport.start(timeout=5)
        started.append(transport)
        return transport, inbox

    yield make
    for transport in started:
        transport.stop()


def _status(device: str, online: bool) -> bytes:
    return encode_message("status", {"device_id": device, "online": online})


def test_publish_subscribe_round_trip(connect) -> None:
    _, inbox = connect("coordinator", [TOPICS.all("status")])
    agent, _ = connect("rpi5-01")
    agent.publish(TOPICS.status("rpi5-01"), _status("rpi5-01", True), wait=True)
    topic, payload = inbox.get(timeout=5)
    assert TOPICS.parse(topic) == ("status", "rpi5-01")
    assert decode_message(payload, expected_type="status")["online"] is True


def test_chunked_blob_reassembled_by_subscriber(connect) -> None:
    blob = os.urandom(3 * 1024 * 1024 + 123)
    done: queue.Queue = queue.Queue()
    reassembler = Reassembler(max_bytes=8 << 20, max_chunks=16, timeout_s=30)

    def on_message(topic: str, payload: bytes) -> None:
        result = reassembler.add(payload, source=topic)
        if result is not None:
            done.put(result)

    connect("rpi5-01", [TOPICS.model("rpi5-01")], on_message=on_message)
    coordinator, _ = connect("coordinator")
    chunks = split_payload("model", {"job_id": "j1", "bits": 4}, blob)
    assert len(chunks) == 4
    coordinator.publish_many(TOPICS.model("rpi5-01"), chunks, qos=1, wait=True, timeout=20)
    payload = done.get(timeout=10)
    assert payload.blob == blob
    assert payload.meta == {"job_id": "j1", "bits": 4}
    assert payload.source == TOPICS.model("rpi5-01")


AGENT = textwrap.dedent(
    """
    import sys, time
    from bitfleet.protocol import MqttTransport, Topics, encode_message

    url, device = sys.argv[1], sys.argv[2]
    topic = Topics(fleet="test").status(device)
    def status(online):
        return encode_message("status", {"device_id": device, "online": online})
    agent = MqttTransport(url, device, lambda t, p: None, will=(topic, status(False), True))
    agent.start(timeout=5)
    agent.publish(topic, status(True), retain=True, wait=True)
    print("ready", flush=True)
    time.sleep(60)
    """
)


def _read_line(process: subprocess.Popen[str], timeout: float) -> str:
    ready, _, _ = select.select([process.stdout], [], [], timeout)
    return process.stdout.readline().strip() if ready and process.stdout else ""


def _next_status(inbox: queue.Queue, deadline: float) -> bool | None:
    try:
        _, payload = inbox.get(timeout=max(0.0, deadline - time.monotonic()))
    except queue.Empty:
        return None
    return decode_message(payload, expected_type="status")["online"]


def test_last_will_announces_a_killed_agent(mosquitto, connect) -> None:
    process = subprocess.Popen(
        [sys.executable, "-c", AGENT, mosquitto.url, "rpi5-07"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        line = _read_line(process, timeout=20)
        if line != "ready":
            process.kill()
            _, stderr = process.communicate(timeout=5)
            pytest.fail(f"agent did not start: {line!r}\n{stderr}")
        _, inbox = connect("watcher", [TOPICS.status("rpi5-07")])
        assert _next_status(inbox, time.monotonic() + 5) is True  # retained "online"
        process.kill()  # SIGKILL: no clean disconnect, so the broker publishes the will
        process.wait(timeout=5)
        assert _next_status(inbox, time.monotonic() + 5) is False
    finally:
        if process.poll() is None:
            process.kill()
        process.wait(timeout=5)
        for stream in (process.stdout, process.stderr):
            if stream:
                stream.close()
    # The will was retained: a client that connects later still learns the device is offline.
    _, later = connect("late-watcher", [TOPICS.status("rpi5-07")])
    assert _next_status(later, time.monotonic() + 5) is False


def test_reconnect_renews_subscriptions(mosquitto, connect) -> None:
    listener, inbox = connect("coordinator", [TOPICS.all("update")])
    agent, _ = connect("rpi5-02")
    mosquitto.restart()  # the new broker process knows no sessions and no subscriptions
    assert listener.wait_ready(15) and agent.wait_ready(15)
    agent.publish(TOPICS.update("rpi5-02"), b"after restart", wait=True, timeout=10)
    assert inbox.get(timeout=5) == (TOPICS.update("rpi5-02"), b"after restart")


def test_qos1_publish_while_broker_down_is_sent_after_reconnect(mosquitto, connect) -> None:
    agent, _ = connect("rpi5-03")
    mosquitto.stop()
    deadline = time.monotonic() + 5
    while agent.is_connected and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not agent.is_connected
    topic = TOPICS.status("rpi5-03")
    agent.publish(topic, _status("rpi5-03", True), retain=True)  # queued by paho, not lost
    mosquitto.start()
    # Retained, so whoever subscribes after the resend sees it; the later publish is
    # acknowledged after the queued one, which the broker has then stored.
    agent.publish(TOPICS.update("rpi5-03"), b"probe", wait=True, timeout=15)
    _, inbox = connect("watcher", [topic])
    assert _next_status(inbox, time.monotonic() + 5) is True


def test_start_fails_clearly_without_broker(mosquitto) -> None:
    mosquitto.stop()
    transport = MqttTransport(mosquitto.url, "lonely", lambda t, p: None)
    started = time.monotonic()
    with pytest.raises(ConnectionError, match=str(mosquitto.port)):
        transport.start(timeout=2)
    assert time.monotonic() - started < 3
    transport.stop()  # idempotent, and harmless after a failed start


def test_handler_exceptions_are_logged_and_swallowed(connect, caplog) -> None:
    seen: queue.Queue = queue.Queue()

    def on_message(topic: str, payload: bytes) -> None:
        if payload == b"boom":
            raise RuntimeError("handler bug")
        seen.put(payload)

    connect("coordinator", [TOPICS.all("update")], on_message=on_message)
    agent, _ = connect("rpi5-04")
    with caplog.at_level(logging.ERROR, logger="bitfleet.protocol.transport"):
        agent.publish(TOPICS.update("rpi5-04"), b"boom", wait=True)
        agent.publish(TOPICS.update("rpi5-04"), b"fine", wait=True)
        assert seen.get(timeout=5) == b"fine"
    assert any(TOPICS.update("rpi5-04") in r.getMessage() for r in caplog.records)


def test_stop_flushes_in_flight_messages(connect, mosquitto) -> None:
    agent, _ = connect("rpi5-05")
    topic = TOPICS.status("rpi5-05")
    for online in (True, False):  # the last word before a clean exit must not be lost
        agent.publish(topic, _status("rpi5-05", online), retain=True)
    agent.stop()
    agent.stop()  # idempotent
    _, inbox = connect("watcher", [topic])
    assert _next_status(inbox, time.monotonic() + 5) is False
    with pytest.raises(RuntimeError):
        agent.publish(topic, b"after stop")
