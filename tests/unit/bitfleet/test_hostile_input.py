"""What a hostile board can put in a message or an upload, refused at the door: numbers out of
range in every field of every message, registrations that lie, and uploads that would hoard
the coordinator's memory (docs/security.md#threat-model)."""

from __future__ import annotations

import json
from typing import Any

import pytest

from bitfleet.profiles import load_profiles
from bitfleet.protocol import ProtocolError, Reassembler, decode_message, split_payload
from bitfleet.protocol.messages import MAX_INT
from bitfleet.registration import DataSummary, Registration
from fleet.hostile_board import numeric_paths, replaced

VALID: dict[str, dict[str, Any]] = {
    "register": {
        "device_id": "d0",
        "profile": {},
        "data": {"n_samples": 20, "label_hist": [10, 10]},
        "sent_at": 1.7e9,
    },
    "assign": {
        "device_id": "d0",
        "strategy": "qat",
        "bits": 4,
        "per_layer_bits": {"conv1": 4},
        "job": {
            "model": "lenet5",
            "dataset": "fashion-mnist",
            "batch_size": 32,
            "local_epochs": 1.0,
            "lr": 0.001,
            "optimizer": "adam",
        },
    },
    "task": {"round": 3, "job_id": "j", "local_epochs": 1.0, "deadline_s": 60.0, "trial": 1},
    "update": {
        "round": 3,
        "job_id": "j",
        "n_samples": 20,
        "train_loss": 0.5,
        "train_seconds": 2.0,
        "board_seconds": 4.0,
        "trial": 1,
    },
    "status": {"device_id": "d0", "online": True},
    "model": {"job_id": "j", "bits": 4, "storage": "int8", "filename": "m.onnx"},
}


def _with(body: dict[str, Any], path: tuple, value: Any) -> dict[str, Any]:
    return replaced(body, [path], value)


def _encode(kind: str, body: dict[str, Any]) -> bytes:
    return json.dumps({"v": 1, "type": kind, **body}).encode()  # allow_nan: as a liar would


CASES = [
    (kind, path, bad)
    for kind, body in VALID.items()
    for path in numeric_paths(body)
    for bad in (2**63, -(2**63), float("nan"), float("inf"), 1e300)
]


@pytest.mark.parametrize("kind", list(VALID))
def test_the_valid_examples_decode(kind: str) -> None:
    assert decode_message(_encode(kind, VALID[kind]), kind)["type"] == kind


@pytest.mark.parametrize(("kind", "path", "bad"), CASES)
def test_every_numeric_field_of_every_message_has_a_range(kind: str, path: tuple, bad) -> None:
    with pytest.raises(ProtocolError) as info:
        decode_message(_encode(kind, _with(VALID[kind], path, bad)), kind)
    assert info.value.reason in ("bad_value", "bad_type"), info.value


def test_integers_beyond_json_doubles_are_refused_even_where_they_would_fit_64_bits() -> None:
    body = _with(VALID["update"], ("n_samples",), MAX_INT + 1)
    with pytest.raises(ProtocolError, match="outside"):
        decode_message(_encode("update", body), "update")


# -- registrations --


def _board() -> dict[str, Any]:
    return load_profiles()["rpi4"].to_dict()


def _register(**changes: Any) -> dict[str, Any]:
    profile = {"board": _board(), "step_times": {"t_fp": 0.05, "t_qat": 0.07}}
    data = {"n_samples": 20, "label_hist": [10, 10]}
    body = {"device_id": "d0", "profile": profile, "data": data, "sent_at": 0.0}
    for path, value in changes.items():
        body = _with(body, tuple(path.split("__")), value)
    return body


def test_an_honest_registration_reads() -> None:
    reg = Registration.from_message(_register(), num_classes=2, max_samples=60000)
    assert reg.data == DataSummary(20, (10, 10))
    assert reg.step_times is not None and reg.step_times.t_fp == 0.05


@pytest.mark.parametrize(
    ("changes", "why"),
    [
        ({"profile__board__preferred_storage": "zip"}, "preferred_storage"),
        ({"profile__board__deploy_bits": 7}, "deploy_bits"),
        ({"profile__board__relative_speed": 2.0**63}, "relative_speed"),
        ({"profile__board__link_mbps": 1e300}, "link_mbps"),
        ({"profile__board__cores": 2**63}, "cores"),
        ({"profile__board": {}}, "missing"),
        ({"profile": {}}, "board must be a table"),
        ({"profile__step_times__t_fp": 2.0**63}, "t_fp"),
        ({"profile__qat_overhead": 1e9}, "qat_overhead"),
        ({"data__n_samples": 10**12, "data__label_hist": [10**12, 0]}, "data set"),
        ({"data__n_samples": 21}, "label_hist counts 20"),
        ({"data__label_fit": {"family": "zipf", "params": {}, "n_samples": 0}}, "label_fit"),
    ],
)
def test_a_lying_registration_is_refused_naming_the_field(changes: dict, why: str) -> None:
    with pytest.raises(ProtocolError, match=why) as info:
        Registration.from_message(_register(**changes), num_classes=2, max_samples=60000)
    assert info.value.reason == "bad_register"


def test_the_sample_bound_is_the_data_sets() -> None:
    body = _register(data__n_samples=70000, data__label_hist=[35000, 35000])
    assert Registration.from_message(body, num_classes=2).data.n_samples == 70000
    with pytest.raises(ProtocolError, match="more than the data set's 60000"):
        Registration.from_message(body, num_classes=2, max_samples=60000)


# -- reassembly quotas --


def _upload(size: int, round: int = 0, count: int | None = None) -> list[bytes]:
    chunk = max(1, size // (count or 1))
    return split_payload("update", {"round": round}, b"x" * size, chunk_size=chunk)


def _quota_reassembler(**kw: Any) -> Reassembler:
    opts = dict(max_bytes=1000, max_chunks=100, timeout_s=60, max_source_bytes=2000)
    return Reassembler(**(opts | kw), slot_of=lambda meta: meta.get("round"))


def test_a_flood_of_first_chunks_evicts_only_its_senders_uploads() -> None:
    r = _quota_reassembler(max_partial=64)
    honest = {f"h{i}": _upload(900, count=3) for i in range(3)}
    for name, chunks in honest.items():
        r.add(chunks[0], source=name)
    for i in range(5000):  # each a new upload, declared at the most an update can be
        r.add(_upload(900, round=i, count=3)[0], source="hostile")
    assert r.evicted == {"hostile": 4998}
    done = [r.add(c, source=name) for name, chunks in honest.items() for c in chunks[1:]]
    assert sorted(p.source for p in done if p is not None) == ["h0", "h1", "h2"]


def test_a_declared_size_over_an_updates_is_refused_at_the_first_chunk() -> None:
    r = _quota_reassembler()
    with pytest.raises(ProtocolError, match="limit 1000"):
        r.add(_upload(1001, count=2)[0], source="hostile")
    assert r.pending == 0


def test_a_new_upload_for_the_same_round_replaces_the_old_one() -> None:
    r = _quota_reassembler()
    first, again = _upload(600, count=3), _upload(600, count=3)
    r.add(first[0], source="d")
    r.add(again[0], source="d")
    assert r.pending == 1 and r.evicted == {"d": 1}
    assert [r.add(c, source="d") for c in again[1:]][-1] is not None


def test_the_per_source_byte_quota_holds_with_several_rounds_in_flight() -> None:
    r = _quota_reassembler()
    for rnd in range(3):
        r.add(_upload(900, round=rnd, count=3)[0], source="d")
    assert r.pending == 2 and r.evicted == {"d": 1}  # 3 x 900 > 2000: the oldest went


def test_when_the_table_is_full_the_heaviest_sender_pays() -> None:
    r = _quota_reassembler(max_partial=4, max_source_bytes=4000)
    r.add(_upload(900, count=3)[0], source="honest")
    for rnd in range(3):
        r.add(_upload(900, round=rnd, count=3)[0], source="greedy")
    r.add(_upload(100, count=2)[0], source="newcomer")
    assert r.evicted == {"greedy": 1}
