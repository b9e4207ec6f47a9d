"""Fuzzing the two decoders that read what the network sends: control messages and chunks.

The contract (bitfleet.protocol.errors): whatever arrives, a decoder returns a valid result or
raises `ProtocolError` whose `.reason` is one of a few stable codes, so a receive loop logs and
counts it instead of dying. Inputs come from three directions: raw bytes, structured JSON that
is almost a message (right or wrong version and type, missing or retyped fields), and valid
chunks after bit flips, truncation and header edits. The valid inputs the mutations start from
must still decode, so a decoder that rejects everything cannot pass.

Every input comes from the strategies, nothing from outside (no uuid, no clock): hypothesis
replays an example by its choices, and a mutation that sees other bytes on replay draws other
values (`FlakyStrategyDefinition`). So chunks carry a drawn `payload_id` and the reassemblers
get `now=0.0`.
"""

from __future__ import annotations

import hashlib
import json
import struct
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bitfleet.protocol import (
    DEVICE_ID_PATTERN,
    MAX_MESSAGE_BYTES,
    MESSAGE_TYPES,
    ProtocolError,
    Reassembler,
    decode_message,
    encode_message,
    split_payload,
)

#: Every reason a control message may be rejected with.
MESSAGE_REASONS = {
    "bad_json",
    "bad_type",
    "bad_value",
    "schema_version",
    "missing_field",
    "unknown_type",
    "unexpected_type",
    "too_large",
    "bad_device_id",
}

#: Every reason a chunk may be rejected with.
CHUNK_REASONS = {"bad_chunk", "too_large", "schema_version", "sha256_mismatch"}

FUZZ = settings(
    max_examples=2000,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


def _rejected(exc: ProtocolError, reasons: set[str]) -> None:
    assert exc.reason in reasons, f"unknown reason {exc.reason!r}: {exc}"
    assert str(exc)


# -- strategies --

finite = st.floats(allow_nan=False, allow_infinity=False)
scalars = st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=12)
json_values = st.recursive(
    scalars,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=10,
)
finite_json = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**63) | finite | st.text(max_size=12),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=10,
)
device_ids = st.from_regex(DEVICE_ID_PATTERN, fullmatch=True)
names = st.text(min_size=1, max_size=16)
bits = st.integers(1, 32)
positive = st.integers(1, 10**3) | st.floats(min_value=1e-6, max_value=1e3)
seconds = st.floats(min_value=0, max_value=1e7)

BODIES: dict[str, st.SearchStrategy[dict[str, Any]]] = {
    "register": st.fixed_dictionaries(
        {
            "device_id": device_ids,
            "profile": st.dictionaries(st.text(max_size=8), finite_json, max_size=4),
            "data": st.fixed_dictionaries(
                {
                    "n_samples": st.integers(0, 10**9),
                    "label_hist": st.lists(st.integers(0, 10**9), max_size=12),
                }
            ),
            "sent_at": st.floats(min_value=0, max_value=1e11),
        }
    ),
    "assign": st.fixed_dictionaries(
        {
            "device_id": device_ids,
            "strategy": names,
            "bits": bits,
            "per_layer_bits": st.none() | st.dictionaries(names, bits, max_size=4),
            "job": st.fixed_dictionaries(
                {
                    "model": names,
                    "dataset": names,
                    "batch_size": st.integers(1, 4096),
                    "local_epochs": positive,
                    "lr": positive,
                    "optimizer": names,
                }
            ),
        }
    ),
    "task": st.fixed_dictionaries(
        {
            "round": st.integers(0, 10**6),
            "job_id": names,
            "local_epochs": positive,
            "deadline_s": positive | st.floats(min_value=1, max_value=1e7),
        }
    ),
    "update": st.fixed_dictionaries(
        {
            "round": st.integers(0, 10**6),
            "job_id": names,
            "n_samples": st.integers(1, 10**9),
            "train_loss": st.floats(min_value=0, max_value=1e15),
            "train_seconds": seconds,
            "board_seconds": st.none() | seconds,
            "trial": st.none() | st.integers(0, 10**6),
        }
    ),
    "status": st.fixed_dictionaries({"device_id": device_ids, "online": st.booleans()}),
    "model": st.fixed_dictionaries(
        {"job_id": names, "bits": bits, "storage": names, "filename": names},
        optional={"candidate": names},
    ),
    "candidate": st.fixed_dictionaries(
        {"job_id": names, "name": names, "phase": st.sampled_from(["plan", "final"])}
    ),
    "timing": st.fixed_dictionaries(
        {
            "device_id": device_ids,
            "job_id": names,
            "name": names,
            "phase": st.sampled_from(["plan", "final"]),
            "latency_ms": st.floats(min_value=1e-6, max_value=1e9),
            "memory_bytes": st.integers(0, 2**53 - 1),
            "source": names,
        }
    ),
}


@st.composite
def valid_messages(draw: st.DrawFn) -> tuple[str, dict[str, Any]]:
    """(type, body) that the schema accepts, with extra fields a newer sender might add."""
    kind = draw(st.sampled_from(MESSAGE_TYPES))
    body = draw(BODIES[kind])
    reserved = ("v", "type", "trial", "board_seconds", "candidate")  # checked where present
    extra_keys = st.text(max_size=8).filter(lambda k: k not in body and k not in reserved)
    body.update(draw(st.dictionaries(extra_keys, finite_json, max_size=3)))
    return kind, body


def test_every_message_type_is_fuzzed() -> None:
    assert set(BODIES) == set(MESSAGE_TYPES)


# -- control messages --


@FUZZ
@given(valid_messages())
def test_valid_messages_decode(message: tuple[str, dict[str, Any]]) -> None:
    kind, body = message
    decoded = decode_message(encode_message(kind, body), expected_type=kind)
    assert decoded == {"v": 1, "type": kind, **body}


@FUZZ
@given(st.binary(max_size=2048), st.sampled_from([None, *MESSAGE_TYPES]))
def test_decode_message_on_arbitrary_bytes(payload: bytes, expected: str | None) -> None:
    try:
        message = decode_message(payload, expected_type=expected)
    except ProtocolError as exc:
        _rejected(exc, MESSAGE_REASONS)
    else:  # random bytes that are a valid message: possible in principle, then it must be one
        assert message["v"] == 1 and message["type"] in MESSAGE_TYPES


versions = st.sampled_from([1, 0, 2, -1, "1", 1.0, True, None, [1], {"v": 1}])
types = st.sampled_from([*MESSAGE_TYPES, "", "REGISTER", "bogus", 1, None, ["update"]])
field_names = st.sampled_from(
    sorted({"device_id", "profile", "data", "sent_at", "strategy", "bits", "per_layer_bits"})
    + ["job", "round", "job_id", "local_epochs", "deadline_s", "n_samples", "train_loss"]
    + ["train_seconds", "online", "storage", "filename", "label_hist", "model", "lr"]
) | st.text(max_size=8)


@st.composite
def almost_messages(draw: st.DrawFn) -> dict[str, Any]:
    """A valid message with a few of its fields, version or type broken (or not)."""
    kind, body = draw(valid_messages())
    message: dict[str, Any] = {"v": 1, "type": kind, **body}
    for _ in range(draw(st.integers(0, 3))):
        action = draw(st.sampled_from(["v", "type", "drop", "set", "nest", "id"]))
        if action == "id":  # an id that is not one topic level: "a/b", "+", "", ...
            message["device_id"] = draw(st.text(max_size=70) | st.sampled_from(["+", "#", "a/b"]))
        elif action == "v":
            message["v"] = draw(versions)
        elif action == "type":
            message["type"] = draw(types)
        elif action == "drop" and message:
            message.pop(draw(st.sampled_from(sorted(message))))
        elif action == "set":
            message[draw(field_names)] = draw(json_values)
        elif action == "nest":  # break a field inside a nested object
            for value in message.values():
                if isinstance(value, dict) and value:
                    value[draw(st.sampled_from(sorted(value)))] = draw(json_values)
                    break
    return message


@FUZZ
@given(
    almost_messages(),
    st.sampled_from([None, *MESSAGE_TYPES]),
    st.just(MAX_MESSAGE_BYTES) | st.integers(64, 2048),
)
def test_decode_message_on_structured_objects(
    message: dict[str, Any], expected: str | None, max_bytes: int
) -> None:
    payload = json.dumps(message, allow_nan=True).encode()  # NaN, Infinity: must be refused
    try:
        decoded = decode_message(payload, expected_type=expected, max_bytes=max_bytes)
    except ProtocolError as exc:
        _rejected(exc, MESSAGE_REASONS)
    else:
        assert decoded == message and decoded["v"] == 1
        assert expected in (None, decoded["type"]) and len(payload) <= max_bytes


@FUZZ
@given(st.lists(json_values, max_size=3) | json_values | st.dictionaries(field_names, json_values))
def test_decode_message_on_any_json(value: Any) -> None:
    try:
        decode_message(json.dumps(value, allow_nan=True).encode())
    except ProtocolError as exc:
        _rejected(exc, MESSAGE_REASONS)


# -- chunks --

MAX_CHUNK_TEST = 256


def _reassembler() -> Reassembler:
    return Reassembler(
        max_bytes=16 * MAX_CHUNK_TEST,
        max_chunks=16,
        timeout_s=60,
        max_chunk=MAX_CHUNK_TEST,
        max_partial=4,
    )


@FUZZ
@given(
    st.binary(max_size=1024)
    | st.builds(lambda n, rest: struct.pack(">I", n) + rest, st.integers(0, 300), st.binary())
)
def test_reassembler_on_arbitrary_bytes(payload: bytes) -> None:
    try:
        assert _reassembler().add(payload, now=0.0) is None
    except ProtocolError as exc:
        _rejected(exc, CHUNK_REASONS)


#: The id of the good payload sent after the mutated ones. No mutated chunk can carry it: it
#: is 64 characters, not all hex (the only 64-character text `header_values` draws), and a
#: drawn id is at most 63 (bit flips keep the length).
AFTER_ID = "after-the-storm".ljust(64, "_")
payload_ids = st.from_regex(r"[A-Za-z0-9_-]{1,63}", fullmatch=True)


@st.composite
def payloads(draw: st.DrawFn) -> tuple[bytes, list[bytes]]:
    """A blob and its chunks. The payload id is drawn: a random one would change the bytes the
    mutations see (a bit flip in it may or may not break the JSON) when an example is replayed."""
    blob = draw(st.binary(max_size=4 * MAX_CHUNK_TEST))
    chunk_size = draw(st.integers(16, MAX_CHUNK_TEST))
    meta = draw(st.dictionaries(st.text(max_size=6), finite_json, max_size=3))
    payload_id = draw(payload_ids)
    return blob, split_payload("update", meta, blob, chunk_size=chunk_size, payload_id=payload_id)


def _split(chunk: bytes) -> tuple[dict[str, Any], bytes]:
    (length,) = struct.unpack(">I", chunk[:4])
    return json.loads(chunk[4 : 4 + length]), chunk[4 + length :]


def _join(header: dict[str, Any], data: bytes) -> bytes:
    raw = json.dumps(header, allow_nan=True).encode()
    return struct.pack(">I", len(raw)) + raw + data


header_keys = st.sampled_from(
    ["v", "payload_id", "kind", "index", "count", "size", "sha256", "meta"]
) | st.text(max_size=6)
header_values = (
    json_values | st.integers(-2, 40) | st.text("0123456789abcdef", min_size=64, max_size=64)
)


def _flip(chunk: bytes, bit: int) -> bytes:
    flipped = bytearray(chunk)
    flipped[bit // 8] ^= 1 << (bit % 8)
    return bytes(flipped)


@st.composite
def mutate(draw: st.DrawFn, chunk: bytes) -> bytes:
    """One chunk after 1-3 edits: bit flips, truncation, appended bytes, header field edits,
    a wrong length prefix, or a replacement by noise."""
    for _ in range(draw(st.integers(1, 3))):
        actions = ["flip", "flip_data", "truncate", "append", "header", "length", "noise"]
        action = draw(st.sampled_from(actions))
        if action == "flip_data":  # the header is most of a small chunk: aim at the data too
            (length,) = struct.unpack(">I", chunk[:4]) if len(chunk) >= 4 else (len(chunk),)
            if 4 + length < len(chunk):
                chunk = _flip(chunk, draw(st.integers((4 + length) * 8, len(chunk) * 8 - 1)))
        elif action == "flip" and chunk:
            chunk = _flip(chunk, draw(st.integers(0, len(chunk) * 8 - 1)))
        elif action == "truncate":
            chunk = chunk[: draw(st.integers(0, max(0, len(chunk) - 1)))]
        elif action == "append":
            chunk += draw(st.binary(min_size=1, max_size=64))
        elif action == "header":
            try:
                header, data = _split(chunk)
            except (ValueError, struct.error):
                continue  # an earlier edit already broke the header
            if not isinstance(header, dict):
                continue
            key = draw(header_keys)
            if draw(st.booleans()) and key in header:
                del header[key]
            else:
                header[key] = draw(header_values)
            chunk = _join(header, data)
        elif action == "length" and len(chunk) >= 4:
            chunk = struct.pack(">I", draw(st.integers(0, 2**32 - 1))) + chunk[4:]
        elif action == "noise":
            chunk = b"\x00" + draw(st.binary(max_size=128))
    return chunk


@FUZZ
@given(payloads(), st.data())
def test_reassembler_on_mutated_chunks(
    payload: tuple[bytes, list[bytes]], data: st.DataObject
) -> None:
    blob, chunks = payload
    # The untouched chunks, in any order and with a redelivery, reassemble to the blob.
    order = data.draw(st.permutations(chunks))
    fresh = _reassembler()
    done = [p for c in [*order, order[0]] if (p := fresh.add(c, now=0.0)) is not None]
    assert [p.blob for p in done] == [blob]

    targets = data.draw(st.sets(st.integers(0, len(chunks) - 1), min_size=1))
    sent = [data.draw(mutate(c)) if i in targets else c for i, c in enumerate(chunks)]
    sent = data.draw(st.permutations(sent))
    reassembler = _reassembler()
    for chunk in sent:
        try:
            result = reassembler.add(chunk, now=0.0, source="dev0")
        except ProtocolError as exc:
            _rejected(exc, CHUNK_REASONS)
        else:
            # Whatever edits got through, a completed payload is the original blob: the sha256
            # of the whole catches every change to the data.
            if result is not None:
                assert result.blob == blob
                assert hashlib.sha256(result.blob).hexdigest() == _split(chunks[0])[0]["sha256"]
    # Still serviceable afterwards: a good payload from the same sender gets through.
    good = split_payload("update", {}, b"after the storm", chunk_size=8, payload_id=AFTER_ID)
    results = [reassembler.add(c, now=0.0, source="dev0") for c in good]
    assert results[-1] is not None and results[-1].blob == b"after the storm"
