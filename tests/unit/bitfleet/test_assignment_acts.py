"""Activation widths in an assignment: the method they build, the message, the label."""

from __future__ import annotations

from bitfleet.assignment import Assignment
from bitfleet.protocol import decode_message, encode_message
from bitfleet.quant import MQAT, QAT

JOB = {
    "model": "lenet5",
    "dataset": "fashion-mnist",
    "batch_size": 64,
    "local_epochs": 1.0,
    "lr": 0.01,
    "optimizer": "sgd",
}


def _wire(a: Assignment) -> dict:
    body = {"device_id": "rpi5-01", "job": JOB, **a.to_message()}
    return decode_message(encode_message("assign", body), expected_type="assign")


def test_round_trip_with_activation_fields() -> None:
    qat = Assignment("qat", 2, act_bits=2)
    assert Assignment.from_message(_wire(qat)) == qat
    assert qat.method_options() == {"bits": 2, "act_bits": 2}
    method = qat.method()
    assert isinstance(method, QAT) and (method.bits, method.act_bits) == (2, 2)
    assert qat.describe() == "qat W2A2"
    mqat = Assignment("mqat", 4, bit_set=(2, 4, 8), act_bit_set=(2, 4, 8))
    assert Assignment.from_message(_wire(mqat)) == mqat
    method = mqat.method()
    assert isinstance(method, MQAT) and tuple(method.act_bit_set) == (2, 4, 8)
    assert mqat.describe() == "mqat {2,4,8} A{2,4,8}"
    assert Assignment("ptq", 8, act_bits=8).describe() == "ptq A8"
    assert Assignment("mpq", 4, act_bits=4).describe() == "mpq budget 4-bit A4"


def test_without_activation_fields_nothing_changes() -> None:
    old = Assignment("qat", 4)
    body = old.to_message()
    assert "act_bits" not in body and "act_bit_set" not in body  # an old peer sees the same
    assert Assignment.from_message(_wire(old)) == old
    assert old.method_options() == {"bits": 4} and old.method().act_bits is None
    assert old.describe() == "qat 4-bit"
    assert Assignment("mqat", 4, bit_set=(2, 4)).describe() == "mqat {2,4}"
    # An old coordinator's body (no act fields at all) still parses.
    legacy = {"strategy": "mqat", "bits": 4, "bit_set": [2, 4], "per_layer_bits": None}
    parsed = Assignment.from_message(legacy)
    assert parsed.act_bits is None and parsed.act_bit_set is None
