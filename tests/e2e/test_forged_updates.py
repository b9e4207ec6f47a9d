"""A board inside the fleet sends forged updates: each is dropped with its reason, and the job
completes (against a real Mosquitto, with real agents)."""

from __future__ import annotations

import math
import threading
from pathlib import Path

import pytest
import torch

from bitfleet.protocol import (
    MqttTransport,
    Reassembler,
    Topics,
    encode_message,
    make_message,
    pack_state,
    parse_broker_url,
    split_payload,
    unpack_state,
)
from tests.e2e.test_fleet import FLEET, PART_SAMPLES, job, run_coordinator, start_agent, stop_all
from tests.tiny_fmnist import make_tiny_fmnist

State = dict[str, torch.Tensor]


@pytest.fixture
def tiny_data(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    folder = make_tiny_fmnist(tmp_path / "data", n_train=900, n_test=300)
    monkeypatch.setenv("BITFLEET_DATA_DIR", str(folder))
    return folder


def _forged(job_id: str, glob: State) -> list[tuple[str, bytes]]:
    """(reason, update payload) for a1 in round 1, one per rule, then two valid copies."""

    def update(state: State | bytes, rnd: int = 1, job: str = job_id) -> bytes:
        meta = {"round": rnd, "job_id": job, "n_samples": PART_SAMPLES, "train_loss": 1.0}
        blob = state if isinstance(state, bytes) else pack_state(state)
        [chunk] = split_payload(
            "update", make_message("update", {**meta, "train_seconds": 1.0}), blob
        )
        return chunk

    weight = "classifier.4.weight"
    nan = {**glob, weight: glob[weight].clone()}
    nan[weight][0, 0] = float("nan")
    return [
        ("non_finite", update(nan)),
        ("bad_shape", update({**glob, weight: glob[weight].t().contiguous()})),
        ("bad_dtype", update({**glob, weight: glob[weight].double()})),
        ("unknown_tensor", update({**glob, "backdoor": torch.zeros(1)})),
        ("missing_tensor", update({k: v for k, v in glob.items() if k != weight})),
        (
            "norm_outlier",
            update({k: v + 10 if v.is_floating_point() else v for k, v in glob.items()}),
        ),
        ("wrong_job", update(glob, job="someone-elses-job")),
        ("bad_tensors", update(b"not safetensors")),
        ("late_or_unexpected", update(glob, rnd=0)),
        ("valid", update(glob)),  # takes a1's slot (the broker's ACL is what prevents this) ...
        ("duplicate", update(glob)),  # ... so the same again is a duplicate
    ]


def test_forged_updates_are_dropped_with_their_reasons_and_the_job_completes(
    mosquitto, tiny_data, tmp_path: Path
) -> None:
    """A client without an ACL publishes on a1's topics at the start of round 1."""
    topics = Topics(fleet=FLEET)
    reassembler = Reassembler(max_bytes=2**24, max_chunks=16, timeout_s=60)
    forged: list[tuple[str, bytes]] = []
    data = {"n_samples": 1, "label_hist": [1]}
    sent = threading.Event()
    intruder: MqttTransport

    def on_task(topic: str, payload: bytes) -> None:
        done = reassembler.add(payload)
        if done is None:
            return
        if done.meta["round"] == 0:  # prepare while the agents train, strike at once in round 1
            forged.extend(_forged(done.meta["job_id"], unpack_state(done.blob)))
        elif done.meta["round"] == 1:
            for _, chunk in forged:
                intruder.publish(topics.update("a1"), chunk)
            imposter = {"device_id": "a9", "profile": {}, "data": data, "sent_at": 0.0}
            intruder.publish(topics.register("a1"), encode_message("register", imposter))
            sent.set()

    # a0's task goes out first in each round, before the agents start training
    intruder = MqttTransport(
        parse_broker_url(mosquitto.url),
        client_id="intruder",
        on_message=on_task,
        subscriptions=[topics.task("a0")],
    )
    intruder.start(timeout=10)
    agents = [start_agent(mosquitto.url, i, tmp_path) for i in range(3)]
    try:
        cfg = job(tmp_path)
        cfg["validation"] = {"mode": "reject", "min_history": 3}  # round 0's three norms
        coordinator, reports = run_coordinator(cfg, mosquitto.url)
    finally:
        intruder.stop()
        stop_all(agents)
    assert sent.is_set()
    assert [r.round for r in reports] == [0, 1]
    assert all(r.received == ["a0", "a1", "a2"] for r in reports)
    dropped = coordinator.dropped
    for reason in [r for r, _ in forged[:-2]] + ["bad_device_id"]:
        assert dropped.get(reason) == 1, (reason, dropped)
    # a1's own update arrives as a duplicate too if the round is still open by then
    assert dropped.get("duplicate") in (1, 2), dropped
    assert reports[0].dropped == {} and reports[1].dropped == dropped
    assert math.isfinite(reports[-1].train_loss) and reports[-1].acc_fp32 is not None
