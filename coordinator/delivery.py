"""The end of a job: every device's candidates scored and timed, the best one sent to it.

Each device's candidates are the variants of the final global model its onnxruntime loads
(`coordinator.candidates`): float, int8 with integer kernels, int8 weights, 4- and 2-bit packed
weights, FedMPQ's widths where it trained them. The coordinator scores each file's accuracy on
its held-out set, the device times each on itself, and `bitfleet.deploy.choose` takes the most
accurate one that meets the device's limits, ties going to the faster and then the smaller
(docs/export.md#deploy-candidates). The exporter is the one registered as
`bitfleet.exporters: onnx`, found through an entry point so the coordinator never imports it.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bitfleet.assignment import Assignment
from bitfleet.data import ImageData
from bitfleet.deploy import CANDIDATE_KINDS, CandidateScore, DeployChoice, choose
from bitfleet.protocol import Topics, make_message, split_payload
from bitfleet.registration import Registration

from .candidates import CandidateFile, CandidateSet, calibration_pixels, score_files
from .config import JobConfig
from .evaluation import HeldOut
from .global_model import GlobalModel

log = logging.getLogger(__name__)

EXPORT_ATTEMPTS = 2
"""Tries per device: a second one for a passing fault (a full disk freed, a broker blip)."""

Timings = Callable[[Mapping[str, Mapping[str, CandidateFile]]], Mapping[str, Mapping]]


@dataclass
class Delivery:
    """The end of a job per device: the file each device was sent, why each device that got
    none did not (the last attempt's error), and every device's candidates and choice."""

    files: dict[str, Path] = field(default_factory=dict)
    failed: dict[str, str] = field(default_factory=dict)
    choices: dict[str, DeployChoice] = field(default_factory=dict)


def export_and_deliver(
    cfg: JobConfig,
    model: GlobalModel,
    *,
    job_id: str,
    assignments: Mapping[str, Assignment],
    registrations: Mapping[str, Registration],
    data: ImageData,
    held_out: HeldOut,
    out_dir: Path,
    source_round: int | None,
    timings: Timings,
    transport: Any,
    topics: Topics,
) -> Delivery:
    """Choose and send every assigned device's model; files go into `out_dir`.

    `held_out` holds the coordinator's validation split, on which the candidates are scored
    and chosen, and its test split, whose scores only report (docs/round.md#validation).
    `timings(files by device)` has the devices time their candidates and returns what they
    answered. One device's failure, whatever it is, costs that device a second attempt and
    then its model, never another device's: the reason is kept in the result.
    """
    candidates = CandidateSet(
        cfg,
        model,
        model.state,
        calibration_pixels(data),
        out_dir,
        {
            "source_round": source_round,
            "job_id": job_id,
            "class_labels": list(model.spec.class_names),
        },
    )
    delivery = Delivery()
    devices = [d for d in sorted(assignments) if d in registrations]
    files: dict[str, dict[str, CandidateFile]] = {}
    for device in devices:
        got, failed = candidates.for_device(cfg, registrations[device], assignments[device])
        if got:
            files[device] = got
        else:
            delivery.failed[device] = "no candidate exported: " + "; ".join(failed.values())
    every_file = [f for fs in files.values() for f in fs.values()]
    accuracy = score_files(every_file, *held_out.validation)
    test_accuracy = score_files(every_file, *held_out.test)
    timed = timings(files)
    for device, fs in files.items():
        answered = timed.get(device, {})
        scores = []
        for name, f in fs.items():
            t = answered.get(name)
            scores.append(
                CandidateScore(
                    name,
                    f.bytes,
                    accuracy[f.path],
                    None if t is None else t.latency_ms,
                    None if t is None else t.memory_bytes,
                    test_accuracy[f.path],
                )
            )
        choice = choose(scores, registrations[device].limits)
        delivery.choices[device] = choice
        log.info("%s: %s (%s)", device, choice.chosen, choice.reason)
        chosen = fs[choice.chosen]
        for attempt in range(1, EXPORT_ATTEMPTS + 1):
            try:
                _send(chosen, device, assignments[device], job_id, transport, topics)
                delivery.files[device] = chosen.path
                delivery.failed.pop(device, None)
                break
            except Exception as exc:  # noqa: BLE001 - any fault of one device's model stays its own
                why = f"{type(exc).__name__}: {exc}"
                log.error(
                    "model for %s failed (attempt %d/%d): %s", device, attempt, EXPORT_ATTEMPTS, why
                )
                delivery.failed[device] = why
    return delivery


def _send(
    f: CandidateFile,
    device: str,
    assignment: Assignment,
    job_id: str,
    transport: Any,
    topics: Topics,
) -> None:
    bits = f.bits
    meta = {
        "job_id": job_id,
        "bits": bits if isinstance(bits, int) else max(bits.values()),
        "per_layer_bits": bits if isinstance(bits, dict) else None,
        "storage": "float" if CANDIDATE_KINDS[f.name].bits == 32 else f.storage,
        "filename": f"{job_id}-{f.path.name}",
        "candidate": f.name,
        "strategy": assignment.strategy,
    }
    chunks = split_payload("model", make_message("model", meta), f.path.read_bytes())
    transport.publish_many(topics.model(device), chunks)
    log.info("sent %s its model %s", device, f.path.name)


def choices_json(choices: Mapping[str, DeployChoice]) -> str:
    """The choices as the store keeps them (meta `deploy_choices`)."""
    return json.dumps({d: c.to_dict() for d, c in choices.items()})
