"""The round runner: send each selected device its task, collect the updates, close the round.

It dispatches the task (round id, the device's assignment, the model), folds updates into the
round's aggregate as they arrive (validated first, counted once per device), stops at all
updates or at quorum by the deadline, and prices the round on the boards' clock: the slowest
participant's training plus its transfers. The coordinator's main loop and FedHQ's fine stage
both run rounds through it; it never changes the global model (docs/round.md).
"""

from __future__ import annotations

import logging
import math
import queue
import random
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch

from bitfleet.board_time import transfer_seconds
from bitfleet.protocol import Topics, make_message, pack_state, split_payload
from bitfleet.registration import Registration

from .aggregation import capped_weights, make_aggregator
from .config import JobConfig
from .intake import Intake, Update
from .state import StateStore
from .validation import Reference, UpdateValidator, Verdict

log = logging.getLogger(__name__)


@dataclass
class RoundResult:
    """What one round (or trial round) collected."""

    aggregate: Any
    """The aggregator the updates were folded into (`mean()` gives the round's mean)."""
    received: dict[str, Update]
    payload_bytes: int
    wait_seconds: float
    fold_seconds: float
    dispatch_seconds: float
    sim_seconds: float


class RoundRunner:
    """Runs rounds for one job. `registrations()` gives the fleet's registrations (for the
    boards' speeds and links), `assignment_body(device)` the assignment a task carries,
    `transport()` the live connection; `stop` ends a collection early."""

    def __init__(
        self,
        cfg: JobConfig,
        *,
        job_id: str,
        topics: Topics,
        store: StateStore,
        intake: Intake,
        validator: UpdateValidator,
        registrations: Callable[[], Mapping[str, Registration]],
        assignment_body: Callable[[str], dict[str, Any]],
        transport: Callable[[], Any],
        stop: threading.Event,
    ) -> None:
        self.cfg = cfg
        self.job_id = job_id
        self.topics = topics
        self.store = store
        self.intake = intake
        self.validator = validator
        self.registrations = registrations
        self.assignment_body = assignment_body
        self.transport = transport
        self.stop = stop
        # The round's tasks not answered yet, by device: sent again when the device or the
        # coordinator reconnects, since a restarted broker forgets what it had not delivered.
        self._outstanding: dict[str, tuple[str, dict[str, Any], bytes]] = {}

    def select(self, rnd: int, assigned: Iterable[str]) -> list[str]:
        """This round's devices among the online assigned ones: drawn from a generator seeded
        by the job and the round, so a coordinator resumed after a crash selects what an
        uninterrupted run would."""
        known = set(assigned)
        online = sorted(d.id for d in self.store.devices(online_only=True) if d.id in known)
        rc = self.cfg.rounds
        k = max(rc.min_devices, math.ceil(rc.fraction * len(online)))
        rng = random.Random(f"{self.cfg.job.seed}:{rnd}")
        return sorted(rng.sample(online, min(k, len(online))))

    def run(
        self,
        rnd: int,
        selected: list[str],
        state: dict[str, torch.Tensor],
        local_epochs: float,
        *,
        trial: int | None = None,
    ) -> RoundResult:
        """Dispatch `state` to `selected`, collect their updates, and price the round.

        Trial rounds (`trial`) leave no trace in the store, and their updates are judged
        against the model they were sent (`state`), as every round's are."""
        t0 = time.perf_counter()
        payload = self.dispatch(rnd, selected, state, local_epochs, trial=trial)
        dispatch_s = time.perf_counter() - t0
        aggregate, received, wait_s, fold_s = self._collect(rnd, selected, state, trial)
        return RoundResult(
            aggregate=aggregate,
            received=received,
            payload_bytes=payload,
            wait_seconds=wait_s,
            fold_seconds=fold_s,
            dispatch_seconds=dispatch_s,
            sim_seconds=self.simulated_seconds(received.values(), payload),
        )

    def dispatch(
        self,
        rnd: int,
        selected: list[str],
        state: dict[str, torch.Tensor],
        local_epochs: float,
        trial: int | None = None,
    ) -> int:
        """Send each selected device its task: the round, its assignment and the model.

        The assignment travels with every task, so a device always trains what this round
        asks (FedMPQ's per-layer bits change every round; trial rounds try other strategies).
        Returns the model's payload size.
        """
        task: dict[str, Any] = {
            "round": rnd,
            "job_id": self.job_id,
            "local_epochs": local_epochs,
            "deadline_s": self.cfg.rounds.deadline_s,
        }
        if trial is not None:
            task["trial"] = trial
        blob = pack_state(state)
        transport = self.transport()
        self._outstanding = {}
        for device in selected:
            body = {**task, "assignment": self.assignment_body(device)}
            message = make_message("task", body)
            self._outstanding[device] = (self.topics.task(device), message, blob)
            transport.publish_many(self.topics.task(device), split_payload("task", message, blob))
        return len(blob)

    def resend(self, devices: Iterable[str] | None = None) -> None:
        """Send unanswered tasks again (all, or those of `devices`) after a reconnect.

        Runs on the network thread: after the coordinator's own reconnect (its subscriptions
        renewed first, so no answer is missed) and when a device registers again. A device
        that already trained on the task answers with the same update, counted once. A new
        payload id, or the device would take the task for a redelivery and ignore it.
        """
        outstanding = dict(self._outstanding)
        for device in outstanding if devices is None else devices:
            if device in outstanding:
                topic, message, blob = outstanding[device]
                self.transport().publish_many(
                    topic, split_payload("task", message, blob), wait=False
                )

    def weights(self, selected: Iterable[str]) -> dict[str, float]:
        """The weight each selected device's update will have: its registered sample count,
        capped at `[server] max_weight_share` of the round (docs/round.md#weights)."""
        boards = self.registrations()
        counts = {d: boards[d].data.n_samples for d in selected if d in boards}
        return capped_weights(counts, self.cfg.server.max_weight_share)

    def _collect(
        self,
        rnd: int,
        selected: list[str],
        reference: dict[str, torch.Tensor],
        trial: int | None,
    ) -> tuple[Any, dict[str, Update], float, float]:
        """Fold the round's updates as they arrive until all, or quorum by the deadline.

        An update counts only with the sample count its device registered (the weights are
        fixed at dispatch from those counts), and while the validator has too few norms to
        judge by, the first updates wait in `held` until the round's own norms can judge them.
        A selected device with no update taken by the round's end is marked offline and not
        selected again until it registers or answers (docs/round.md#presence).
        """
        rc = self.cfg.rounds
        drop = self.intake.drop
        aggregate = make_aggregator(
            self.cfg.server.aggregation, reference, trim=self.cfg.server.trim
        )
        judge_by = Reference(reference)  # flattened once for all of the round's updates
        weights = self.weights(selected)
        received: dict[str, Update] = {}
        held: list[tuple[Update, Verdict]] = []
        quorum = max(1, math.ceil(rc.quorum * len(selected)))
        deadline = time.monotonic() + rc.deadline_s
        wait_s = fold_s = 0.0

        def fold(upd: Update, verdict: Verdict) -> None:
            if verdict.reason is not None:
                drop(verdict.reason, f"update/{upd.device}", verdict.detail)
                return
            if trial is None and not self.store.record_update(
                rnd, upd.device, upd.n_samples, upd.train_loss, upd.train_seconds
            ):
                drop("duplicate", f"update/{upd.device}", f"round {rnd}")
                return
            try:
                aggregate.add(verdict.update, weights[upd.device])  # checked: not again
            except ValueError as exc:
                drop("bad_update", f"update/{upd.device}", exc)
                return
            if trial is None:  # a trial's short update must not set the norm scale
                self.validator.observe(verdict)
            if verdict.scale < 1:
                log.warning("round %d: clipped %s's update: %s", rnd, upd.device, verdict.detail)
            received[upd.device] = upd
            self._outstanding.pop(upd.device, None)

        def release(final: bool) -> None:
            """Judge the held updates once the round's norms can (or the round is over)."""
            limit = self.validator.threshold([v.norm or 0.0 for _, v in held], final=final)
            if held and (limit is not None or final):
                for upd, verdict in held:
                    fold(upd, self.validator.decide(verdict, judge_by, limit))
                held.clear()

        while len(received) + len(held) < len(selected) and not self.stop.is_set():
            now = time.monotonic()
            if now >= deadline and len(received) + len(held) >= quorum:
                break
            if now >= deadline + rc.deadline_s:  # a second deadline without quorum: go on
                log.warning("round %d: only %d of %d updates", rnd, len(received), quorum)
                if received or held:
                    break
                deadline = now + rc.deadline_s
            t_wait = time.perf_counter()
            try:
                upd = self.intake.updates.get(timeout=0.2)
            except queue.Empty:
                wait_s += time.perf_counter() - t_wait
                continue
            wait_s += time.perf_counter() - t_wait
            t_fold = time.perf_counter()
            if upd.round != rnd or upd.device not in weights or upd.trial != trial:
                drop("late_or_unexpected", f"update/{upd.device}", f"round {upd.round}")
                continue
            registered = self.registrations()[upd.device].data.n_samples
            if upd.n_samples != registered:
                why = f"{upd.n_samples} samples, registered {registered}"
                drop("sample_count", f"update/{upd.device}", why)
                continue
            if upd.device in received or any(h.device == upd.device for h, _ in held):
                drop("duplicate", f"update/{upd.device}", f"round {rnd}")
                continue
            # Before record_update: a forged update must not use up the device's slot.
            verdict = self.validator.check(upd.state, judge_by)
            if verdict.pending:
                held.append((upd, verdict))
                release(final=False)
            else:
                fold(upd, verdict)
            fold_s += time.perf_counter() - t_fold
        release(final=True)
        self._outstanding = {}
        if not self.stop.is_set():
            self._mark_missing(rnd, [d for d in selected if d not in received])
        return aggregate, received, wait_s, fold_s

    def _mark_missing(self, rnd: int, missing: list[str]) -> None:
        """Presence that does not rest on the last will: a device that did not deliver is
        offline until it registers or an update of its arrives (`Intake`)."""
        for device in missing:
            self.store.set_online(device, False)
        if missing:
            log.warning("round %d: no update from %s; offline until heard from", rnd, missing)

    def simulated_seconds(self, updates: Iterable[Update], payload_bytes: int) -> float:
        """The round's wall clock on the real boards: the slowest participant
        (docs/simulation.md).

        A device states its training time on its board (`board_seconds`: measured on a real
        board, modelled on a virtual one); an older agent's host seconds are scaled by its
        profile's relative speed. Transfer time comes from the profile's link bandwidth.
        """
        boards = self.registrations()
        longest = 0.0
        for upd in updates:
            reg = boards.get(upd.device)
            speed = reg.board.relative_speed if reg is not None else 1.0
            mbps = reg.board.link_mbps if reg is not None else 100.0
            train = upd.train_seconds / speed if upd.board_seconds is None else upd.board_seconds
            longest = max(longest, train + transfer_seconds(payload_bytes, mbps))
        return longest
