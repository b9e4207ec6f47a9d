"""Who trains how: FedHQ's hybrid PTQ/QAT allocation and its baselines (docs/allocation.md#fedhq).

One small class per rule, as Flower has one per aggregation rule: `FixedAllocation` (every
device the same method: all-QAT/FedAQT, all-PTQ/FedFQ, float FedAvg, FedMPQ), `RandomAllocation`
(FedRH) and `FedHQAllocation`. Each takes what devices said at registration (board profile,
measured step times, label statistics; never samples) and returns an `Allocation`.

FedHQ places every device at (x, y) = (SigSpeed, SigAcc):
- x: how much QAT on this device would lengthen the round's critical path, in [0, 1];
- y: how much the global model depends on this device's data: its size times how
  representative its (fitted) label distribution is, min-max normalised.
Far above the diagonal (y - x > xi) means QAT, far below means PTQ; inside the band, devices
that matter little either way (x * y < a) take PTQ, and the rest (ambiguous) take QAT exactly
when their QAT round still ends inside the all-PTQ round. The optional fine stage
(`plan_fine_candidates`, `CostModel`) revisits the ambiguous ones with short trial rounds.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from bitfleet.board_time import steps_per_round, transfer_seconds
from bitfleet.quant.methods import QUANT_IN_FORWARD
from bitfleet.registration import DataSummary, Registration


@dataclass(frozen=True)
class DeviceCost:
    """One device's round time under each side of the allocation (docs/allocation.md#fedhq).

    `T(PTQ) = steps * t_fp + calib + comm`, `T(QAT) = steps * t_qat + comm`, in seconds on the
    board: from the step times it measured on itself, or, where it measured none, from its
    profile's relative speed and QAT overhead (only ratios matter to the allocation).
    """

    device: str
    n_samples: int
    steps: int
    t_fp: float
    t_qat: float
    calib_s: float
    comm_s: float

    @property
    def ptq_round(self) -> float:
        return self.steps * self.t_fp + self.calib_s + self.comm_s

    @property
    def qat_round(self) -> float:
        return self.steps * self.t_qat + self.comm_s

    def round_seconds(self, strategy: str) -> float:
        return self.qat_round if strategy in QUANT_IN_FORWARD else self.ptq_round


def device_cost(
    reg: Registration,
    *,
    local_epochs: float,
    batch_size: int,
    model_bytes: int,
    calib_batches: int,
    measured_t_fp: float | None = None,
) -> DeviceCost:
    """A device's `DeviceCost` from its registration, or from the float-step time its updates
    measured (`measured_t_fp`, smoothed: docs/allocation.md#runtime) once it has trained."""
    if measured_t_fp is not None:
        t_fp = measured_t_fp
        t_qat = t_fp * reg.qat_overhead
    elif reg.step_times is not None:
        t_fp = reg.step_times.t_fp
        t_qat = reg.step_times.t_qat or t_fp * reg.qat_overhead
    else:
        t_fp = 1.0 / reg.board.relative_speed  # relative units: only ratios between devices matter
        t_qat = t_fp * reg.qat_overhead
    n = reg.data.n_samples
    return DeviceCost(
        device=reg.device_id,
        n_samples=n,
        steps=steps_per_round(n, batch_size, local_epochs),
        t_fp=t_fp,
        t_qat=t_qat,
        calib_s=calib_batches * t_fp / 3,  # a forward pass is about a third of a step
        comm_s=transfer_seconds(model_bytes, reg.board.link_mbps),
    )


def speed_significance(costs: Sequence[DeviceCost], rule: str = "critical") -> dict[str, float]:
    """SigSpeed in [0, 1] per device.

    `critical` (docs/allocation.md#sigspeed): `max(0, T_m(QAT) - R_ptq) / (R_qat - R_ptq)`,
    zero for a device whose QAT round ends inside the all-PTQ round. `simple` (the ablation):
    `(T_m(QAT) - T_m(PTQ)) / R_qat`, every device's own slowdown, critical or not.
    """
    if not costs:
        return {}
    r_ptq = max(c.ptq_round for c in costs)
    r_qat = max(c.qat_round for c in costs)
    out = {}
    for c in costs:
        if rule == "critical":
            span = r_qat - r_ptq
            x = max(0.0, c.qat_round - r_ptq) / span if span > 0 else 0.0
        elif rule == "simple":
            x = max(0.0, c.qat_round - c.ptq_round) / r_qat if r_qat > 0 else 0.0
        else:
            raise ValueError(f"unknown speed rule {rule!r}; known: critical, simple")
        out[c.device] = min(1.0, x)
    return out


def label_distribution(data: DataSummary, rule: str = "fit") -> np.ndarray:
    """The label distribution SigAcc compares: the device's fitted profile or its histogram.

    `fit` uses the `label_fit` statistics the device computed (fitting it here from the
    histogram for an agent too old to send them); `raw` the normalised histogram itself.
    """
    from bitfleet.data.label_fit import LabelFit, fit_label_profile

    hist = np.asarray(data.label_hist, dtype=np.float64)
    if rule == "raw":
        return hist / hist.sum() if hist.sum() > 0 else np.full(len(hist), 1.0 / max(1, len(hist)))
    if rule != "fit":
        raise ValueError(f"unknown accuracy rule {rule!r}; known: fit, raw")
    if data.label_fit is not None:  # checked at registration (bitfleet.registration)
        return np.asarray(LabelFit.from_dict(data.label_fit).p_fit, dtype=np.float64)
    return np.asarray(fit_label_profile(list(data.label_hist)).p_fit, dtype=np.float64)


def accuracy_significance(data: Mapping[str, DataSummary], rule: str = "fit") -> dict[str, float]:
    """SigAcc per device, min-max normalised to [0, 1] (docs/allocation.md#sigacc).

    Raw score `(n_m / max_k n_k) * (1 - JS(p_m, p_global))`, where `p_global` is the
    fleet's label distribution (the sum of the histograms devices reported).
    """
    from bitfleet.data.label_fit import accuracy_significance as significance

    if not data:
        return {}
    total = sum(np.asarray(d.label_hist, dtype=np.float64) for d in data.values())
    p_global = total / max(float(np.sum(total)), 1.0)
    n_max = max(d.n_samples for d in data.values()) or 1
    raw = {
        dev: significance(d.n_samples, n_max, label_distribution(d, rule), p_global)
        for dev, d in data.items()
    }
    lo, hi = min(raw.values()), max(raw.values())
    if hi - lo < 1e-12:
        return {dev: 1.0 for dev in raw}
    return {dev: (v - lo) / (hi - lo) for dev, v in raw.items()}


@dataclass(frozen=True)
class Decision:
    """One device's side and the rule that put it there (for reports and tests)."""

    side: str  # "qat" or "ptq"
    rule: str  # qat_side | ptq_side | unimportant | ambiguous_fits | ambiguous_slow


def coarse_decisions(
    points: Mapping[str, tuple[float, float]],
    qat_fits: Mapping[str, bool],
    xi: float,
    a: float,
) -> dict[str, Decision]:
    """The coarse global initialisation: the geometric segmentation of (x, y)
    (docs/allocation.md#coarse-stage)."""
    out = {}
    for dev, (x, y) in points.items():
        if y - x > xi:
            out[dev] = Decision("qat", "qat_side")
        elif x - y > xi:
            out[dev] = Decision("ptq", "ptq_side")
        elif x * y < a:
            out[dev] = Decision("ptq", "unimportant")
        elif qat_fits[dev]:
            out[dev] = Decision("qat", "ambiguous_fits")
        else:
            out[dev] = Decision("ptq", "ambiguous_slow")
    return out


def deploy_loss_factor(
    widths: Mapping[str, int], ptq_loss: Mapping[int, float] | None, loss_ref: float
) -> tuple[float, str]:
    """How much SigAcc counts in a deploy-aware FedHQ (docs/allocation.md#deploy-aware): the
    largest accuracy the global model loses under PTQ at a width the fleet deploys at, over
    `loss_ref`, capped at 1. Before the first evaluation, 8 bits and more count as lossless
    (the demo measured float 0.850, 8-bit PTQ 0.851) and a narrower width as unknown, which
    leaves the paper's rule (factor 1)."""
    deployed = sorted({b for b in widths.values()})
    if not deployed:
        return 1.0, "no deploy widths known: the paper's rule"
    if ptq_loss is None or any(b not in ptq_loss for b in deployed if b < 32):
        if all(b >= 8 for b in deployed):
            return 0.0, f"fleet deploys at {deployed} bits: PTQ loses nothing there"
        return 1.0, f"PTQ loss at {deployed} bits not measured yet: the paper's rule"
    worst_bits = max((b for b in deployed if b < 32), key=lambda b: ptq_loss[b], default=None)
    if worst_bits is None:
        return 0.0, "fleet deploys in float"
    loss = max(0.0, ptq_loss[worst_bits])
    factor = min(1.0, loss / loss_ref)
    return factor, f"PTQ loses {loss:.4f} at {worst_bits} bits (x{factor:.2f} of SigAcc)"


@dataclass
class Allocation:
    """The result of an allocation: a method per device plus what explains it."""

    strategies: dict[str, str]
    significance: dict[str, tuple[float, float]] = field(default_factory=dict)
    rules: dict[str, str] = field(default_factory=dict)
    ambiguous: list[str] = field(default_factory=list)
    seconds: float = 0.0
    acc_factor: tuple[float, str] | None = None
    """Deploy-aware FedHQ: the factor SigAcc was scaled by, and why."""


@dataclass
class AllocationInput:
    """What the coordinator knows about the fleet when it allocates."""

    registrations: dict[str, Registration]
    local_epochs: float
    batch_size: int
    model_bytes: int
    deploy_widths: dict[str, int] = field(default_factory=dict)
    """The width each device will deploy at (planned before training)."""
    ptq_loss: dict[int, float] | None = None
    """Accuracy the global model lost under PTQ per width at the last evaluation."""
    measured_t_fp: dict[str, float] = field(default_factory=dict)
    """Smoothed float-step seconds per device from its updates (docs/allocation.md#runtime)."""

    @property
    def devices(self) -> list[str]:
        return sorted(self.registrations)

    @property
    def data(self) -> dict[str, DataSummary]:
        return {dev: reg.data for dev, reg in self.registrations.items()}

    def costs(self, calib_batches: int) -> list[DeviceCost]:
        return [
            device_cost(
                self.registrations[dev],
                local_epochs=self.local_epochs,
                batch_size=self.batch_size,
                model_bytes=self.model_bytes,
                calib_batches=calib_batches,
                measured_t_fp=self.measured_t_fp.get(dev),
            )
            for dev in self.devices
        ]


class AllocationRule:
    """Base class: `allocate(fleet)` returns an `Allocation` for every device in `fleet`."""

    name = "base"

    def __init__(self, cfg: Any, seed: int = 0) -> None:
        self.cfg = cfg
        self.seed = seed

    def allocate(self, fleet: AllocationInput) -> Allocation:
        raise NotImplementedError


class FixedAllocation(AllocationRule):
    """Every device trains with `[allocation] strategy` (FedAQT, FedFQ, FedAvg, FedMPQ)."""

    name = "fixed"

    def allocate(self, fleet: AllocationInput) -> Allocation:
        s = self.cfg.strategy
        return Allocation(
            {dev: s for dev in fleet.devices},
            rules=dict.fromkeys(fleet.devices, "fixed"),
        )


class RandomAllocation(AllocationRule):
    """FedRH: QAT with probability `p_qat`, drawn per device from the job seed and its id,
    so a device keeps its draw whoever else registers and whenever the coordinator restarts."""

    name = "random"

    def allocate(self, fleet: AllocationInput) -> Allocation:
        out = {}
        for dev in fleet.devices:
            draw = random.Random(f"{self.seed}:{dev}").random()
            out[dev] = self.cfg.qat_strategy if draw < self.cfg.p_qat else self.cfg.ptq_strategy
        return Allocation(out, rules=dict.fromkeys(out, "random"))


class FedHQAllocation(AllocationRule):
    """FedHQ's coarse global initialisation (docs/allocation.md#fedhq); see the module docstring."""

    name = "fedhq"

    def points(self, fleet: AllocationInput) -> tuple[dict[str, tuple[float, float]], list]:
        costs = fleet.costs(self.cfg.calib_batches)
        xs = speed_significance(costs, self.cfg.speed_rule)
        ys = accuracy_significance(fleet.data, self.cfg.acc_rule)
        factor = self.acc_factor(fleet)
        scale = 1.0 if factor is None else factor[0]
        return {dev: (xs[dev], ys[dev] * scale) for dev in xs}, costs

    def acc_factor(self, fleet: AllocationInput) -> tuple[float, str] | None:
        """Deploy-aware FedHQ's SigAcc factor; None under the paper's rule."""
        if not self.cfg.deploy_aware:
            return None
        return deploy_loss_factor(fleet.deploy_widths, fleet.ptq_loss, self.cfg.deploy_loss_ref)

    def allocate(self, fleet: AllocationInput) -> Allocation:
        t0 = time.perf_counter()
        points, costs = self.points(fleet)
        r_ptq = max((c.ptq_round for c in costs), default=0.0)
        fits = {c.device: c.qat_round <= r_ptq for c in costs}
        decisions = coarse_decisions(points, fits, self.cfg.xi, self.cfg.a)
        side = {"qat": self.cfg.qat_strategy, "ptq": self.cfg.ptq_strategy}
        return Allocation(
            strategies={dev: side[d.side] for dev, d in decisions.items()},
            significance=points,
            rules={dev: d.rule for dev, d in decisions.items()},
            ambiguous=sorted(d for d, dec in decisions.items() if dec.rule.startswith("ambig")),
            seconds=time.perf_counter() - t0,
            acc_factor=self.acc_factor(fleet),
        )


ALLOCATION_RULES: dict[str, type[AllocationRule]] = {
    cls.name: cls for cls in (FixedAllocation, RandomAllocation, FedHQAllocation)
}


def make_allocation_rule(cfg: Any, seed: int = 0) -> AllocationRule:
    """The rule named by `[allocation] mode`."""
    try:
        return ALLOCATION_RULES[cfg.mode](cfg, seed)
    except KeyError:
        raise ValueError(
            f"unknown allocation mode {cfg.mode!r}; known: {sorted(ALLOCATION_RULES)}"
        ) from None


# --- the fine ML-based adjustment ------------------------------------------------------------


def plan_fine_candidates(
    ambiguous: Sequence[str], points: Mapping[str, tuple[float, float]], n: int
) -> list[frozenset[str]]:
    """Which ambiguous devices take QAT in each trial: `n` prefixes of the devices ordered by
    how strongly they lean to QAT (y - x), from none to all, evenly spaced."""
    order = sorted(ambiguous, key=lambda d: (points[d][0] - points[d][1], d))
    sizes = sorted({round(i * len(order) / (n - 1)) for i in range(n)}) if order else [0]
    return [frozenset(order[:k]) for k in sizes]


@dataclass
class CostModel:
    """What the trial rounds taught: accuracy gain and round time against the assignment.

    Accuracy gain is fitted by least squares as `c0 + c1 * q`, with `q` the share of the
    ambiguous devices' SigAcc that trains with QAT (one feature, so that a handful of trials
    determines it). Round time is the device time model's prediction; `time_scale` is the
    ratio the trials measured against it, reported so that a time model far from the boards
    shows. The choice compares lengthenings relative to the QAT-over-PTQ span, where a
    common scale cancels.
    """

    acc_coef: tuple[float, float]
    time_scale: float

    @classmethod
    def fit(
        cls,
        qat_shares: Sequence[float],
        acc_gains: Sequence[float],
        predicted_s: Sequence[float],
        measured_s: Sequence[float],
    ) -> CostModel:
        x = np.asarray(qat_shares, dtype=np.float64)
        a = np.stack([np.ones_like(x), x], axis=1)
        coef, *_ = np.linalg.lstsq(a, np.asarray(acc_gains, dtype=np.float64), rcond=None)
        pred = np.asarray(predicted_s, dtype=np.float64)
        scale = float(np.sum(np.asarray(measured_s)) / max(float(np.sum(pred)), 1e-12))
        return cls((float(coef[0]), float(coef[1])), scale)

    def accuracy(self, qat_share: float) -> float:
        return self.acc_coef[0] + self.acc_coef[1] * qat_share


def qat_share(qat: frozenset[str], ambiguous: Sequence[str], points: Mapping) -> float:
    """The share of the ambiguous devices' SigAcc that trains with QAT."""
    total = sum(points[d][1] for d in ambiguous)
    if total <= 0:
        return len(qat) / max(1, len(ambiguous))
    return sum(points[d][1] for d in qat) / total


def choose_assignment(
    model: CostModel,
    ambiguous: Sequence[str],
    points: Mapping[str, tuple[float, float]],
    round_seconds: Any,
    r_ptq: float,
    r_qat: float,
    time_weight: float,
) -> frozenset[str]:
    """The QAT set among the ambiguous devices that maximises predicted accuracy minus
    `time_weight` x how far the round outlasts the all-PTQ round, as a share of the
    QAT-over-PTQ span (`round_seconds(qat_set)` is the time model's prediction). Every prefix
    of the QAT-leaning order is scored: the fitted accuracy is monotone in that order."""
    span = max(r_qat - r_ptq, 1e-12)
    best, best_score = frozenset(), -math.inf
    for qat in plan_fine_candidates(ambiguous, points, len(ambiguous) + 1):
        lengthening = max(0.0, round_seconds(qat) - r_ptq) / span
        score = model.accuracy(qat_share(qat, ambiguous, points)) - time_weight * lengthening
        if score > best_score + 1e-12:
            best, best_score = qat, score
    return best
