"""Deploy candidates on the coordinator's side: export them, score them, have boards time them
(docs/export.md#deploy-candidates).

A device's candidates are the variants of one model state its onnxruntime loads
(`bitfleet.deploy.candidate_kinds` at its newest opset). Files are exported once per
(variant, widths, opset) and shared by every device that can load them; the coordinator scores
each file's accuracy in onnxruntime on its held-out set, and sends each device its files to
time (`candidate` messages, answered by `timing` messages). The same exchange runs twice: on
the initial model, so the widths the fleet deploys at are known before training
(`plan_widths`), and on the final one, where `coordinator.delivery` chooses.
"""

from __future__ import annotations

import hashlib
import json
import logging
import queue
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from bitfleet import plugins
from bitfleet.assignment import Assignment
from bitfleet.data import ImageData
from bitfleet.data.validation import calibration_images
from bitfleet.deploy import CANDIDATE_KINDS, CandidateTiming, candidate_kinds, planned_width
from bitfleet.protocol import Topics, make_message, split_payload
from bitfleet.registration import Registration
from bitfleet.runtime_facts import OPSET_INT2

from .config import JobConfig
from .global_model import GlobalModel, StateDict
from .intake import Intake

log = logging.getLogger(__name__)

Bits = int | dict[str, int]


def max_opset(reg: Registration) -> int:
    """The newest opset a device's file may use: what its onnxruntime loads, where it said;
    beyond `OPSET_INT2` nothing the exporter writes changes, so files are shared above it."""
    return OPSET_INT2 if reg.runtime is None else min(reg.runtime.max_opset, OPSET_INT2)


def bits_tag(bits: Bits) -> str:
    """A file-name part for a width or FedMPQ's per-layer widths (named by their digest)."""
    if isinstance(bits, dict):
        digest = hashlib.sha256(json.dumps(bits, sort_keys=True).encode()).hexdigest()
        return f"mixed{sum(bits.values()) / len(bits):.1f}-{digest[:6]}"
    return "fp32" if bits >= 32 else f"{bits}bit"


@dataclass(frozen=True)
class CandidateFile:
    """One exported candidate."""

    name: str
    bits: Bits
    opset: int
    path: Path

    @property
    def bytes(self) -> int:
        return self.path.stat().st_size

    @property
    def storage(self) -> str:
        return CANDIDATE_KINDS[self.name].storage


def device_candidates(cfg: JobConfig, assignment: Assignment | None) -> list[tuple[str, Bits]]:
    """A device's candidate variants and the widths each deploys at: the job's `[deploy] bits`
    (and its storage choice), plus FedMPQ's per-layer widths where the device trained them."""
    layers = assignment.per_layer_bits if assignment is not None else None
    names = candidate_kinds(cfg.deploy.bits, cfg.deploy.storage, mixed=bool(layers))
    return [(n, dict(layers) if n == "mixed" and layers else CANDIDATE_KINDS[n].weight_bits)
            for n in names]  # fmt: skip


class CandidateSet:
    """The candidate files of one model state, exported on first use and shared."""

    def __init__(
        self,
        cfg: JobConfig,
        model: GlobalModel,
        state: StateDict,
        calib: np.ndarray,
        out_dir: Path,
        metadata: Mapping[str, Any],
    ) -> None:
        self.cfg = cfg
        self.model = model
        self.state = state
        self.calib = calib
        self.out_dir = out_dir
        self.metadata = dict(metadata)
        self._exporter = plugins.load("bitfleet.exporters", "onnx")
        self._files: dict[tuple[str, str, int], CandidateFile] = {}

    def file(self, name: str, bits: Bits, opset: int) -> CandidateFile:
        key = (name, bits_tag(bits), opset)
        if key not in self._files:
            kind = CANDIDATE_KINDS[name]
            spec = self.model.spec
            parts = [self.cfg.model.name, name if name != "mixed" else bits_tag(bits)]
            if opset < OPSET_INT2:  # another container than the newest runtimes get
                parts.append(f"opset{opset}")
            result = self._exporter(
                self.model.deployed(self.state, bits),
                self.out_dir / ("-".join(parts) + ".onnx"),
                (spec.in_channels, spec.image_size, spec.image_size),
                storage=kind.storage,
                activations=kind.activations,
                calib=self.calib,
                max_opset=opset,
                metadata={**self.metadata, "candidate": name},
            )
            self._files[key] = CandidateFile(name, bits, opset, result.path)
        return self._files[key]

    def for_device(
        self, cfg: JobConfig, reg: Registration, assignment: Assignment | None
    ) -> tuple[dict[str, CandidateFile], dict[str, str]]:
        """The device's candidate files by name, and the variants that failed to export."""
        files, failed = {}, {}
        for name, bits in device_candidates(cfg, assignment):
            try:
                files[name] = self.file(name, bits, max_opset(reg))
            except Exception as exc:  # noqa: BLE001 - one variant's failure costs only it
                failed[name] = f"{type(exc).__name__}: {exc}"
                log.error("candidate %s for %s did not export: %s", name, reg.device_id, exc)
        return files, failed


def calibration_pixels(data: ImageData) -> np.ndarray:
    """The exporter's activation calibration images (`calibration_images`), as [0, 1]
    floats."""
    return calibration_images(data).float().div(255).numpy()


def score_files(files: Sequence[CandidateFile], x: np.ndarray, y: np.ndarray) -> dict[Path, float]:
    """Each file's accuracy in onnxruntime on the held-out `x` ([0, 1] pixels), labels `y`."""
    from bitfleet.onnx_session import run_batches, session

    out = {}
    for f in {f.path: f for f in files}.values():
        logits = run_batches(session(str(f.path)), x)
        out[f.path] = float((logits.argmax(1) == y).mean())
    return out


def exchange_timings(
    transport: Any,
    topics: Topics,
    intake: Intake,
    *,
    job_id: str,
    phase: str,
    wanted: Mapping[str, Mapping[str, CandidateFile]],
    timeout_s: float,
    stop: threading.Event | None = None,
) -> dict[str, dict[str, CandidateTiming]]:
    """Send every device in `wanted` its candidate files and wait, up to `timeout_s`, for
    its timings. A device that does not answer (an old agent, a file its runtime refuses, a
    lost message) is left out of the answer: the choice then goes without its timings."""
    got: dict[str, dict[str, CandidateTiming]] = {d: {} for d in wanted}
    with intake.timing_exchange(phase):
        for device, files in wanted.items():
            for name, f in files.items():
                meta = make_message("candidate", {"job_id": job_id, "name": name, "phase": phase})
                transport.publish_many(
                    topics.candidate(device), split_payload("candidate", meta, f.path.read_bytes())
                )
        missing = sum(len(files) for files in wanted.values())
        deadline = time.monotonic() + timeout_s
        while missing and time.monotonic() < deadline and not (stop is not None and stop.is_set()):
            try:
                report = intake.timings.get(timeout=0.2)
            except queue.Empty:
                continue
            if report.timing.name not in wanted.get(report.device, {}):
                continue  # the intake took only this phase's; this one was not asked for
            if report.timing.name not in got[report.device]:
                missing -= 1
            got[report.device][report.timing.name] = report.timing
        if missing:
            silent = sorted(d for d, files in wanted.items() if len(got[d]) < len(files))
            log.warning("%s timings: no answer within %.0f s from %s", phase, timeout_s, silent)
    return got


@dataclass(frozen=True)
class WidthPlan:
    """The width a device deploys at, planned before training, and why."""

    bits: int
    reason: str


def plan_widths(
    cfg: JobConfig,
    candidates: CandidateSet,
    registrations: Mapping[str, Registration],
    timings: Callable[[Mapping[str, Mapping[str, CandidateFile]]], Mapping[str, Mapping]],
) -> dict[str, WidthPlan]:
    """Every registered device's deploy width from its limits and its initial-model candidates
    (`bitfleet.deploy.planned_width`); devices with a latency limit time theirs first."""
    files = {}
    for dev, reg in registrations.items():
        if reg.limits.any:
            files[dev] = candidates.for_device(cfg, reg, None)[0]
    timed = timings({d: f for d, f in files.items() if registrations[d].limits.max_latency_ms})
    out = {}
    for dev, reg in registrations.items():
        sizes = {n: f.bytes for n, f in files.get(dev, {}).items()}
        bits, why = planned_width(sizes, timed.get(dev), reg.limits, cfg.deploy.bits)
        out[dev] = WidthPlan(bits, why)
    return out
