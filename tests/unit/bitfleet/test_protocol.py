"""Tests for bitfleet.protocol without a broker: topics, control messages, tensors, chunks."""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import struct

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bitfleet.protocol import (
    KINDS,
    MAX_CHUNK,
    MESSAGE_TYPES,
    Payload,
    ProtocolError,
    Reassembler,
    Topics,
    decode_message,
    encode_message,
    is_chunk,
    pack_state,
    parse_broker_url,
    split_payload,
    unpack_state,
    validate_device_id,
)

# -- topics --


def test_topics_build_and_parse() -> None:
    topics = Topics(fleet="lab")
    for kind in KINDS:
        topic = getattr(topics, kind)("rpi5-01")
        assert topic == f"bitfleet/lab/{kind}/rpi5-01"
        assert topics.parse(topic) == (kind, "rpi5-01")
    assert topics.all("update") == "bitfleet/lab/update/+"
    assert topics.shared("update", "agg") == "$share/agg/bitfleet/lab/update/+"
    assert Topics().register("a") == "bitfleet/default/register/a"


@given(st.from_regex(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}", fullmatch=True), st.sampled_from(KINDS))
def test_topics_round_trip_any_valid_id(device: str, kind: str) -> None:
    topics = Topics(prefix="org/bitfleet", fleet="f1")
    assert topics.parse(topics.topic(kind, device)) == (kind, device)


@pytest.mark.parametrize(
    "device",
    ["", "-lead", ".x", "_x", "a/b", "a+", "a#", "a b", "é", "x" * 65, None, 7],
)
def test_bad_device_ids_rejected(device: object) -> None:
    with pytest.raises(ProtocolError) as err:
        validate_device_id(device)
    assert err.value.reason == "bad_device_id"
    with pytest.raises(ProtocolError):
        Topics().status(device)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "topic",
    [
        "bitfleet/other/update/dev",  # another fleet
        "bitfleet/default/update",  # no device
        "bitfleet/default/update/dev/extra",
        "bitfleet/default/upload/dev",  # unknown kind
        "bitfleet/default/update/+",
        "bitfleet/default/update/-dev",
        "elsewhere/default/update/dev",
        "",
    ],
)
def test_parse_rejects_foreign_topics(topic: str) -> None:
    with pytest.raises(ProtocolError) as err:
        Topics().parse(topic)
    assert err.value.reason == "bad_topic"


def test_topics_reject_bad_configuration() -> None:
    for bad in [{"fleet": "a/b"}, {"fleet": ""}, {"prefix": "x/+"}, {"prefix": "a//b"}]:
        with pytest.raises(ValueError):
            Topics(**bad)
    with pytest.raises(ValueError):
        Topics().topic("upload", "dev")


# -- control messages --

JOB = {
    "model": "lenet",
    "dataset": "fashion_mnist",
    "batch_size": 32,
    "local_epochs": 1,
    "lr": 0.01,
    "optimizer": "sgd",
}

VALID = {
    "register": {
        "device_id": "rpi5-01",
        "profile": {"name": "rpi5", "int_bits": [4, 8]},
        "data": {"n_samples": 600, "label_hist": [60] * 10},
        "sent_at": 1700000000.25,
    },
    "assign": {
        "device_id": "rpi5-01",
        "strategy": "qat",
        "bits": 4,
        "per_layer_bits": {"conv1": 8, "fc": 4},
        "job": JOB,
    },
    "task": {"round": 0, "job_id": "j1", "local_epochs": 1.5, "deadline_s": 120},
    "update": {
        "round": 3,
        "job_id": "j1",
        "n_samples": 600,
        "train_loss": 0.42,
        "train_seconds": 12.5,
    },
    "status": {"device_id": "rpi5-01", "online": True},
    "model": {"job_id": "j1", "bits": 8, "storage": "chunks", "filename": "m.onnx"},
    "candidate": {"job_id": "j1", "name": "int8-qdq", "phase": "final"},
    "timing": {
        "device_id": "rpi5-01",
        "job_id": "j1",
        "name": "int8-qdq",
        "phase": "plan",
        "latency_ms": 0.25,
        "memory_bytes": 123456,
        "source": "measured",
    },
}


def test_every_message_type_has_a_fixture() -> None:
    assert set(VALID) == set(MESSAGE_TYPES)


@pytest.mark.parametrize("kind", sorted(VALID))
def test_message_round_trip(kind: str) -> None:
    body = {**VALID[kind], "extra_field": ["ignored", 1]}
    message = decode_message(encode_message(kind, body), expected_type=kind)
    assert message == {"v": 1, "type": kind, **body}


def test_assign_allows_null_per_layer_bits() -> None:
    body = {**VALID["assign"], "per_layer_bits": None}
    assert decode_message(encode_message("assign", body))["per_layer_bits"] is None


def _raw(message: object) -> bytes:
    return json.dumps(message).encode()


def _reason(payload: bytes, **kwargs: object) -> str:
    with pytest.raises(ProtocolError) as err:
        decode_message(payload, **kwargs)  # type: ignore[arg-type]
    return err.value.reason


def _with(kind: str, **changes: object) -> dict[str, object]:
    return {"v": 1, "type": kind, **VALID[kind], **changes}


@pytest.mark.parametrize(
    ("payload", "reason"),
    [
        (b"{not json", "bad_json"),
        (b"\xff\xfe{}", "bad_json"),
        (b"[" * 100_000, "too_large"),
        (b"[" * 50_000 + b"]" * 50_000, "too_large"),
        (b"[" * 30_000, "bad_json"),  # nesting deep enough to exhaust the recursion limit
        (b"9" * 5000, "bad_json"),  # exceeds Python's int digit limit
        (_raw([1, 2]), "bad_type"),
        (_raw({"type": "status", "device_id": "d", "online": True}), "missing_field"),
        (_raw({**_with("status"), "v": 2}), "schema_version"),
        (_raw({**_with("status"), "v": True}), "schema_version"),
        (_raw({**_with("status"), "v": "1"}), "schema_version"),
        (_raw({"v": 1, "type": "reboot"}), "unknown_type"),
        (_raw({"v": 1}), "missing_field"),
        (_raw({"v": 1, "type": 5}), "bad_type"),
        (_raw({k: v for k, v in _with("update").items() if k != "n_samples"}), "missing_field"),
        (_raw(_with("update", round="3")), "bad_type"),
        (_raw(_with("update", round=3.0)), "bad_type"),
        (_raw(_with("update", round=True)), "bad_type"),  # a bool is not an int
        (_raw(_with("update", round=-1)), "bad_value"),
        (_raw(_with("update", n_samples=0)), "bad_value"),
        (_raw(_with("update", train_loss=False)), "bad_type"),
        (_raw(_with("update", train_loss=float("nan"))), "bad_value"),
        (_raw(_with("update", train_loss=float("inf"))), "bad_value"),
        (_raw(_with("update", job_id=None)), "bad_type"),
        (_raw(_with("status", online=1)), "bad_type"),
        (_raw(_with("status", device_id="a/b")), "bad_device_id"),
        (_raw(_with("assign", bits=0)), "bad_value"),
        (_raw(_with("assign", per_layer_bits={"fc": "8"})), "bad_type"),
        (_raw(_with("assign", job={**JOB, "batch_size": True})), "bad_type"),
        (_raw(_with("assign", job={k: v for k, v in JOB.items() if k != "lr"})), "missing_field"),
        (_raw(_with("register", data={"n_samples": 5, "label_hist": [1, True]})), "bad_type"),
        (_raw(_with("register", profile={"x": float("nan")})), "bad_value"),  # NaN anywhere
        (
            b'{"v":1,"type":"task","round":0,"job_id":"j","local_epochs":1e999,"deadline_s":1}',
            "bad_value",
        ),
    ],
)
def test_bad_messages_rejected_with_reason(payload: bytes, reason: str) -> None:
    assert _reason(payload) == reason


def test_decode_checks_expected_type_and_size() -> None:
    payload = encode_message("status", VALID["status"])
    assert _reason(payload, expected_type="update") == "unexpected_type"
    assert _reason(payload, max_bytes=len(payload) - 1) == "too_large"
    assert decode_message(bytearray(payload))["online"] is True
    assert _reason("a str", max_bytes=10) == "bad_type"  # type: ignore[arg-type]


def test_encode_validates_before_sending() -> None:
    with pytest.raises(ProtocolError) as err:
        encode_message("update", {**VALID["update"], "train_loss": float("nan")})
    assert err.value.reason == "bad_value"
    with pytest.raises(ProtocolError) as err:
        encode_message("status", {"device_id": "d"})
    assert err.value.reason == "missing_field"
    with pytest.raises(ProtocolError) as err:
        encode_message("status", {**VALID["status"], "blob": "x" * 70_000})
    assert err.value.reason == "too_large"
    with pytest.raises(ProtocolError):
        encode_message("status", {**VALID["status"], "when": object()})
    with pytest.raises(ProtocolError):
        encode_message("status", {**VALID["status"], "v": 2})


def test_protocol_error_is_a_value_error_and_pickles() -> None:
    import pickle

    err = ProtocolError("bad_json", "oops")
    assert isinstance(err, ValueError)
    again = pickle.loads(pickle.dumps(err))
    assert (again.reason, str(again)) == ("bad_json", "bad_json: oops")


# -- tensors --


def test_tensors_round_trip() -> None:
    weight = torch.randn(8, 3, 3, 3)
    state = {
        "conv.weight": weight,
        "tied.weight": weight,  # shares storage with conv.weight
        "fc.weight": torch.randn(4, 10).t(),  # not contiguous
        "bn.num_batches_tracked": torch.tensor(7, dtype=torch.int64),
        "ids": torch.arange(12, dtype=torch.int64).reshape(3, 4),
        "empty": torch.empty(0, 5),
        "grad": torch.ones(3, requires_grad=True),
    }
    out = unpack_state(pack_state(state))
    assert out.keys() == state.keys()
    for name, tensor in state.items():
        assert out[name].dtype == tensor.dtype
        assert out[name].shape == tensor.shape
        assert torch.equal(out[name], tensor.detach())


@pytest.mark.parametrize(
    "garbage",
    [
        b"",
        b"\x00" * 8,
        b"not safetensors",
        struct.pack("<Q", 10**12) + b"{}",
        b"\x08" + b"\0" * 7 + b"{bad json",
    ],
)
def test_garbage_tensors_rejected(garbage: bytes) -> None:
    with pytest.raises(ProtocolError) as err:
        unpack_state(garbage)
    assert err.value.reason == "bad_tensors"


def test_truncated_tensors_rejected() -> None:
    blob = pack_state({"w": torch.randn(16, 16)})
    with pytest.raises(ProtocolError):
        unpack_state(blob[:-10])


# -- chunks --


def _header(chunk: bytes) -> dict[str, object]:
    (n,) = struct.unpack(">I", chunk[:4])
    return json.loads(chunk[4 : 4 + n])


def _chunk(header: dict[str, object], data: bytes) -> bytes:
    raw = json.dumps(header).encode()
    return struct.pack(">I", len(raw)) + raw + data


def _reassembler(**kwargs: object) -> Reassembler:
    limits: dict[str, object] = {"max_bytes": 1 << 20, "max_chunks": 64, "timeout_s": 60.0}
    limits.update(kwargs)
    return Reassembler(**limits)  # type: ignore[arg-type]


def test_split_payload_layout() -> None:
    blob = bytes(range(256)) * 10
    chunks = split_payload("update", {"round": 2}, blob, chunk_size=1000)
    assert len(chunks) == 3
    headers = [_header(c) for c in chunks]
    assert [h["index"] for h in headers] == [0, 1, 2]
    assert {h["payload_id"] for h in headers} == {headers[0]["payload_id"]}
    assert headers[0] == {
        "v": 1,
        "payload_id": headers[0]["payload_id"],
        "kind": "update",
        "index": 0,
        "count": 3,
        "size": len(blob),
        "sha256": hashlib.sha256(blob).hexdigest(),
        "meta": {"round": 2},
    }
    assert all(is_chunk(c) for c in chunks)
    assert not is_chunk(encode_message("status", VALID["status"]))
    assert max(len(c) for c in split_payload("m", {}, bytes(3 * MAX_CHUNK))) < MAX_CHUNK + 1024
    with pytest.raises(ValueError):
        split_payload("m", {}, b"x", chunk_size=MAX_CHUNK + 1)


def test_split_payload_takes_a_given_id_and_draws_a_fresh_one_otherwise() -> None:
    blob = bytes(range(200))
    given = split_payload("m", {"k": 1}, blob, chunk_size=64, payload_id="fixed-id_1")
    assert given == split_payload("m", {"k": 1}, blob, chunk_size=64, payload_id="fixed-id_1")
    assert {_header(c)["payload_id"] for c in given} == {"fixed-id_1"}
    fresh = [_header(split_payload("m", {}, blob)[0])["payload_id"] for _ in range(2)]
    assert fresh[0] != fresh[1] and all(len(p) == 32 for p in fresh)
    for bad in ["", "a/b", "x" * 65, 7]:
        with pytest.raises(ValueError, match="payload_id"):
            split_payload("m", {}, blob, payload_id=bad)  # type: ignore[arg-type]


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data(), size=st.integers(0, 3 * 64 + 5))
def test_reassembly_survives_reordering_and_duplicates(data: st.DataObject, size: int) -> None:
    blob = data.draw(st.binary(min_size=size, max_size=size))
    chunks = split_payload("model", {"bits": 4}, blob, chunk_size=64, payload_id="p0")
    order = data.draw(st.permutations(range(len(chunks))))
    extra = data.draw(st.lists(st.sampled_from(range(len(chunks))), max_size=6))
    deliveries = list(order)
    for i in extra:  # QoS 1 redeliveries, before or after the payload completes
        deliveries.insert(data.draw(st.integers(0, len(deliveries))), i)
    deliveries += data.draw(st.lists(st.sampled_from(range(len(chunks))), max_size=3))
    reassembler = _reassembler()
    results = [r for i in deliveries if (r := reassembler.add(chunks[i], now=0.0)) is not None]
    assert len(results) == 1
    (payload,) = results
    assert isinstance(payload, Payload)
    assert (payload.kind, payload.meta, payload.blob) == ("model", {"bits": 4}, blob)
    assert reassembler.pending == 0


def test_interleaved_payloads_and_sources() -> None:
    reassembler = _reassembler()
    a = split_payload("update", {"d": "a"}, b"a" * 300, chunk_size=100)
    b = split_payload("update", {"d": "b"}, b"b" * 250, chunk_size=100)
    done = []
    for ca, cb in zip(a, b, strict=False):
        done += [reassembler.add(ca, source="t/a"), reassembler.add(cb, source="t/b")]
    done.append(reassembler.add(a[-1], source="t/a"))
    finished = [p for p in done if p is not None]
    assert {(p.source, p.blob) for p in finished} == {("t/a", b"a" * 300), ("t/b", b"b" * 250)}
    # The same payload id from another source is another payload.
    assert reassembler.add(a[0], source="t/evil") is None
    assert reassembler.pending == 1


def test_corrupted_chunk_gives_sha256_mismatch() -> None:
    chunks = split_payload("model", {}, bytes(range(200)), chunk_size=64)
    chunks[1] = chunks[1][:-1] + bytes([chunks[1][-1] ^ 0xFF])
    reassembler = _reassembler()
    with pytest.raises(ProtocolError) as err:
        for chunk in chunks:
            reassembler.add(chunk)
    assert err.value.reason == "sha256_mismatch"
    assert reassembler.pending == 0


def test_limits_rejected_as_too_large() -> None:
    blob = bytes(5000)
    header = _header(split_payload("m", {}, blob, chunk_size=1000)[0])
    cases = [
        (_reassembler(max_chunk=500), split_payload("m", {}, blob, chunk_size=1000)[0]),
        (_reassembler(max_chunks=4), split_payload("m", {}, blob, chunk_size=1000)[0]),
        (_reassembler(max_bytes=4999), split_payload("m", {}, blob, chunk_size=1000)[0]),
        (_reassembler(), _chunk({**header, "count": 10**6}, bytes(1000))),
        (_reassembler(), b"\x00\x10\x00\x00" + bytes(100)),  # a 1 MiB header
    ]
    for reassembler, chunk in cases:
        with pytest.raises(ProtocolError) as err:
            reassembler.add(chunk)
        assert err.value.reason == "too_large"


def test_disagreeing_or_malformed_chunks_rejected() -> None:
    chunks = split_payload("m", {"x": 1}, bytes(300), chunk_size=100)
    first = _header(chunks[0])
    bad = [
        _chunk({**_header(chunks[1]), "size": 301}, bytes(100)),
        _chunk({**_header(chunks[1]), "kind": "other"}, bytes(100)),
        _chunk({**_header(chunks[1]), "sha256": "0" * 64}, bytes(100)),
        _chunk({**_header(chunks[1]), "meta": {"x": 2}}, bytes(100)),
    ]
    reassembler = _reassembler()
    assert reassembler.add(chunks[0]) is None
    for chunk in bad:
        with pytest.raises(ProtocolError) as err:
            reassembler.add(chunk)
        assert err.value.reason == "bad_chunk"
    malformed = [
        b"",
        b"\x00\x00",
        b"\x00\x00\x00\x10{}",  # header longer than the chunk
        _chunk([1], b""),  # type: ignore[arg-type]
        _chunk({**first, "index": 3}, bytes(100)),
        _chunk({**first, "index": True}, bytes(100)),
        _chunk({**first, "payload_id": "../x"}, bytes(100)),
        _chunk({**first, "sha256": "XYZ"}, bytes(100)),
        _chunk({k: v for k, v in first.items() if k != "meta"}, bytes(100)),
        _chunk({**first, "size": 1}, bytes(100)),  # more data than the whole payload
        _chunk({**first, "count": 50, "size": 10}, b""),  # more chunks than bytes
    ]
    for chunk in malformed:
        with pytest.raises(ProtocolError) as err:
            reassembler.add(chunk)
        assert err.value.reason in {"bad_chunk", "schema_version"}
    with pytest.raises(ProtocolError) as err:
        reassembler.add(_chunk({**first, "v": 2}, bytes(100)))
    assert err.value.reason == "schema_version"
    # The honest payload still completes after all that noise.
    assert reassembler.add(chunks[1]) is None
    payload = reassembler.add(chunks[2])
    assert payload is not None and payload.blob == bytes(300)


def test_meta_only_in_chunk_zero_is_accepted() -> None:
    chunks = split_payload("m", {"k": "v"}, bytes(200), chunk_size=100)
    rest = _header(chunks[1])
    del rest["meta"]
    reassembler = _reassembler()
    assert reassembler.add(_chunk(rest, bytes(100))) is None
    payload = reassembler.add(chunks[0])
    assert payload is not None and payload.meta == {"k": "v"}


def test_expiry_discard_and_partial_cap() -> None:
    reassembler = _reassembler(timeout_s=10.0, max_partial=2)
    p1, p2, p3 = (split_payload("m", {}, bytes(200), chunk_size=100) for _ in range(3))
    reassembler.add(p1[0], now=0.0)
    reassembler.add(p2[0], now=5.0)
    assert reassembler.expire(now=10.5) == [_header(p1[0])["payload_id"]]
    assert reassembler.pending == 1
    # p1 restarts from scratch; a third payload evicts the least recently active one (p2).
    reassembler.add(p1[0], now=11.0)
    reassembler.add(p3[0], now=12.0)
    assert reassembler.pending == 2
    assert reassembler.add(p2[1], now=12.5) is None  # p2 was evicted: only one chunk known now
    assert reassembler.discard(str(_header(p2[0])["payload_id"]))
    assert not reassembler.discard("nope")
    assert reassembler.add(p3[1], now=13.0) is not None


def test_completed_ids_are_remembered_boundedly() -> None:
    reassembler = _reassembler(remember=2)
    payloads = [split_payload("m", {}, bytes([i]), chunk_size=100) for i in range(3)]
    for chunks in payloads:
        assert reassembler.add(chunks[0]) is not None
    assert reassembler.add(payloads[2][0]) is None  # remembered: a redelivery
    assert reassembler.add(payloads[0][0]) is not None  # forgotten after `remember` others


# -- fuzz: decoders raise only ProtocolError --


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=512))
def test_decoders_raise_only_protocol_error(payload: bytes) -> None:
    for decode in (decode_message, functools.partial(_reassembler().add, now=0.0), unpack_state):
        with contextlib.suppress(ProtocolError):
            decode(payload)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)


@settings(max_examples=300, deadline=None)
@given(
    st.sampled_from(sorted(VALID)), st.dictionaries(st.text(max_size=12), json_values, max_size=4)
)
def test_mutated_messages_raise_only_protocol_error(kind: str, changes: dict[str, object]) -> None:
    message = {"v": 1, "type": kind, **VALID[kind], **changes}
    try:
        decoded = decode_message(json.dumps(message).encode())
    except ProtocolError:
        return
    assert decoded["type"] == message["type"]


@settings(max_examples=200, deadline=None)
@given(
    st.dictionaries(
        st.sampled_from(["v", "payload_id", "kind", "index", "count", "size", "sha256", "meta"]),
        json_values,
    ),
    st.binary(max_size=64),
)
def test_chunk_headers_fuzzed_raise_only_protocol_error(
    header: dict[str, object], data: bytes
) -> None:
    with contextlib.suppress(ProtocolError):
        _reassembler().add(_chunk(header, data), now=0.0)


# -- broker URLs (no broker needed) --


def test_parse_broker_url() -> None:
    address = parse_broker_url("mqtt://127.0.0.1")
    assert (address.host, address.port, address.tls, address.username) == (
        "127.0.0.1",
        1883,
        False,
        None,
    )
    address = parse_broker_url("mqtts://dev%40fleet:p%3Ass@broker.example:9000")
    assert (address.host, address.port, address.tls) == ("broker.example", 9000, True)
    assert (address.username, address.password) == ("dev@fleet", "p:ss")
    assert "p:ss" not in repr(address) and "p:ss" not in str(address)
    assert parse_broker_url("mqtts://[::1]").port == 8883
    for bad in ["http://h", "h:1883", "mqtt://", "mqtt://h:99999", "mqtt://h:x", "mqtt://h/path"]:
        with pytest.raises(ValueError, match="broker URL"):
            parse_broker_url(bad)


def test_assign_checks_optional_activation_widths() -> None:
    body = {**VALID["assign"], "act_bits": 2, "act_bit_set": [2, 4, 8]}
    assert decode_message(encode_message("assign", body))["act_bit_set"] == [2, 4, 8]
    assert decode_message(encode_message("assign", {**body, "act_bits": None}))
    for bad, reason in (({"act_bits": 1}, "bad_value"), ({"act_bit_set": [2, "4"]}, "bad_type")):
        with pytest.raises(ProtocolError) as err:
            decode_message(_raw({"v": 1, "type": "assign", **VALID["assign"], **bad}))
        assert err.value.reason == reason
