"""The end of a job: one quantized ONNX model per device, exported and sent to it.

Each device's model is the global model deployed at the width its assignment names (its
FedMPQ layer bits, else its deploy width) in the storage its board wants, written by the
exporter registered as `bitfleet.exporters: onnx` (the export role, found through an entry
point so the coordinator never imports it). Devices that want the same file share one export;
its metadata names the strategy the device trained with (docs/export.md).
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bitfleet import plugins
from bitfleet.assignment import Assignment
from bitfleet.data import ImageData
from bitfleet.protocol import Topics, make_message, split_payload
from bitfleet.registration import Registration
from bitfleet.runtime_facts import OPSET_INT2

from .config import JobConfig
from .global_model import GlobalModel

log = logging.getLogger(__name__)

EXPORT_CALIB_SAMPLES = 256
"""Training images that calibrate the exported models' activation ranges."""

EXPORT_ATTEMPTS = 2
"""Tries per device: a second one for a passing fault (a full disk freed, a broker blip)."""


@dataclass
class Delivery:
    """The end of a job per device: the file each device was sent, and why each device that
    got none did not (the last attempt's error)."""

    files: dict[str, Path] = field(default_factory=dict)
    failed: dict[str, str] = field(default_factory=dict)


def deploy_storage(cfg: JobConfig, reg: Registration) -> str:
    """How a device's sub-8-bit weights are stored: `[deploy] storage`, where `auto` (the
    default) lets the board's profile decide (int8 kernels for speed, packed for size)."""
    storage = cfg.deploy.storage
    return reg.board.preferred_storage if storage == "auto" else storage


def max_opset(reg: Registration) -> int:
    """The newest opset a device's file may use: what its onnxruntime loads, where it said;
    beyond `OPSET_INT2` nothing the exporter writes changes, so files are shared above it."""
    return OPSET_INT2 if reg.runtime is None else min(reg.runtime.max_opset, OPSET_INT2)


def _tag(bits: int | dict[str, int]) -> str:
    if isinstance(bits, dict):  # FedMPQ: per-layer bits, named by their digest
        digest = hashlib.sha256(json.dumps(bits, sort_keys=True).encode()).hexdigest()
        return f"mixed{sum(bits.values()) / len(bits):.1f}-{digest[:6]}"
    return f"{bits}bit"


def export_and_deliver(
    cfg: JobConfig,
    model: GlobalModel,
    *,
    job_id: str,
    assignments: Mapping[str, Assignment],
    registrations: Mapping[str, Registration],
    data: ImageData,
    out_dir: Path,
    source_round: int | None,
    accuracy: Mapping[str, float],
    transport: Any,
    topics: Topics,
) -> Delivery:
    """Export every assigned device's model into `out_dir` and publish it on its model topic.

    `accuracy` is the last round's PyTorch accuracy per deploy width, recorded in the files.
    One device's failure, whatever it is, costs that device a second attempt and then its
    model, never another device's: the reason is kept in the returned `Delivery`.
    """
    exporter = plugins.load("bitfleet.exporters", "onnx")
    spec = model.spec
    calib = data.train_x[:EXPORT_CALIB_SAMPLES].float().div(255).numpy()
    shape = (spec.in_channels, spec.image_size, spec.image_size)
    files: dict[tuple[str, str, str, int], Path] = {}
    delivery = Delivery()
    # Names carry the strategy only where the fleet mixes them (FedHQ, random hybrid).
    mixed = len({a.strategy for a in assignments.values()}) > 1

    def deliver(device: str, assignment: Assignment, bits: int | dict[str, int]) -> Path:
        storage = deploy_storage(cfg, registrations[device])
        opset = max_opset(registrations[device])
        key = (assignment.strategy, _tag(bits), storage, opset)
        if key not in files:
            parts = [cfg.model.name, *([assignment.strategy] if mixed else []), *key[1:3]]
            if opset < OPSET_INT2:  # another container than the newest runtimes get
                parts.append(f"opset{opset}")
            name = "-".join(parts) + ".onnx"
            files[key] = exporter(
                model.deployed(model.state, bits),
                out_dir / name,
                shape,
                storage=storage,
                activations=storage == "int8",
                calib=calib,
                max_opset=opset,
                metadata={
                    "strategy": assignment.strategy,
                    "source_round": source_round,
                    "job_id": job_id,
                    "accuracy_pytorch": accuracy.get(str(bits)),
                    "class_labels": list(spec.class_names),
                },
            ).path
        path = files[key]
        meta = {
            "job_id": job_id,
            "bits": bits if isinstance(bits, int) else max(bits.values()),
            "per_layer_bits": bits if isinstance(bits, dict) else None,
            "storage": storage,
            "filename": f"{job_id}-{path.name}",
        }
        chunks = split_payload("model", make_message("model", meta), path.read_bytes())
        transport.publish_many(topics.model(device), chunks)
        log.info("sent %s its model %s", device, path.name)
        return path

    for device in sorted(assignments):
        assignment = assignments[device]
        bits = assignment.final_bits()
        if bits is None or device not in registrations:
            continue
        for attempt in range(1, EXPORT_ATTEMPTS + 1):
            try:
                delivery.files[device] = deliver(device, assignment, bits)
                delivery.failed.pop(device, None)
                break
            except Exception as exc:  # noqa: BLE001 - any fault of one device's model stays its own
                why = f"{type(exc).__name__}: {exc}"
                log.error(
                    "model for %s failed (attempt %d/%d): %s", device, attempt, EXPORT_ATTEMPTS, why
                )
                delivery.failed[device] = why
    return delivery
