"""The end of a job: one device's failed export costs it a retry and then its model, never
another device's (docs/round.md#the-end-export-and-model-delivery)."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch

from bitfleet.assignment import Assignment
from bitfleet.data import ImageData
from bitfleet.data.specs import DATASET_SPECS
from bitfleet.protocol import Topics
from bitfleet.runtime_facts import RuntimeFacts
from coordinator import delivery
from coordinator.config import job_config_from_dict
from coordinator.global_model import GlobalModel
from tests.fleet_values import registration


class Recorder:
    def __init__(self) -> None:
        self.sent: dict[str, int] = {}

    def publish_many(self, topic: str, chunks: list[bytes]) -> None:
        self.sent[topic] = len(chunks)


TOPICS = Topics(fleet="t")


def _deliver(
    deploy: dict[str, Any], regs: dict[str, Any], bits: int, out: Path, transport: Recorder
) -> delivery.Delivery:
    """The end of a job with `[deploy]` settings for these registrations, all at `bits`."""
    cfg = job_config_from_dict({"deploy": deploy}, source="test")
    spec = DATASET_SPECS["fashion-mnist"]
    x = torch.zeros(8, 1, 28, 28, dtype=torch.uint8)
    y = torch.zeros(8, dtype=torch.int64)
    return delivery.export_and_deliver(
        cfg,
        GlobalModel(cfg, spec),
        job_id="j",
        assignments=dict.fromkeys(regs, Assignment("qat", bits, deploy_bits=bits)),
        registrations=regs,
        data=ImageData(x, y, x, y, spec),
        out_dir=out,
        source_round=0,
        accuracy={},
        transport=transport,
        topics=TOPICS,
    )


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
    regs = {"pi4": registration("pi4", board="rpi4"), "srv": registration("srv")}
    assert {r.board.preferred_storage for r in regs.values()} == {"packed", "int8"}
    transport = Recorder()
    result = _deliver({"bits": [8, 4]}, regs, 4, tmp_path, transport)
    assert set(result.files) == {"srv"} and result.files["srv"].exists()
    assert result.failed == {"pi4": "OSError: No space left on device"}
    assert calls.count("packed") == delivery.EXPORT_ATTEMPTS == 2
    assert set(transport.sent) == {TOPICS.model("srv")}


def test_each_device_gets_a_file_its_runtime_loads(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A board on onnxruntime 1.20 (opset 21) gets its 2-bit weights exported for opset 21;
    boards on newer runtimes, or that did not say, share the newest file."""
    asked: dict[str, int] = {}

    def exporter(model: Any, path: Path, shape: Any, *, max_opset: int, **_: Any) -> Any:
        asked[path.name] = max_opset
        path.write_bytes(b"onnx")
        return SimpleNamespace(path=path)

    monkeypatch.setattr(delivery.plugins, "load", lambda group, name: exporter)
    old = replace(registration("old"), runtime=RuntimeFacts("1.20.1", 21))
    new = replace(registration("new"), runtime=RuntimeFacts("1.32.0", 28))
    regs = {"old": old, "new": new, "silent": registration("silent")}
    result = _deliver({"bits": [8, 2], "storage": "packed"}, regs, 2, tmp_path, Recorder())
    assert asked == {"lenet5-2bit-packed.onnx": 25, "lenet5-2bit-packed-opset21.onnx": 21}
    assert result.files["new"] == result.files["silent"] != result.files["old"]
