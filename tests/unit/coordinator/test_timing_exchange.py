"""The candidate exchange: timings are taken only while an exchange of their phase is open,
from the device whose topic they came on, and an exchange waits only for what it sent."""

from __future__ import annotations

import threading
from pathlib import Path

from bitfleet.protocol import Topics, encode_message
from coordinator.candidates import CandidateFile, exchange_timings
from coordinator.intake import Intake
from coordinator.state import StateStore

TOPICS = Topics(fleet="t")


def _timing(device: str, name: str, phase: str = "final", ms: float = 1.5) -> bytes:
    return encode_message(
        "timing",
        {
            "device_id": device,
            "job_id": "j",
            "name": name,
            "phase": phase,
            "latency_ms": ms,
            "memory_bytes": 1000,
            "source": "measured",
        },
    )


def _intake(tmp_path: Path) -> Intake:
    store = StateStore(tmp_path / "s.sqlite")
    return Intake(TOPICS, store, job_id="j", num_classes=10, update_bytes=1000,
                  on_register=lambda reg: None)  # fmt: skip


class Board:
    """A transport whose devices answer each candidate they are sent, through the intake."""

    def __init__(self, intake: Intake, answer: dict[str, float]) -> None:
        self.intake = intake
        self.answer = answer
        self.sent: list[str] = []

    def publish_many(self, topic: str, chunks: list[bytes]) -> None:
        device = topic.rsplit("/", 1)[1]
        self.sent.append(device)
        if device in self.answer:
            for name in ("a", "b"):
                t = TOPICS.timing(device)
                threading.Thread(
                    target=self.intake.on_message, args=(t, _timing(device, name))
                ).start()


def test_timings_outside_an_exchange_or_for_another_device_are_dropped(tmp_path: Path) -> None:
    intake = _intake(tmp_path)
    intake.on_message(TOPICS.timing("d1"), _timing("d1", "a"))
    assert intake.dropped == {"unexpected_timing": 1} and intake.timings.empty()
    intake.timing_phase = "final"
    intake.on_message(TOPICS.timing("d1"), _timing("d2", "a"))
    intake.on_message(TOPICS.timing("d1"), _timing("d1", "a", phase="plan"))
    assert intake.dropped == {"unexpected_timing": 2, "bad_device_id": 1}
    intake.on_message(TOPICS.timing("d1"), _timing("d1", "a"))
    report = intake.timings.get_nowait()
    assert (report.device, report.timing.name, report.timing.latency_ms) == ("d1", "a", 1.5)


def test_an_exchange_collects_what_it_sent_and_gives_up_on_the_silent(tmp_path: Path) -> None:
    intake = _intake(tmp_path)
    f = tmp_path / "m.onnx"
    f.write_bytes(b"x" * 100)
    files = {n: CandidateFile(n, 8, 25, f) for n in ("a", "b")}
    board = Board(intake, {"d1": 1.5})
    got = exchange_timings(
        board, TOPICS, intake, job_id="j", phase="final",
        wanted={"d1": files, "d2": files}, timeout_s=1.0,
    )  # fmt: skip
    assert set(got["d1"]) == {"a", "b"} and got["d2"] == {}
    assert board.sent.count("d1") == 2 and board.sent.count("d2") == 2
    assert intake.timing_phase is None  # closed again: late answers are dropped
    intake.on_message(TOPICS.timing("d2"), _timing("d2", "a"))
    assert intake.dropped.get("unexpected_timing") == 1
