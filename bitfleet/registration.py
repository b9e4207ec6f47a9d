"""What a board says about itself when it registers, as typed values read once at the door.

An agent builds its `Registration` (board profile, measured machine and step times, a summary of
its labels, never samples) and sends `to_message()`; the coordinator reads the message back with
`Registration.from_message`, which checks every field the allocation and the export will read,
so one malformed board is dropped with a reason instead of breaking every later decision. The
store keeps the message's dictionaries; `from_stored` reads them back the same way
(docs/protocol.md#register, docs/allocation.md).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from .deploy import DeployLimits
from .profiles import MAX_QAT_OVERHEAD, DeviceProfile, ProfileError
from .protocol import ProtocolError
from .runtime_facts import RuntimeFacts

MAX_STEP_SECONDS = 1e4
"""Longest plausible training step on any board (a Pi 4's LeNet step is about 0.05 s)."""


@dataclass(frozen=True)
class DataSummary:
    """A device's data as it may leave the board: sample count, label histogram, and the
    fitted rank-frequency profile (`bitfleet.data.label_fit`) as its dictionary."""

    n_samples: int
    label_hist: tuple[int, ...]
    label_fit: Mapping[str, Any] | None = None

    @classmethod
    def of_labels(cls, labels: Sequence[int], num_classes: int) -> DataSummary:
        """The summary of a device's training labels: what agents and virtual boards send."""
        import numpy as np

        from .data import label_histogram
        from .data.label_fit import fit_label_profile

        counts = label_histogram(np.asarray(labels), range(len(labels)), num_classes)
        hist = [int(c) for c in counts]
        return cls(len(labels), tuple(hist), fit_label_profile(hist).to_dict())

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"n_samples": self.n_samples, "label_hist": list(self.label_hist)}
        if self.label_fit is not None:
            out["label_fit"] = dict(self.label_fit)
        return out


@dataclass(frozen=True)
class StepTimes:
    """Seconds of one float and one QAT training step, measured on the board itself."""

    t_fp: float
    t_qat: float | None


@dataclass(frozen=True)
class Registration:
    """One device's registration: who it is, what board it is, how fast it trains, its data.

    `profile` is the profile summary as sent (`bitfleet.profiles.profile_summary`): kept whole
    for the store and reports; `board`, `step_times` and `qat_overhead` are its typed parts.
    `qat_overhead` is what a QAT step costs relative to a float step on this device: measured
    where the board timed both, else its profile's prior. `runtime` is what its onnxruntime
    loads; None from a virtual board or an older agent, which get files for the newest runtime.
    `limits` is what the board's owner allows its model (size, latency), empty if nothing.
    """

    device_id: str
    board: DeviceProfile
    step_times: StepTimes | None
    qat_overhead: float
    data: DataSummary
    profile: Mapping[str, Any]
    runtime: RuntimeFacts | None = None
    limits: DeployLimits = DeployLimits()

    def to_message(self, sent_at: float) -> dict[str, Any]:
        """The body of a `register` message."""
        return {
            "device_id": self.device_id,
            "profile": dict(self.profile),
            "data": self.data.to_dict(),
            "sent_at": sent_at,
        }

    @classmethod
    def from_message(
        cls, body: Mapping[str, Any], num_classes: int, max_samples: int | None = None
    ) -> Registration:
        """Read a schema-checked `register` body for a job with `num_classes` classes whose
        training split holds `max_samples` samples.

        Everything later rules read is checked here: a board table that is a valid profile
        (plausible speed and bandwidth, known storage and widths), a label histogram of the
        job's classes that sums to a sample count the data set can hold (the count weighs the
        device's updates), finite plausible step times, a well-formed label fit. Anything else
        is a ProtocolError `bad_register` naming the field (docs/security.md#threat-model).
        """
        return cls.from_stored(
            body["device_id"], body["profile"], body["data"], num_classes, max_samples
        )

    @classmethod
    def from_stored(
        cls,
        device_id: str,
        profile: Mapping[str, Any],
        data: Mapping[str, Any],
        num_classes: int | None = None,
        max_samples: int | None = None,
    ) -> Registration:
        """The same reading for a registration the store kept (None: any classes, any count)."""
        if not isinstance(profile, Mapping):
            raise ProtocolError("bad_register", "profile must be an object")
        try:
            board = DeviceProfile.from_dict(profile.get("board"), source="profile.board")
        except ProfileError as exc:
            raise ProtocolError("bad_register", str(exc)) from None
        return cls(
            device_id=device_id,
            board=board,
            step_times=_step_times(profile.get("step_times")),
            qat_overhead=_overhead(profile.get("qat_overhead"), board.qat_overhead),
            data=_data(data, num_classes, max_samples),
            profile=profile,
            runtime=_runtime(profile.get("runtime")),
            limits=_limits(profile.get("limits")),
        )


def _positive(value: Any, where: str, hi: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise ProtocolError("bad_register", f"{where} must be a positive number, got {value!r}")
    if not math.isfinite(value) or value > hi:
        raise ProtocolError("bad_register", f"{where} must be at most {hi:g}, got {value!r}")
    return float(value)


def _step_times(raw: Any) -> StepTimes | None:
    if raw is None:
        return None
    if not isinstance(raw, Mapping):
        raise ProtocolError("bad_register", "profile.step_times must be an object or null")
    t_fp = raw.get("t_fp")
    if t_fp is None or t_fp == 0:
        return None  # measured nothing: the profile's speed stands in
    t_qat = raw.get("t_qat")
    return StepTimes(
        _positive(t_fp, "profile.step_times.t_fp", MAX_STEP_SECONDS),
        None if not t_qat else _positive(t_qat, "profile.step_times.t_qat", MAX_STEP_SECONDS),
    )


def _runtime(raw: Any) -> RuntimeFacts | None:
    if raw is None:
        return None
    try:
        return RuntimeFacts.from_dict(raw)
    except ValueError as exc:
        raise ProtocolError("bad_register", f"profile.{exc}") from None


def _limits(raw: Any) -> DeployLimits:
    try:
        return DeployLimits.from_dict(raw)
    except ValueError as exc:
        raise ProtocolError("bad_register", f"profile.{exc}") from None


def _overhead(raw: Any, prior: float) -> float:
    if raw is None:
        return prior
    return _positive(raw, "profile.qat_overhead", MAX_QAT_OVERHEAD)


def _data(raw: Any, num_classes: int | None, max_samples: int | None) -> DataSummary:
    if not isinstance(raw, Mapping):
        raise ProtocolError("bad_register", "data must be an object")
    hist = raw.get("label_hist")
    n = raw.get("n_samples")
    if not isinstance(hist, list) or not all(type(c) is int and c >= 0 for c in hist):
        raise ProtocolError("bad_register", "data.label_hist must be a list of counts >= 0")
    if num_classes is not None and len(hist) != num_classes:
        raise ProtocolError(
            "bad_register",
            f"label_hist has {len(hist)} classes, the job's data set {num_classes}",
        )
    if type(n) is not int or n < 0:
        raise ProtocolError("bad_register", f"data.n_samples must be an integer >= 0, got {n!r}")
    if max_samples is not None and n > max_samples:
        raise ProtocolError(
            "bad_register", f"data.n_samples {n} is more than the data set's {max_samples}"
        )
    if sum(hist) != n:
        raise ProtocolError(
            "bad_register", f"data.label_hist counts {sum(hist)} samples, n_samples says {n}"
        )
    return DataSummary(n, tuple(hist), _label_fit(raw.get("label_fit"), len(hist)))


def _label_fit(raw: Any, num_classes: int) -> Mapping[str, Any] | None:
    """The label fit as sent, once `LabelFit.from_dict` (what allocation reads) accepts it and
    it covers the histogram's classes."""
    if raw is None:
        return None
    from .data.label_fit import LabelFit

    if not isinstance(raw, Mapping):
        raise ProtocolError("bad_register", "data.label_fit must be an object or null")
    try:
        fit = LabelFit.from_dict(raw)
    except (ValueError, TypeError) as exc:
        raise ProtocolError("bad_register", f"data.label_fit: {exc}") from None
    if len(fit.p_fit) != num_classes:
        raise ProtocolError(
            "bad_register", f"data.label_fit has {len(fit.p_fit)} classes, not {num_classes}"
        )
    return raw
