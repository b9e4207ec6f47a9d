"""What a job reports: one `RoundReport` per round, and the `JobResult` of the whole job.

The simulator, the demo and the CLI read these instead of the coordinator's insides.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bitfleet.assignment import Assignment
from bitfleet.deploy import DeployChoice
from bitfleet.registration import Registration

from .allocation import Allocation
from .candidates import WidthPlan
from .global_model import StateDict
from .reallocation import Move

__all__ = ["JobResult", "RoundReport"]


@dataclass
class RoundReport:
    """What one round did; the demo prints it and the report tables it."""

    round: int
    selected: list[str]
    received: list[str]
    stragglers: list[str]
    train_loss: float
    host_seconds: float
    wait_seconds: float
    overhead_seconds: float
    sim_seconds: float
    acc_fp32: float | None = None
    acc_deploy: dict[str, float] = field(default_factory=dict)
    """Test accuracy per deployed width ("2", "W2A2"): what reports show."""
    val_deploy: dict[str, float] = field(default_factory=dict)
    """Validation accuracy in float ("32") and per weight-only width: what decides."""
    dropped: dict[str, int] = field(default_factory=dict)
    """Messages and updates dropped since the job started, per reason."""


@dataclass
class JobResult:
    """What a finished (or stopped) job produced: what the simulator, the demo and the CLI
    read, instead of the coordinator's insides."""

    job_id: str
    reports: list[RoundReport]
    global_state: StateDict
    assignments: dict[str, Assignment]
    """Every device's last assignment; `final_bits()` is what its model was exported at."""
    registrations: dict[str, Registration]
    allocation: Allocation | None
    allocation_seconds: dict[str, float]
    fine: dict[str, Any]
    """FedHQ's fine-stage report; empty when it did not run."""
    exported: dict[str, Path]
    export_failures: dict[str, str]
    """Devices that got no model, and why (the last attempt's error)."""
    dropped: dict[str, int]
    deploy: dict[str, DeployChoice] = field(default_factory=dict)
    """Every delivered device's candidates and the chosen one, and why."""
    plans: dict[str, WidthPlan] = field(default_factory=dict)
    """Deploy widths planned before training from the owners' limits."""
    moves: list[Move] = field(default_factory=list)
    """Devices re-allocated at runtime."""
