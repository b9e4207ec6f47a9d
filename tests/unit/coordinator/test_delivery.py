"""The end of a job: every device's candidates exported, scored, timed, and the best one sent;
one device's failure costs it a retry and then its model, never another device's
(docs/export.md#deploy-candidates, docs/round.md#the-end-export-and-model-delivery)."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from bitfleet import plugins
from bitfleet.assignment import Assignment
from bitfleet.data import ImageData, carve_validation
from bitfleet.data.specs import DATASET_SPECS
from bitfleet.deploy import CandidateTiming, DeployLimits
from bitfleet.protocol import Topics
from bitfleet.protocol.chunks import Reassembler
from bitfleet.runtime_facts import RuntimeFacts
from coordinator import candidates, delivery
from coordinator.config import job_config_from_dict
from coordinator.evaluation import HeldOut
from coordinator.global_model import GlobalModel
from tests.fleet_values import registration


class Recorder:
    def __init__(self, fail: set[str] = frozenset()) -> None:  # type: ignore[assignment]
        self.models: dict[str, dict] = {}
        self.fail = fail

    def publish_many(self, topic: str, chunks: list[bytes]) -> None:
        if any(topic.endswith(f"/{d}") for d in self.fail):
            raise ConnectionError("broker gone")
        done = None
        r = Reassembler(max_bytes=2**24, max_chunks=64, timeout_s=60)
        for c in chunks:
            done = r.add(c, source="x") or done
        assert done is not None
        self.models[topic] = done.meta


TOPICS = Topics(fleet="t")


def _deliver(
    deploy: dict[str, Any],
    regs: dict[str, Any],
    out: Path,
    transport: Recorder,
    timings: Any = lambda files: {},
) -> delivery.Delivery:
    cfg = job_config_from_dict({"deploy": deploy}, source="test")
    spec = DATASET_SPECS["fashion-mnist"]
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 255, (64, 1, 28, 28), dtype=torch.uint8, generator=g)
    y = torch.randint(0, 10, (64,), generator=g)
    held = (x.float().div(255).numpy(), y.numpy())
    return delivery.export_and_deliver(
        cfg,
        GlobalModel(cfg, spec),
        job_id="j",
        assignments=dict.fromkeys(regs, Assignment("qat", 4, deploy_bits=8)),
        registrations=regs,
        data=carve_validation(ImageData(x, y, x, y, spec), 0.25),
        held_out=HeldOut(held, held),
        out_dir=out,
        source_round=0,
        timings=timings,
        transport=transport,
        topics=TOPICS,
    )


def test_a_failing_variant_costs_only_itself_and_a_failing_send_only_its_device(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = plugins.load("bitfleet.exporters", "onnx")

    def exporter(model: Any, path: Path, shape: Any, *, storage: str, **kw: Any) -> Any:
        if storage == "packed":
            raise OSError("No space left on device")
        return real(model, path, shape, storage=storage, **kw)

    monkeypatch.setattr(candidates.plugins, "load", lambda group, name: exporter)
    regs = {"pi4": registration("pi4", board="rpi4"), "srv": registration("srv")}
    transport = Recorder(fail={"pi4"})
    result = _deliver({"bits": [8, 4]}, regs, tmp_path, transport)
    assert set(result.files) == {"srv"} and result.files["srv"].exists()
    assert result.failed == {"pi4": "ConnectionError: broker gone"}
    names = {c.name for c in result.choices["srv"].candidates}
    assert names == {"fp32", "int8-qdq", "int8-weights"}  # int4 failed to export, alone
    assert set(transport.models) == {TOPICS.model("srv")}


def test_limits_and_timings_decide_and_each_runtime_gets_its_opset(tmp_path: Path) -> None:
    old = replace(registration("old"), runtime=RuntimeFacts("1.20.1", 21))
    small = replace(registration("small"), limits=DeployLimits(max_model_bytes=40 * 1024))
    fast = replace(registration("fast"), limits=DeployLimits(max_latency_ms=1.0))
    regs = {"old": old, "small": small, "fast": fast, "silent": registration("silent")}

    def timings(files: dict[str, dict]) -> dict[str, dict[str, CandidateTiming]]:
        # "fast" measured only int8-qdq under its limit: the others break it
        return {
            "fast": {
                n: CandidateTiming(n, 0.5 if n == "int8-qdq" else 3.0, 0) for n in files["fast"]
            }
        }

    transport = Recorder()
    result = _deliver({"bits": [8, 4, 2]}, regs, tmp_path, transport, timings)
    assert result.choices["small"].chosen == "int4"
    assert result.choices["fast"].chosen == "int8-qdq"
    for dev in ("old", "silent"):  # no limit: never fewer than 8 bits
        assert result.choices[dev].chosen in {"fp32", "int8-qdq", "int8-weights"}
    assert "opset21" in result.files["old"].name
    assert "opset21" not in result.files["silent"].name
    scored = {c.name: c.accuracy for c in result.choices["silent"].candidates}
    assert all(0.0 <= a <= 1.0 for a in scored.values()) and len(scored) == 5
    meta = transport.models[TOPICS.model("small")]
    assert meta["candidate"] == "int4" and meta["bits"] == 4
    assert np.isclose(
        result.choices["small"].score("int4").bytes, result.files["small"].stat().st_size
    )
