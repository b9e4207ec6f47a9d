"""The end of a job: one device's failed export costs it a retry and then its model, never
another device's (docs/round.md#the-end-export-and-model-delivery)."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch

from bitfleet.assignment import Assignment
from bitfleet.data import ImageData
from bitfleet.data.specs import DATASET_SPECS
from bitfleet.protocol import Topics
from coordinator import delivery
from coordinator.config import job_config_from_dict
from coordinator.global_model import GlobalModel
from tests.fleet_values import registration


class Recorder:
    def __init__(self) -> None:
        self.sent: dict[str, int] = {}

    def publish_many(self, topic: str, chunks: list[bytes]) -> None:
        self.sent[topic] = len(chunks)


def test_a_failing_export_is_retried_and_fails_alone(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[str] = []

    def exporter(model: Any, path: Path, shape: Any, *, storage: str, **_: Any) -> Any:
        calls.append(storage)
        if storage == "packed":
            raise OSError("No space left on device")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"onnx")
        return SimpleNamespace(path=path)

    monkeypatch.setattr(delivery.plugins, "load", lambda group, name: exporter)
    cfg = job_config_from_dict({"deploy": {"bits": [8, 4]}}, source="test")
    spec = DATASET_SPECS["fashion-mnist"]
    x = torch.zeros(8, 1, 28, 28, dtype=torch.uint8)
    y = torch.zeros(8, dtype=torch.int64)
    regs = {"pi4": registration("pi4", board="rpi4"), "srv": registration("srv")}
    assert {r.board.preferred_storage for r in regs.values()} == {"packed", "int8"}
    transport, topics = Recorder(), Topics(fleet="t")
    result = delivery.export_and_deliver(
        cfg,
        GlobalModel(cfg, spec),
        job_id="j",
        assignments=dict.fromkeys(regs, Assignment("qat", 4, deploy_bits=4)),
        registrations=regs,
        data=ImageData(x, y, x, y, spec),
        out_dir=tmp_path,
        source_round=0,
        accuracy={},
        transport=transport,
        topics=topics,
    )
    assert set(result.files) == {"srv"} and result.files["srv"].exists()
    assert result.failed == {"pi4": "OSError: No space left on device"}
    assert calls.count("packed") == delivery.EXPORT_ATTEMPTS == 2
    assert set(transport.sent) == {topics.model("srv")}
