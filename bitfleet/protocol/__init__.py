"""The wire protocol between coordinator and agents: topics, JSON control messages, tensors as
safetensors, chunked large payloads, the MQTT connection that carries them, and where a process
finds its broker and password (`resolve_broker`, docs/security.md#broker-credentials).

Everything a receiver decodes raises only `ProtocolError` on bad input, so one `except` clause
turns a malformed or hostile message into a log line instead of a crashed process.

`pack_state`/`unpack_state` are imported on first use: they need torch (two seconds to import),
which a process that only speaks MQTT, such as a status monitor, should not pay for.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from bitfleet.protocol.chunks import (
    MAX_CHUNK,
    MAX_HEADER,
    Payload,
    Reassembler,
    is_chunk,
    split_payload,
)
from bitfleet.protocol.credentials import resolve_broker
from bitfleet.protocol.errors import ProtocolError
from bitfleet.protocol.messages import (
    MAX_MESSAGE_BYTES,
    MESSAGE_TYPES,
    SCHEMA_VERSION,
    decode_message,
    encode_message,
    make_message,
    validate_message,
)
from bitfleet.protocol.topics import DEVICE_ID_PATTERN, KINDS, Topics, validate_device_id
from bitfleet.protocol.transport import BrokerAddress, MqttTransport, parse_broker_url

if TYPE_CHECKING:
    from bitfleet.protocol.tensors import pack_state, unpack_state

__all__ = [
    "DEVICE_ID_PATTERN",
    "KINDS",
    "MAX_CHUNK",
    "MAX_HEADER",
    "MAX_MESSAGE_BYTES",
    "MESSAGE_TYPES",
    "SCHEMA_VERSION",
    "BrokerAddress",
    "MqttTransport",
    "Payload",
    "ProtocolError",
    "Reassembler",
    "Topics",
    "decode_message",
    "encode_message",
    "is_chunk",
    "make_message",
    "pack_state",
    "parse_broker_url",
    "resolve_broker",
    "split_payload",
    "unpack_state",
    "validate_device_id",
    "validate_message",
]


def __getattr__(name: str) -> Any:
    if name in ("pack_state", "unpack_state"):
        from bitfleet.protocol import tensors

        return getattr(tensors, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
