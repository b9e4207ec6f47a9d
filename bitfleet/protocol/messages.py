"""Control messages: small versioned JSON objects, validated on receipt against one schema table.

Every message is `{"v": 1, "type": <type>, ...fields}`. The table below names each type's required
fields and their types; fields it does not name are carried through unchecked, so a newer sender
can add a field without breaking an older receiver (a change that breaks old receivers bumps
`SCHEMA_VERSION`). JSON is strict here: a bool is not an int (Python would say it is), an int is
accepted where a float is expected (JSON writers differ on `1` versus `1.0`), and NaN or infinity
is rejected anywhere in the message, since one NaN loss poisons an aggregate.

`encode_message` validates before sending, so a bug shows up at the sender with a traceback
rather than as a dropped message in another process's log.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping
from typing import Any

from bitfleet.protocol.errors import ProtocolError
from bitfleet.protocol.topics import validate_device_id

__all__ = [
    "MAX_MESSAGE_BYTES",
    "MESSAGE_TYPES",
    "SCHEMA_VERSION",
    "decode_message",
    "encode_message",
    "validate_message",
]

SCHEMA_VERSION = 1

#: Control messages are small; anything larger travels as chunks (`bitfleet.protocol.chunks`).
MAX_MESSAGE_BYTES = 64 * 1024

#: The largest integer any message may carry: exact in a JSON double and in SQLite's INTEGER,
#: so a hostile 2**63 is refused here instead of crashing whoever stores it.
MAX_INT = 2**53 - 1

#: Plausible ranges of the fields that feed arithmetic (docs/protocol.md#field-ranges).
MAX_SAMPLES = 10**9
MAX_ROUND = 10**7
MAX_SECONDS = 1e7
"""About four months: longer than any round's training or deadline."""
MAX_NUMBER = 1e15

Check = Callable[[Any, str], None]


def _fail(reason: str, path: str, what: str) -> None:
    raise ProtocolError(reason, f"{path}: {what}")


def _str(value: Any, path: str) -> None:
    if not isinstance(value, str):
        _fail("bad_type", path, f"expected a string, got {type(value).__name__}")


def _nonempty_str(value: Any, path: str) -> None:
    _str(value, path)
    if not value:
        _fail("bad_value", path, "must not be empty")


def _device_id(value: Any, path: str) -> None:
    _str(value, path)
    try:
        validate_device_id(value)
    except ProtocolError as exc:
        raise ProtocolError("bad_device_id", f"{path}: {exc.detail}") from None


def _bool(value: Any, path: str) -> None:
    if not isinstance(value, bool):
        _fail("bad_type", path, f"expected true or false, got {type(value).__name__}")


def _int(lo: int = -MAX_INT, hi: int = MAX_INT) -> Check:
    """An integer in [lo, hi]; every integer field has a range, 64-bit safe by default."""

    def check(value: Any, path: str) -> None:
        if isinstance(value, bool) or not isinstance(value, int):
            _fail("bad_type", path, f"expected an integer, got {type(value).__name__}")
        if not lo <= value <= hi:
            _fail("bad_value", path, f"{value} is outside [{lo}, {hi}]")

    return check


def _number(lo: float = -MAX_NUMBER, hi: float = MAX_NUMBER, positive: bool = False) -> Check:
    """A finite JSON number (int or float) in [lo, hi]; `positive` meaning > 0 as well."""

    def check(value: Any, path: str) -> None:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            _fail("bad_type", path, f"expected a number, got {type(value).__name__}")
        if not math.isfinite(value):
            _fail("bad_value", path, f"{value} is not finite")
        if not lo <= value <= hi or (positive and value <= 0):
            _fail("bad_value", path, f"{value} is outside [{lo:g}, {hi:g}]")

    return check


def _dict(value: Any, path: str) -> None:
    if not isinstance(value, dict):
        _fail("bad_type", path, f"expected an object, got {type(value).__name__}")


def _optional(check: Check) -> Check:
    def optional(value: Any, path: str) -> None:
        if value is not None:
            check(value, path)

    return optional


def _list_of(item: Check) -> Check:
    def check(value: Any, path: str) -> None:
        if not isinstance(value, list):
            _fail("bad_type", path, f"expected a list, got {type(value).__name__}")
        for i, element in enumerate(value):
            item(element, f"{path}[{i}]")

    return check


def _map_of(item: Check) -> Check:
    """An object with arbitrary string keys (JSON guarantees that) and values checked by `item`."""

    def check(value: Any, path: str) -> None:
        _dict(value, path)
        for key, element in value.items():
            item(element, f"{path}.{key}")

    return check


def _object(fields: Mapping[str, Check], optional: Mapping[str, Check] | None = None) -> Check:
    """An object with these required fields, and `optional` ones checked where present (null
    counts as absent); other fields are allowed and not checked."""

    def check(value: Any, path: str) -> None:
        _dict(value, path)
        for name, field_check in fields.items():
            where = f"{path}.{name}" if path else name
            if name not in value:
                _fail("missing_field", where, "required field is missing")
            field_check(value[name], where)
        for name, field_check in (optional or {}).items():
            if value.get(name) is not None:
                field_check(value[name], f"{path}.{name}" if path else name)

    return check


_BITS = _int(1, 32)


def _phase(value: Any, path: str) -> None:
    if value not in ("plan", "final"):
        _fail("bad_value", path, f"expected 'plan' or 'final', got {value!r}")


_JOB = _object(
    {
        "model": _nonempty_str,
        "dataset": _nonempty_str,
        "batch_size": _int(1, 2**20),
        "local_epochs": _number(0, 1e4, positive=True),
        "lr": _number(0, 1e3, positive=True),
        "optimizer": _nonempty_str,
    }
)

#: Required fields of each message type (besides "v" and "type").
_SCHEMAS: dict[str, Check] = {
    "register": _object(
        {
            "device_id": _device_id,
            "profile": _dict,
            "data": _object(
                {"n_samples": _int(0, MAX_SAMPLES), "label_hist": _list_of(_int(0, MAX_SAMPLES))}
            ),
            "sent_at": _number(0, 1e11),
        }
    ),
    "assign": _object(
        {
            "device_id": _device_id,
            "strategy": _nonempty_str,
            "bits": _BITS,
            "per_layer_bits": _optional(_map_of(_BITS)),
            "job": _JOB,
        },
        {"act_bits": _int(2, 8), "act_bit_set": _list_of(_int(2, 8))},
    ),
    "task": _object(
        {
            "round": _int(0, MAX_ROUND),
            "job_id": _nonempty_str,
            "local_epochs": _number(0, 1e4, positive=True),
            "deadline_s": _number(0, MAX_SECONDS, positive=True),
        },
        {"trial": _int(0, MAX_ROUND)},
    ),
    "update": _object(
        {
            "round": _int(0, MAX_ROUND),
            "job_id": _nonempty_str,
            "n_samples": _int(1, MAX_SAMPLES),
            "train_loss": _number(0, MAX_NUMBER),
            "train_seconds": _number(0, MAX_SECONDS),
        },
        {"board_seconds": _number(0, MAX_SECONDS), "trial": _int(0, MAX_ROUND)},
    ),
    "status": _object({"device_id": _device_id, "online": _bool}),
    "model": _object(
        {
            "job_id": _nonempty_str,
            "bits": _BITS,
            "storage": _nonempty_str,
            "filename": _nonempty_str,
        },
        {"candidate": _nonempty_str},
    ),
    "candidate": _object({"job_id": _nonempty_str, "name": _nonempty_str, "phase": _phase}),
    "timing": _object(
        {
            "device_id": _device_id,
            "job_id": _nonempty_str,
            "name": _nonempty_str,
            "phase": _phase,
            "latency_ms": _number(0, MAX_SECONDS * 1e3, positive=True),
            "memory_bytes": _int(0, MAX_INT),
            "source": _nonempty_str,
        }
    ),
}

#: The message types this schema version knows.
MESSAGE_TYPES = tuple(_SCHEMAS)


def validate_message(message: Any, expected_type: str | None = None) -> dict[str, Any]:
    """Check an already parsed message (e.g. the `meta` of a chunked payload) and return it."""
    if not isinstance(message, dict):
        _fail("bad_type", "message", f"expected a JSON object, got {type(message).__name__}")
    if "v" not in message:
        _fail("missing_field", "v", "schema version is missing")
    version = message["v"]
    if isinstance(version, bool) or not isinstance(version, int) or version != SCHEMA_VERSION:
        _fail("schema_version", "v", f"got {version!r}, this side speaks {SCHEMA_VERSION}")
    if "type" not in message:
        _fail("missing_field", "type", "message type is missing")
    kind = message["type"]
    if not isinstance(kind, str):
        _fail("bad_type", "type", f"expected a string, got {type(kind).__name__}")
    if kind not in _SCHEMAS:
        _fail("unknown_type", "type", f"{kind!r} is not one of {MESSAGE_TYPES}")
    if expected_type is not None and kind != expected_type:
        _fail("unexpected_type", "type", f"expected {expected_type!r}, got {kind!r}")
    _SCHEMAS[kind](message, "")
    return message


def parse_json(
    text: str, what: str, reason: str = "bad_json", value_reason: str = "bad_value"
) -> Any:
    """JSON with finite numbers only (no NaN, Infinity, 1e999); every failure is a
    ProtocolError: `reason` for malformed JSON, `value_reason` for a non-finite number."""

    def finite(number: str) -> float:
        value = float(number)
        if not math.isfinite(value):  # 1e999 parses to inf
            raise ProtocolError(value_reason, f"number {number} in {what} is not finite")
        return value

    def constant(name: str) -> None:
        raise ProtocolError(value_reason, f"{name} is not allowed in {what}")

    try:
        return json.loads(text, parse_float=finite, parse_constant=constant)
    except ProtocolError:
        raise
    except (ValueError, RecursionError) as exc:  # JSONDecodeError, int digit limit, deep nesting
        raise ProtocolError(reason, f"{what} is not JSON: {exc}"[:200]) from None


def make_message(type: str, body: Mapping[str, Any]) -> dict[str, Any]:
    """A validated message dict of `type`: what `encode_message` sends, or a chunk's `meta`."""
    if "v" in body or "type" in body:
        raise ProtocolError("bad_value", "body must not set 'v' or 'type'; they are added here")
    return validate_message({"v": SCHEMA_VERSION, "type": type, **body}, type)


def encode_message(type: str, body: Mapping[str, Any]) -> bytes:
    """Serialize a control message of `type`; raises ProtocolError if `body` breaks the schema."""
    message = make_message(type, body)
    try:
        text = json.dumps(message, allow_nan=False, separators=(",", ":"), ensure_ascii=False)
    except (TypeError, ValueError) as exc:
        raise ProtocolError("bad_value", f"{type} message is not JSON: {exc}") from None
    data = text.encode("utf-8")
    if len(data) > MAX_MESSAGE_BYTES:
        raise ProtocolError(
            "too_large", f"{type} message is {len(data)} bytes, limit {MAX_MESSAGE_BYTES}"
        )
    return data


def decode_message(
    payload: bytes,
    expected_type: str | None = None,
    max_bytes: int = MAX_MESSAGE_BYTES,
) -> dict[str, Any]:
    """Parse and validate one control message; raises only ProtocolError for bad input."""
    if not isinstance(payload, (bytes, bytearray, memoryview)):
        raise ProtocolError("bad_type", f"payload must be bytes, got {type(payload).__name__}")
    if len(payload) > max_bytes:
        raise ProtocolError("too_large", f"message is {len(payload)} bytes, limit {max_bytes}")
    try:
        text = bytes(payload).decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ProtocolError("bad_json", f"not UTF-8: {exc}") from None
    return validate_message(parse_json(text, "a control message"), expected_type)
