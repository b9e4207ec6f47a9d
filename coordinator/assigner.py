"""The assigner: which local method ("strategy") and which bits each device gets.

It keeps the fleet's registrations, runs the job's allocation rule (`coordinator.allocation`)
over them once the registration burst settles, answers late joiners with the rule's choice for
them in the fleet as it is then, and turns each choice into an `Assignment`: the method, its
training bits (the job's, or the device's budget), MQAT's widths, FedMPQ's per-layer bits, and
the width the device's final model is exported at. Every assignment is stored, so a resumed
coordinator tells each device what it was told before, FedMPQ's revised layer bits included
(docs/allocation.md).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from torch import nn

from bitfleet.assignment import Assignment
from bitfleet.board_time import steps_per_round
from bitfleet.protocol import ProtocolError
from bitfleet.quant import FLOAT_BITS, SUPPORTED_BITS
from bitfleet.quant.mpq import layer_sizes, plane_sparsity
from bitfleet.registration import Registration

from .allocation import QUANT_IN_FORWARD, Allocation, AllocationInput, make_allocation_rule
from .candidates import WidthPlan
from .config import JobConfig
from .mpq import prune_grow
from .reallocation import Hysteresis, Move, SpeedTracker
from .state import StateStore

log = logging.getLogger(__name__)

ACT_TRAINED = frozenset({"qat", "mqat", "apqn", "kure"})
"""Methods that train with `[allocation] act_bits` activations; PTQ and float train in float
and have their activations calibrated where they are deployed."""


def training_bits(cfg: JobConfig, reg: Registration) -> int:
    """A device's training bits: the job's `bits`, or (`bits_from = "profile"`) its budget."""
    if cfg.allocation.bits_from == "job":
        return cfg.allocation.bits
    return reg.board.deploy_width()


def deploy_bits(cfg: JobConfig, reg: Registration, plan: WidthPlan | None = None) -> int:
    """The width a device deploys at, known before training (docs/allocation.md#deploy-width).

    With budgets from the profile, the budget itself; a stated budget among the job's
    `[deploy] bits`; else the width its owner's limits allow (`plan`, from the deploy stage);
    else the widest of `[deploy] bits`.
    """
    if cfg.allocation.bits_from == "profile":
        return reg.board.deploy_width()
    if plan is not None and reg.board.budget_bits not in cfg.deploy.bits:
        return plan.bits
    return reg.board.deploy_width(cfg.deploy.bits)


class Assigner:
    """Decides and remembers every device's `Assignment`; `publish(device, assignment)` sends
    one (the coordinator's `assign` message)."""

    def __init__(
        self,
        cfg: JobConfig,
        store: StateStore,
        model: nn.Module,
        *,
        model_bytes: int,
        publish: Callable[[str, Assignment], None],
        plan_late: Callable[[Registration], WidthPlan | None] = lambda _reg: None,
    ) -> None:
        """`plan_late(reg)` plans the deploy width of a device that registers after the plan."""
        self.cfg = cfg
        self.plan_late = plan_late
        self.plans: dict[str, WidthPlan] = {}
        """Each device's planned deploy width (the deploy stage's, before training)."""
        self.ptq_loss: dict[int, float] | None = None
        """The global model's accuracy lost under PTQ per width, from the last evaluation."""
        self.speeds = SpeedTracker()
        self.hysteresis = Hysteresis()
        self.moves: list[Move] = []
        """Devices re-allocated at runtime, in order (docs/allocation.md#runtime)."""
        self.store = store
        self.publish = publish
        self.model_bytes = model_bytes
        self.rule = make_allocation_rule(cfg.allocation, cfg.job.seed)
        self.allocation: Allocation | None = None
        self.seconds = {"coarse": 0.0, "fine": 0.0}
        self.assignments: dict[str, Assignment] = {}
        self.registrations: dict[str, Registration] = {}
        self._restored_layers: dict[str, dict[str, int]] = {}
        self._sizes = layer_sizes(model)
        self._lock = threading.Lock()

    def restore(self) -> None:
        """On resume: the fleet as registered before, and FedMPQ's layer bits as last revised
        (a device's first assignment after the restart goes on from them)."""
        for d in self.store.devices():
            try:
                self.registrations[d.id] = Registration.from_stored(d.id, d.profile, d.data)
            except ProtocolError as exc:  # stored by an older coordinator that let it in
                log.warning("ignored the stored registration of %s: %s", d.id, exc)
        for dev, record in self.store.assignments().items():
            if record.per_layer_bits:
                self._restored_layers[dev] = dict(record.per_layer_bits)

    # -- registrations ------------------------------------------------------------------------

    def registered(self, reg: Registration) -> None:
        """A device (re)registered. A fixed allocation needs no fleet view: it is answered at
        once. The others decide for the whole fleet after the registration burst
        (`allocate_all`); later arrivals get the rule's answer for them then."""
        with self._lock:
            self.registrations[reg.device_id] = reg
            if self.allocation is not None and reg.device_id not in self.plans:
                plan = self.plan_late(reg)
                if plan is not None:
                    self.plans[reg.device_id] = plan
            known = self.assignments.get(reg.device_id)
            if known is not None:
                self.publish(reg.device_id, known)  # a restarted board
            elif self.allocation is not None or self.cfg.allocation.mode == "fixed":
                self._assign(reg.device_id, self._strategy_for(reg.device_id))

    def _deploy_widths(self) -> dict[str, int]:
        """Every registered device's deploy width, as planned (`deploy_bits`)."""
        regs = self.registrations
        return {d: deploy_bits(self.cfg, r, self.plans.get(d)) for d, r in regs.items()}

    def fleet(self) -> AllocationInput:
        t = self.cfg.training
        regs = dict(self.registrations)
        return AllocationInput(
            registrations=regs,
            local_epochs=t.local_epochs,
            batch_size=t.batch_size,
            model_bytes=self.model_bytes,
            deploy_widths=self._deploy_widths(),
            ptq_loss=self.ptq_loss,
            measured_t_fp=self.speeds.snapshot(),
        )

    # -- allocation ----------------------------------------------------------------------------

    def allocate_all(self, resumed: bool) -> Allocation:
        """Allocate the registered fleet; on resume, keep what the devices were told before
        (FedMPQ's layer bits too)."""
        stored = self.store.assignments() if resumed else {}
        with self._lock:
            allocation = self.rule.allocate(self.fleet())
            for dev, record in stored.items():
                if dev in allocation.strategies:
                    allocation.strategies[dev] = record.strategy
            self.allocation = allocation
            self.seconds["coarse"] = allocation.seconds
            self.hysteresis.settle(allocation.strategies)
            for dev, strategy in allocation.strategies.items():
                self._assign(dev, strategy)
        counts: dict[str, int] = {}
        for s in allocation.strategies.values():
            counts[s] = counts.get(s, 0) + 1
        log.info("allocation (%s): %s", self.cfg.allocation.mode, counts)
        return allocation

    def assign(self, device: str, strategy: str) -> None:
        """Give `device` the assignment for `strategy` (the fine stage's trials and choice)."""
        with self._lock:
            self._assign(device, strategy)

    def reallocate(self, rnd: int) -> list[Move]:
        """Decide the fleet again before round `rnd` with the speeds its updates measured and
        the PTQ loss last evaluated; move the devices whose new side held `HOLD_ROUNDS`
        decisions (docs/allocation.md#runtime). The fine stage's choices stand until the
        coarse decision itself changes."""
        a = self.cfg.allocation
        if a.mode != "fedhq" or not a.reallocate or self.allocation is None:
            return []
        with self._lock:
            fresh = self.rule.allocate(self.fleet())
            moved = self.hysteresis.decide(fresh.strategies)
            self.allocation.significance.update(fresh.significance)
            self.allocation.acc_factor = fresh.acc_factor
            moves = []
            for dev in moved:
                old = self.assignments[dev].strategy if dev in self.assignments else "-"
                new = fresh.strategies[dev]
                x, y = fresh.significance.get(dev, (0.0, 0.0))
                t_fp = self.speeds.t_fp.get(dev)
                why = f"x={x:.2f} y={y:.2f} {fresh.rules.get(dev, '')}"
                if t_fp is not None:
                    why += f", float step {t_fp * 1e3:.1f} ms (smoothed)"
                if fresh.acc_factor is not None:
                    why += f"; {fresh.acc_factor[1]}"
                self.allocation.strategies[dev] = new
                self.allocation.rules[dev] = fresh.rules.get(dev, "runtime")
                if old != new:
                    moves.append(Move(rnd, dev, old, new, why))
                    self._assign(dev, new)
            self.moves.extend(moves)
        for m in moves:
            log.info("round %d: %s moves %s -> %s (%s)", rnd, m.device, m.old, m.new, m.reason)
        return moves

    def _strategy_for(self, device: str) -> str:
        if self.cfg.allocation.mode == "fixed":
            return self.cfg.allocation.strategy
        if self.allocation is not None and device in self.allocation.strategies:
            return self.allocation.strategies[device]
        late = self.rule.allocate(self.fleet())
        if self.allocation is not None:
            self.allocation.strategies[device] = late.strategies[device]
            if device in late.significance:
                self.allocation.significance[device] = late.significance[device]
            self.allocation.rules[device] = late.rules.get(device, "late")
        return late.strategies[device]

    def _build(self, device: str, strategy: str) -> Assignment:
        reg = self.registrations[device]
        a = self.cfg.allocation
        bits = training_bits(self.cfg, reg)
        bit_set = None
        if strategy == "mqat":
            # Deploy-aware: the widths the fleet deploys at; else every width the board can
            # run or store (a profile's widths are 2..8 bits).
            widths = {*reg.board.storage_bits, *reg.board.deploy_bits}
            if a.mode == "fedhq" and a.deploy_aware:
                widths = {b for b in self._deploy_widths().values() if b <= 8} or widths
            bit_set = tuple(a.bit_set) or tuple(sorted(widths))
        layers = None
        if strategy == "mpq":
            previous = self.assignments.get(device)
            if previous is not None and previous.per_layer_bits and previous.bits == bits:
                layers = previous.per_layer_bits
            elif device in self._restored_layers:
                layers = self._restored_layers[device]
            else:  # at first, the pruning from full width with no sparsity known: sizes decide
                layers = self._prune_grow({}, bits)
        act_bits = a.act_bits if a.act_bits < FLOAT_BITS and strategy in ACT_TRAINED else None
        act_set = tuple(a.act_bit_set) if strategy == "mqat" and a.act_bit_set else None
        return Assignment(
            strategy=strategy,
            bits=bits,
            bit_set=bit_set,
            act_bits=act_bits,
            act_bit_set=act_set,
            per_layer_bits=layers,
            step=a.step if strategy in ("qat", "mqat") and a.step != "frozen" else None,
            lasso=a.mpq_lasso if strategy == "mpq" else None,
            deploy_bits=deploy_bits(self.cfg, reg, self.plans.get(device)),
        )

    def _assign(self, device: str, strategy: str) -> None:
        """Record and send `device`'s assignment; a repeat of the same one is not resent."""
        if device not in self.registrations:
            return
        assignment = self._build(device, strategy)
        if self.assignments.get(device) == assignment:
            return
        self._set(device, assignment)
        self.publish(device, assignment)

    def _set(self, device: str, assignment: Assignment) -> None:
        self.assignments[device] = assignment
        self.store.set_assignment(
            device, assignment.strategy, assignment.bits, assignment.per_layer_bits
        )

    def observe(self, updates: Iterable[Any], ptq_loss: dict[int, float] | None) -> None:
        """What a round measured: each update's training time on its board, and the PTQ loss
        of the last evaluated global model (None: none evaluated yet)."""
        t = self.cfg.training
        for upd in updates:
            assignment = self.assignments.get(upd.device)
            reg = self.registrations.get(upd.device)
            if upd.board_seconds is None or assignment is None or reg is None:
                continue
            quant = assignment.strategy in QUANT_IN_FORWARD
            steps = steps_per_round(upd.n_samples, t.batch_size, t.local_epochs)
            self.speeds.observe(
                upd.device, upd.board_seconds, steps, reg.qat_overhead if quant else 1.0
            )
        if ptq_loss is not None:
            self.ptq_loss = ptq_loss

    # -- FedMPQ ----------------------------------------------------------------------------

    def _budget(self, device: str, assignment: Assignment) -> float:
        """A FedMPQ device's bit budget: its stated one (fractional ones included: "at most"
        2.5 bits per weight), else its training width."""
        reg = self.registrations.get(device)
        stated = None if reg is None else reg.board.budget_bits
        return assignment.bits if stated is None else float(stated)

    def _prune_grow(self, sparsity: Mapping[str, list[float]], budget: float) -> dict[str, int]:
        full = {name: max(SUPPORTED_BITS) for name in self._sizes}
        return prune_grow(sparsity, self._sizes, budget, start=full)

    def update_layer_bits(self, model: nn.Module) -> None:
        """After aggregation, fit each FedMPQ device's layer bits to its budget (paper 002).

        The aggregate holds every device's precision, so each device's bits are pruned down
        from the full width: the layers with the most weights first, sooner where the group
        Lasso emptied their top bit planes (the aggregate's planes at that width), and grown
        back on the smallest layers wherever the budget allows. The new bits are stored, so a
        resumed job goes on from them.
        """
        with self._lock:
            mpq = {d: a for d, a in self.assignments.items() if a.strategy == "mpq"}
        if not mpq:
            return
        sparsity = plane_sparsity(model, max(SUPPORTED_BITS))
        for device, assignment in mpq.items():
            budget = self._budget(device, assignment)
            revised = assignment.with_layer_bits(self._prune_grow(sparsity, budget))
            with self._lock:
                self._set(device, revised)

    # -- what devices are told -------------------------------------------------------------

    def message_body(self, device: str, job_id: str) -> dict[str, Any]:
        """The `assign` body for `device`: its assignment and the job's training settings."""
        t = self.cfg.training
        return {
            "device_id": device,
            **self.assignments[device].to_message(),
            "job": {
                "job_id": job_id,
                "model": self.cfg.model.name,
                "dataset": self.cfg.data.dataset,
                "batch_size": t.batch_size,
                "local_epochs": t.local_epochs,
                "lr": t.lr,
                "optimizer": t.optimizer,
            },
        }
