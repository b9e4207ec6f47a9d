"""MQTT topic names: `<prefix>/<fleet>/<kind>/<device>`, one place that builds and parses them.

Every message a device sends sits under its own id, so a broker ACL with `pattern` rules
(`pattern write bitfleet/+/update/%c`) can stop one board from speaking for another. The
coordinator subscribes with a `+` in the device position; several coordinator workers can split
that stream with an MQTT shared subscription (`shared`), which keeps this layout unchanged when a
fleet outgrows one process.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from bitfleet.protocol.errors import ProtocolError

__all__ = ["DEVICE_ID_PATTERN", "KINDS", "Topics", "validate_device_id"]

#: Message kinds, each with its own topic level.
KINDS = ("register", "assign", "task", "update", "status", "model", "candidate", "timing")

#: A device id is one topic level: no `/`, no wildcards, no leading punctuation, <= 64 chars.
DEVICE_ID_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")


def validate_device_id(device: object) -> str:
    """Return `device` if it is a valid device id, else raise ProtocolError("bad_device_id")."""
    if not isinstance(device, str) or DEVICE_ID_PATTERN.fullmatch(device) is None:
        raise ProtocolError("bad_device_id", f"invalid device id {device!r}")
    return device


def _check_level(name: str, value: str) -> None:
    if not value or any(c in value for c in "/+#\0"):
        raise ValueError(f"{name} must be a non-empty topic level without / + # or NUL: {value!r}")


@dataclass(frozen=True)
class Topics:
    """Topic names of one fleet: `Topics(fleet="lab").update("rpi5-01")`."""

    prefix: str = "bitfleet"
    fleet: str = "default"

    def __post_init__(self) -> None:
        for level in self.prefix.split("/"):
            _check_level("prefix", level)
        _check_level("fleet", self.fleet)

    @property
    def base(self) -> str:
        """The common part of every topic, `<prefix>/<fleet>`."""
        return f"{self.prefix}/{self.fleet}"

    def topic(self, kind: str, device: str) -> str:
        """The topic of message `kind` for `device`."""
        if kind not in KINDS:
            raise ValueError(f"unknown topic kind {kind!r}; expected one of {KINDS}")
        return f"{self.base}/{kind}/{validate_device_id(device)}"

    def register(self, device: str) -> str:
        return self.topic("register", device)

    def assign(self, device: str) -> str:
        return self.topic("assign", device)

    def task(self, device: str) -> str:
        return self.topic("task", device)

    def update(self, device: str) -> str:
        return self.topic("update", device)

    def status(self, device: str) -> str:
        return self.topic("status", device)

    def model(self, device: str) -> str:
        return self.topic("model", device)

    def candidate(self, device: str) -> str:
        """Deploy candidates the coordinator sends a device to time (docs/protocol.md)."""
        return self.topic("candidate", device)

    def timing(self, device: str) -> str:
        """A device's timing of one candidate, back to the coordinator."""
        return self.topic("timing", device)

    def all(self, kind: str) -> str:
        """Subscription matching `kind` from every device: `<base>/<kind>/+`."""
        if kind not in KINDS:
            raise ValueError(f"unknown topic kind {kind!r}; expected one of {KINDS}")
        return f"{self.base}/{kind}/+"

    def shared(self, kind: str, group: str) -> str:
        """Shared subscription (`$share/<group>/...`) so several workers split one stream."""
        _check_level("group", group)
        return f"$share/{group}/{self.all(kind)}"

    def parse(self, topic: str) -> tuple[str, str]:
        """Split a received topic into (kind, device); ProtocolError for anything else."""
        head = self.base + "/"
        if not isinstance(topic, str) or not topic.startswith(head):
            raise ProtocolError("bad_topic", f"topic {topic!r} is not under {head!r}")
        parts = topic[len(head) :].split("/")
        if len(parts) != 2 or parts[0] not in KINDS:
            raise ProtocolError("bad_topic", f"topic {topic!r} is not {head}<kind>/<device>")
        kind, device = parts
        try:
            validate_device_id(device)
        except ProtocolError as exc:
            raise ProtocolError("bad_topic", f"topic {topic!r}: {exc.detail}") from None
        return kind, device
