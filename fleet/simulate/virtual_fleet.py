"""The virtual boards of `bitfleet simulate`: their data slices, profiles and board clock.

Time (docs/simulation.md#the-board-clock): the host's step time per local method comes from the
cost model (`cost_model.py`: timed once per host and cached, never while an experiment runs); a
virtual board's training time is that scaled by the board's relative speed and, for methods that run
the fake quantizer, by the board's QAT overhead from its profile. The coordinator adds transfer time
from the link bandwidth and takes the slowest participant per round; `fleet.simulate.compute`
runs the boards' training.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from bitfleet.data import DATASET_SPECS, ImageData, carve_validation, partition
from bitfleet.profiles import load_profile, measure_machine, profile_summary
from bitfleet.registration import DataSummary, Registration
from coordinator.allocation import QUANT_IN_FORWARD
from coordinator.config import JobConfig

from .cost_model import host_step_seconds
from .experiment import Experiment, SimDevice


@dataclass
class VirtualFleet:
    """The devices of an experiment: their data slices, profiles and clocks."""

    devices: list[SimDevice]
    data: dict[str, tuple[torch.Tensor, torch.Tensor]]
    profiles: dict[str, dict[str, Any]]
    host_steps: dict[str, float]
    num_classes: int

    def clock(self, device: str) -> Callable[[str, int, int], float]:
        """The device's board clock: (local method, optimiser steps, round) -> seconds on its
        board, slowed where the experiment slows it."""
        board = self.profiles[device]["board"]
        speed = float(board["relative_speed"])
        overhead = float(board.get("qat_overhead") or 1.0)
        sim = next(d for d in self.devices if d.id == device)

        def seconds(strategy: str, steps: int, rnd: int) -> float:
            t_fp = self.host_steps["fp"] / speed * sim.slowdown(rnd)
            if strategy in QUANT_IN_FORWARD:
                return steps * t_fp * overhead
            host = self.host_steps.get(strategy, self.host_steps["fp"])
            return steps * t_fp * host / self.host_steps["fp"]

        return seconds

    def registrations(self) -> dict[str, Registration]:
        """What the devices will say at registration, for allocation-only ablations."""
        out = {}
        for dev, (_, y) in self.data.items():
            data = DataSummary.of_labels(y.numpy(), self.num_classes).to_dict()
            out[dev] = Registration.from_stored(dev, self.profiles[dev], data)
        return out


def build_fleet(
    exp: Experiment,
    data: ImageData,
    job: JobConfig,
    quick: bool,
    host_steps: dict[str, float] | None = None,
    recalibrate: bool = False,
) -> VirtualFleet:
    """Split the training set, less the coordinator's validation split, over the devices
    (Dirichlet or IID, seeded) and give each its board's profile with step times scaled from
    this host's (`host_steps`, else the cached cost model's: `fleet.simulate.cost_model`,
    calibrated once per host)."""
    data = carve_validation(data, job.data.validation_fraction)
    x, y = data.train_x, data.train_y
    fraction = float(exp.quick.get("train_fraction", 1.0)) if quick else 1.0
    if fraction < 1.0:
        keep = torch.randperm(len(y), generator=torch.Generator().manual_seed(job.job.seed))
        keep = keep[: int(len(y) * fraction)]
        x, y = x[keep], y[keep]
    parts = partition(
        y.numpy(), len(exp.devices), job.data.partition, seed=job.job.seed, alpha=job.data.alpha
    )
    strategies = {job.allocation.strategy, job.allocation.qat_strategy, job.allocation.ptq_strategy}
    for overlay in exp.methods.values():
        a = overlay.get("allocation", {})
        strategies |= {a.get(k) for k in ("strategy", "qat_strategy", "ptq_strategy")} - {None}
    if host_steps is None:
        host_steps = host_step_seconds(
            job.model.name,
            job.data.dataset,
            strategies - {None},
            job.training.batch_size,
            recalibrate=recalibrate,
        )
    machine = measure_machine()
    fleet_data, profiles = {}, {}
    for dev, idx in zip(exp.devices, parts, strict=True):
        index = torch.from_numpy(idx).long()
        # In shared memory once: the worker processes of `ProcessCompute` then get a handle to
        # a board's data with each round's work instead of a copy.
        fleet_data[dev.id] = (x[index].share_memory_(), y[index].share_memory_())
        board = load_profile(dev.board)
        speed = board.relative_speed / dev.slowdown(0)  # slow from the start: it measures so
        steps = {
            "t_fp": host_steps["fp"] / speed,
            "t_qat": host_steps["fp"] / speed * board.qat_overhead,
            "source": "simulated: host step time scaled by the profile",
        }
        summary = profile_summary(board, machine, steps)
        summary["qat_overhead"] = board.qat_overhead  # the board's, not this host's ratio
        if dev.budget_bits is not None:
            summary["board"]["budget_bits"] = dev.budget_bits
        profiles[dev.id] = summary
    num_classes = DATASET_SPECS[job.data.dataset].num_classes
    return VirtualFleet(exp.devices, fleet_data, profiles, host_steps, num_classes)
