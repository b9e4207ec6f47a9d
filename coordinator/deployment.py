"""The job's deploy stage, at both ends of training (docs/export.md#deploy-candidates).

Before the first round, `plan` fixes the width each device deploys at from its owner's limits
and its initial-model candidates (sizes, and the board's timings where a latency limit needs
them), so the allocation knows what the fleet deploys before it decides who trains how. After
the last round, `deliver` scores and times the final model's candidates and sends each device
the one `bitfleet.deploy.choose` picks.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from bitfleet.assignment import Assignment
from bitfleet.data import ImageData
from bitfleet.protocol import Topics
from bitfleet.registration import Registration

from .candidates import (
    CandidateFile,
    CandidateSet,
    WidthPlan,
    calibration_pixels,
    exchange_timings,
    plan_widths,
)
from .config import JobConfig
from .delivery import Delivery, export_and_deliver
from .evaluation import HeldOut
from .global_model import GlobalModel
from .intake import Intake


class DeployStage:
    """Plans deploy widths before training and delivers the chosen models after it."""

    def __init__(
        self,
        cfg: JobConfig,
        model: GlobalModel,
        intake: Intake,
        topics: Topics,
        *,
        job_id: str,
        state_dir: Path,
        transport: Callable[[], Any],
        data: Callable[[], ImageData],
        held_out: Callable[[], HeldOut],
        online: Callable[[], set[str]],
        stop: threading.Event,
    ) -> None:
        """`online()` names the devices online now: only they are sent candidates to time, so
        a board that is gone costs the exchange nothing."""
        self.cfg = cfg
        self.model = model
        self.intake = intake
        self.topics = topics
        self.job_id = job_id
        self.state_dir = state_dir
        self.transport = transport
        self.data = data
        self.held_out = held_out
        self.online = online
        self.stop = stop
        self._plan_set: CandidateSet | None = None
        self._lock = threading.Lock()

    def timings(
        self, phase: str
    ) -> Callable[[Mapping[str, Mapping[str, CandidateFile]]], dict[str, dict]]:
        """The exchange of one phase: send each device its files, collect its timings."""

        def exchange(wanted: Mapping[str, Mapping[str, CandidateFile]]) -> dict[str, dict]:
            here = self.online()
            wanted = {d: files for d, files in wanted.items() if d in here}
            if not wanted:
                return {}
            return exchange_timings(
                self.transport(),
                self.topics,
                self.intake,
                job_id=self.job_id,
                phase=phase,
                wanted=wanted,
                timeout_s=self.cfg.deploy.timing_timeout_s,
                stop=self.stop,
            )

        return exchange

    def _initial_candidates(self) -> CandidateSet:
        with self._lock:
            if self._plan_set is None:
                self._plan_set = CandidateSet(
                    self.cfg,
                    self.model,
                    self.model.state,
                    calibration_pixels(self.data()),
                    self.state_dir / "plan-candidates",
                    {"job_id": self.job_id, "purpose": "sizing and timing before training"},
                )
            return self._plan_set

    def plan(self, registrations: Mapping[str, Registration]) -> dict[str, WidthPlan]:
        """Every device's deploy width before training; empty when no device has a limit
        (each then deploys at its widest width: `bitfleet.deploy.planned_width`)."""
        if not any(r.limits.any for r in registrations.values()):
            return {}
        return plan_widths(
            self.cfg, self._initial_candidates(), registrations, self.timings("plan")
        )

    def plan_late(self, reg: Registration) -> WidthPlan | None:
        """A device that registered after the plan: its width from its files' sizes (no
        timing: the round is not held for it). None: no limit, the widest width."""
        if not reg.limits.any:
            return None
        return plan_widths(
            self.cfg, self._initial_candidates(), {reg.device_id: reg}, lambda _files: {}
        )[reg.device_id]

    def deliver(
        self,
        assignments: Mapping[str, Assignment],
        registrations: Mapping[str, Registration],
        source_round: int | None,
    ) -> Delivery:
        """Score, time and choose every device's final candidates, and send the choice."""
        return export_and_deliver(
            self.cfg,
            self.model,
            job_id=self.job_id,
            assignments=assignments,
            registrations=registrations,
            data=self.data(),
            held_out=self.held_out(),
            out_dir=self.state_dir / "exports",
            source_round=source_round,
            timings=self.timings("final"),
            transport=self.transport(),
            topics=self.topics,
        )
