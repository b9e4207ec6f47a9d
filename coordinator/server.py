"""The coordinator: registers devices, runs federated rounds over MQTT, checkpoints, exports.

One class drives a job from registration to the last export. Network callbacks only parse and
enqueue; the main loop owns the model, so aggregation never races the next dispatch. Every
update is validated against the global model first (`coordinator.validation`). Memory stays
O(model): updates are folded into a running mean as they arrive and then dropped (unless
`[server] aggregation` picks a robust rule, which holds the round's updates).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import queue
import random
import threading
import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from bitfleet import plugins
from bitfleet.data import DATASET_SPECS, ImageData, load_dataset
from bitfleet.models import create_model_for
from bitfleet.protocol import (
    MqttTransport,
    ProtocolError,
    Reassembler,
    Topics,
    decode_message,
    encode_message,
    make_message,
    pack_state,
    parse_broker_url,
    split_payload,
    unpack_state,
    validate_message,
)
from bitfleet.quant import make_method
from bitfleet.training import evaluate

from .allocation import (
    Allocation,
    AllocationInput,
    CostModel,
    choose_assignment,
    make_allocation_rule,
    plan_fine_candidates,
    qat_share,
)
from .checkpoint import load_latest_checkpoint, save_checkpoint
from .config import JobConfig, config_hash
from .state import StateStore
from .strategies import make_aggregator, make_strategy
from .validation import NORMS_KEY, Reference, UpdateValidator

log = logging.getLogger(__name__)

EXPORT_CALIB_SAMPLES = 256
"""Training images that calibrate the exported models' activation ranges."""

MAX_CONCURRENT_UPLOADS = 4096
"""Partial uploads held at once: at least the devices of a round, which upload together."""

MAX_UPDATE_BYTES = 256 * 2**20
"""Largest update the coordinator reassembles; far above any model bitfleet targets."""


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
    dropped: dict[str, int] = field(default_factory=dict)
    """Messages and updates dropped since the job started, per reason."""


@dataclass
class _Update:
    device: str
    round: int
    n_samples: int
    train_loss: float
    train_seconds: float
    board_seconds: float | None
    trial: int | None
    state: dict[str, torch.Tensor]
    payload_bytes: int


class Coordinator:
    """Runs one job (a `JobConfig`) against a broker; `run()` returns when the job is done."""

    def __init__(
        self,
        cfg: JobConfig,
        broker_url: str | None,
        *,
        ca_file: str | None = None,
        on_round: Callable[[RoundReport], None] | None = None,
        data: ImageData | None = None,
        transport_factory: Callable[..., Any] | None = None,
        export: bool = True,
    ) -> None:
        """`transport_factory(client_id, on_message, **options)` replaces the MQTT connection
        (the simulator's in-process bus); `export=False` skips the end-of-job ONNX files."""
        self.cfg = cfg
        if broker_url is None and transport_factory is None:
            raise ValueError("give a broker URL or a transport factory")
        self.address = parse_broker_url(broker_url) if broker_url is not None else None
        self.transport_factory = transport_factory
        self.export = export
        self.ca_file = ca_file
        self.on_round = on_round
        self.topics = Topics(fleet=cfg.job.fleet)
        self.state_dir = Path(cfg.job.state_dir)
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self.store = StateStore(self.state_dir / "state.sqlite")
        self._check_same_job()
        self.job_id = self.store.get_meta("job_id") or uuid.uuid4().hex[:12]
        self.store.set_meta("job_id", self.job_id)
        # Beside the checkpoints, so `bitfleet export --checkpoint STATE_DIR` knows the job.
        (self.state_dir / "job.json").write_text(json.dumps(cfg.to_dict(), indent=2))
        self.spec = DATASET_SPECS[cfg.data.dataset]
        self._data = data
        # The method that prepares, evaluates and deploys the global model. Every method keeps
        # the same state keys (steps are frozen or calibrated, not learned), so devices on
        # different methods average into one model; a mixed fleet deploys through PTQ's
        # calibrated steps, a uniform one through its own method.
        if cfg.allocation.mode == "fixed" and cfg.allocation.strategy != "mpq":
            self.method = make_method(cfg.allocation.strategy, **self._method_options())
        else:
            self.method = make_method("ptq")
        self.allocation_rule = make_allocation_rule(cfg.allocation, cfg.job.seed)
        self.allocation: Allocation | None = None
        self.allocation_seconds = {"coarse": 0.0, "fine": 0.0}
        self.assignments: dict[str, dict[str, Any]] = {}
        self.layer_bits: dict[str, dict[str, int]] = {}
        self._alloc_lock = threading.Lock()
        self.fine_report: dict[str, Any] = {}
        self.model = self._new_model(init=True)
        self.global_state = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
        self.strategy = make_strategy(cfg.server)
        self.validator = UpdateValidator(
            mode=cfg.validation.mode,
            factor=cfg.validation.factor,
            min_history=cfg.validation.min_history,
            window=cfg.validation.window,
        )
        self.reassembler = Reassembler(
            max_bytes=MAX_UPDATE_BYTES,
            max_chunks=MAX_UPDATE_BYTES // 2**20 + 1,
            timeout_s=600,
            max_partial=MAX_CONCURRENT_UPLOADS,
        )
        self.updates: queue.Queue[_Update] = queue.Queue()
        self.registered = threading.Event()
        self.reports: list[RoundReport] = []
        self.dropped: dict[str, int] = {}
        self._stop = threading.Event()
        # The round's tasks not answered yet, by device: sent again when the device or the
        # coordinator reconnects, since a restarted broker forgets what it had not delivered.
        self._outstanding: dict[str, tuple[str, dict[str, Any], bytes]] = {}
        self.exported: dict[str, Path] = {}
        self._eval_thread: threading.Thread | None = None
        self.transport: Any = None

    # -- set-up ---------------------------------------------------------------------------

    def _check_same_job(self) -> None:
        digest = config_hash(self.cfg)
        stored = self.store.get_meta("config_hash")
        if stored is not None and stored != digest:
            raise ValueError(
                f"state directory {self.state_dir} holds a different job (config changed); "
                "use a new [job] state_dir or remove the old one to start over"
            )
        self.store.set_meta("config_hash", digest)

    def _method_options(self) -> dict[str, object]:
        a = self.cfg.allocation
        options: dict[str, object] = {}
        if a.strategy in ("qat", "apqn"):
            options["bits"] = a.bits
        if a.strategy in ("qat", "mqat"):
            options["step"] = a.step
        if a.strategy == "mqat" and a.bit_set:
            options["bit_set"] = tuple(a.bit_set)
        return options

    def _new_model(self, init: bool = False) -> nn.Module:
        """The job's model, prepared by its method; `init` seeds its first weights.

        Only the initial model draws from torch's global generator: evaluation and export
        models are loaded with a state anyway, and reseeding from their threads would change
        what in-process agents (the simulator's) draw at the same moment.
        """
        model = create_model_for(self.cfg.model.name, self.spec)
        if init:
            torch.manual_seed(self.cfg.job.seed)
            for m in model.modules():
                if hasattr(m, "reset_parameters"):
                    m.reset_parameters()
        return self.method.prepare(model)

    @property
    def data(self) -> ImageData:
        if self._data is None:
            self._data = load_dataset(self.cfg.data.dataset, data_dir=self.cfg.data.data_dir)
        return self._data

    # -- network callbacks (paho's thread: parse, validate, enqueue; nothing heavy) ---------

    def _drop(self, reason: str, topic: str, detail: object = "") -> None:
        self.dropped[reason] = self.dropped.get(reason, 0) + 1
        log.warning("dropped message on %s: %s %s", topic, reason, detail)

    def _on_message(self, topic: str, payload: bytes) -> None:
        try:
            kind, device = self.topics.parse(topic)
            if kind == "register":
                self._on_register(device, decode_message(payload, "register"))
            elif kind == "status":
                msg = decode_message(payload, "status")
                self.store.set_online(device, bool(msg["online"]))
                if not msg["online"]:
                    # Its partial upload can never complete. A board that comes back is sent
                    # its task again (`_resend_tasks`) and uploads the whole update anew.
                    self.reassembler.discard_source(device)
            elif kind == "update":
                done = self.reassembler.add(payload, source=device)
                if done is not None:
                    self._on_update(device, done.meta, done.blob)
        except ProtocolError as exc:
            self._drop(exc.reason, topic, exc)

    def _check_registration(self, msg: dict) -> None:
        """What allocation reads from a registration must be usable, or one bad board would
        break every later allocation: a label histogram of this job's classes, a board table
        with positive speed and bandwidth."""
        hist = msg["data"]["label_hist"]
        if len(hist) != self.spec.num_classes:
            raise ProtocolError(
                "bad_register",
                f"label_hist has {len(hist)} classes, the job's data set {self.spec.num_classes}",
            )
        board = msg["profile"].get("board", {})
        if not isinstance(board, dict):
            raise ProtocolError("bad_register", "profile.board must be an object")
        for key in ("relative_speed", "link_mbps", "qat_overhead"):
            value = board.get(key, 1.0)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
                raise ProtocolError("bad_register", f"profile.board.{key} must be > 0: {value!r}")
        steps = msg["profile"].get("step_times")
        if steps is not None and not isinstance(steps, dict):
            raise ProtocolError("bad_register", "profile.step_times must be an object or null")

    def _on_register(self, device: str, msg: dict) -> None:
        if msg["device_id"] != device:
            raise ProtocolError("bad_device_id", f"register for {msg['device_id']} on {device}")
        self._check_registration(msg)
        self.store.upsert_device(device, msg["profile"], msg["data"])
        self.store.set_online(device, True)
        # A fixed allocation needs no fleet view: answer at once. The others decide for the
        # whole fleet after the registration burst (`_allocate_all`); later arrivals get the
        # rule's answer for them in the fleet as it is then.
        with self._alloc_lock:
            if device in self.assignments:
                self._publish_assignment(device, self.assignments[device])  # a restarted board
            elif self.allocation is not None or self.cfg.allocation.mode == "fixed":
                self._assign(device, self._strategy_for(device))
        log.info("registered %s (%s samples)", device, msg["data"].get("n_samples"))
        self.registered.set()
        self._resend_tasks([device])

    # -- allocation: who trains how, at which bits -------------------------------------------

    def _fleet(self) -> AllocationInput:
        devices = self.store.devices()
        return AllocationInput(
            profiles={d.id: d.profile for d in devices},
            data={d.id: d.data for d in devices},
            local_epochs=self.cfg.training.local_epochs,
            batch_size=self.cfg.training.batch_size,
            model_bytes=sum(v.numel() * v.element_size() for v in self.global_state.values()),
        )

    def _strategy_for(self, device: str) -> str:
        if self.cfg.allocation.mode == "fixed":
            return self.cfg.allocation.strategy
        if self.allocation is not None and device in self.allocation.strategies:
            return self.allocation.strategies[device]
        late = self.allocation_rule.allocate(self._fleet())
        if self.allocation is not None:
            self.allocation.strategies[device] = late.strategies[device]
            if device in late.significance:
                self.allocation.significance[device] = late.significance[device]
            self.allocation.rules[device] = late.rules.get(device, "late")
        return late.strategies[device]

    def device_budget(self, profile: dict) -> int:
        """A device's training bits: the job's `bits`, or its profile's budget."""
        a = self.cfg.allocation
        if a.bits_from == "job":
            return a.bits
        from .mpq import device_budget

        return device_budget(profile)

    def _assign(self, device: str, strategy: str) -> None:
        """Record and send `device`'s assignment; a repeat of the same one is not resent."""
        record = self.store.device(device)
        if record is None:
            return
        a = self.cfg.allocation
        board = record.profile.get("board", {})
        bits = self.device_budget(record.profile)
        body: dict[str, Any] = {
            "strategy": strategy,
            "bits": bits,
            "bit_set": None,
            "per_layer_bits": None,
        }
        if strategy in ("qat", "mqat") and a.step != "frozen":
            body["step"] = a.step
        if strategy == "mqat":
            supported = {*board.get("storage_bits", []), *board.get("deploy_bits", [])}
            body["bit_set"] = list(a.bit_set) or sorted(b for b in supported if 2 <= b <= 8)
        if strategy == "mpq":
            body["per_layer_bits"] = self._mpq_layer_bits(device, bits)
            body["lasso"] = a.mpq_lasso
        if self.assignments.get(device) == body:
            return
        self.assignments[device] = body
        self.store.set_assignment(device, strategy, bits, body["per_layer_bits"])
        self._publish_assignment(device, body)

    def _allocate_all(self, resumed: bool) -> None:
        """Allocate the registered fleet; on resume, keep what the devices were told before."""
        stored = self.store.assignments() if resumed else {}
        with self._alloc_lock:
            fleet = self._fleet()
            allocation = self.allocation_rule.allocate(fleet)
            for dev, record in stored.items():
                if dev in allocation.strategies:
                    allocation.strategies[dev] = record.strategy
            self.allocation = allocation
            self.allocation_seconds["coarse"] = allocation.seconds
            for dev, strategy in allocation.strategies.items():
                self._assign(dev, strategy)
        a = self.cfg.allocation
        if a.mode == "fedhq" and a.fine and allocation.ambiguous and not stored:
            self._fine_stage(fleet, allocation)
        counts: dict[str, int] = {}
        for s in allocation.strategies.values():
            counts[s] = counts.get(s, 0) + 1
        log.info("allocation (%s): %s", a.mode, counts)

    def _assignment_body(self, device: str) -> dict[str, Any]:
        t = self.cfg.training
        return {
            "device_id": device,
            **self.assignments[device],
            "job": {
                "job_id": self.job_id,
                "model": self.cfg.model.name,
                "dataset": self.cfg.data.dataset,
                "batch_size": t.batch_size,
                "local_epochs": t.local_epochs,
                "lr": t.lr,
                "optimizer": t.optimizer,
            },
        }

    def _publish_assignment(self, device: str, body: dict[str, Any]) -> None:
        if self.transport is not None:
            message = encode_message("assign", self._assignment_body(device))
            self.transport.publish(self.topics.assign(device), message)

    def _on_update(self, device: str, meta: dict, blob: bytes) -> None:
        msg = validate_message(meta, "update")
        if msg["job_id"] != self.job_id:
            raise ProtocolError("wrong_job", f"update for job {msg['job_id']}")
        state = unpack_state(blob)
        board_s = msg.get("board_seconds")
        trial = msg.get("trial")
        self.updates.put(
            _Update(
                device=device,
                round=int(msg["round"]),
                n_samples=int(msg["n_samples"]),
                train_loss=float(msg["train_loss"]),
                train_seconds=float(msg["train_seconds"]),
                board_seconds=max(0.0, float(board_s))
                if isinstance(board_s, (int, float)) and not isinstance(board_s, bool)
                else None,
                trial=trial if isinstance(trial, int) and not isinstance(trial, bool) else None,
                state=state,
                payload_bytes=len(blob),
            )
        )

    # -- the job ----------------------------------------------------------------------------

    def stop(self) -> None:
        """Ask the main loop to finish after the current step (SIGTERM, Ctrl-C)."""
        self._stop.set()

    def run(self) -> list[RoundReport]:
        start_round = self._resume()
        self.transport = self._connect(
            client_id=f"bitfleet-coordinator-{self.cfg.job.fleet}",
            on_message=self._on_message,
            subscriptions=[self.topics.all(k) for k in ("register", "status", "update")],
            on_connect=self._resend_tasks,
            ca_file=self.ca_file,
        )
        self.transport.start(timeout=30)
        try:
            self._wait_for_devices()
            self._settle_registrations()
            self._allocate_all(resumed=start_round > 0)
            for rnd in range(start_round, self.cfg.training.rounds):
                if self._stop.is_set():
                    break
                self._run_round(rnd)
            self._join_evaluation()
            if not self._stop.is_set() and self.export:
                self._export_models()
        finally:
            self._join_evaluation()
            self.transport.stop()
        return self.reports

    def _connect(self, **options: Any) -> Any:
        if self.transport_factory is not None:
            return self.transport_factory(**options)
        return MqttTransport(self.address, **options)

    def _resume(self) -> int:
        """Start after the last checkpoint; forget rounds that never reached one."""
        found = load_latest_checkpoint(self.state_dir)
        if found is None:
            self.store.rollback_to(None)
            return 0
        rnd, model_state, server_state = found
        self.model.load_state_dict(model_state)
        self.global_state = {k: v.clone() for k, v in model_state.items()}
        validator_state = {k: v for k, v in server_state.items() if k == NORMS_KEY}
        self.validator.load_state_dict(validator_state)
        self.strategy.load_state_dict(
            {k: v for k, v in server_state.items() if k not in validator_state}
        )
        self.store.rollback_to(rnd)
        if self.store.last_completed_round() != rnd:
            # Killed between the checkpoint and the SQLite close: the checkpoint is the truth.
            self.store.close_round(rnd, None, None, 0, 0.0)
        log.warning("resuming job %s after round %d", self.job_id, rnd)
        return rnd + 1

    def _wait_for_devices(self) -> None:
        need = self.cfg.rounds.min_devices
        deadline = time.monotonic() + self.cfg.rounds.register_timeout_s
        while self.store.count_devices(online_only=True) < need:
            if self._stop.is_set():
                return
            if time.monotonic() > deadline:
                have = self.store.count_devices(online_only=True)
                raise TimeoutError(
                    f"only {have} of the {need} devices needed registered within "
                    f"{self.cfg.rounds.register_timeout_s:.0f} s ([rounds] min_devices)"
                )
            self.registered.wait(0.2)
            self.registered.clear()

    def _settle_registrations(self, quiet_s: float = 1.0, limit_s: float = 10.0) -> None:
        """Before the first round, let a burst of registrations finish (retained ones arrive
        right after subscribing), so round 0 includes every board that is already there."""
        end = time.monotonic() + limit_s
        self.registered.clear()
        while time.monotonic() < end and self.registered.wait(quiet_s):
            self.registered.clear()

    def _select(self, rnd: int) -> list[str]:
        """This round's devices: drawn from a generator seeded by the job and the round, so
        a coordinator resumed after a crash selects what an uninterrupted run would."""
        online = sorted(
            d.id for d in self.store.devices(online_only=True) if d.id in self.assignments
        )
        k = max(self.cfg.rounds.min_devices, math.ceil(self.cfg.rounds.fraction * len(online)))
        rng = random.Random(f"{self.cfg.job.seed}:{rnd}")
        return sorted(rng.sample(online, min(k, len(online))))

    def _dispatch(
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
        assert self.transport is not None
        self._outstanding = {}
        for device in selected:
            body = {**task, "assignment": self._assignment_body(device)}
            message = make_message("task", body)
            self._outstanding[device] = (self.topics.task(device), message, blob)
            self.transport.publish_many(
                self.topics.task(device), split_payload("task", message, blob)
            )
        return len(blob)

    def _resend_tasks(self, devices: Iterable[str] | None = None) -> None:
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
                self.transport.publish_many(topic, split_payload("task", message, blob), wait=False)

    def _run_round(self, rnd: int) -> None:
        t_start = time.perf_counter()
        self._wait_for_devices()
        selected = self._select(rnd)
        self.store.open_round(rnd, selected)
        payload_bytes = self._dispatch(
            rnd, selected, self.global_state, self.cfg.training.local_epochs
        )
        dispatch_s = time.perf_counter() - t_start
        dropped_before = dict(self.dropped)
        mean, received, wait_s, fold_s = self._collect(rnd, selected)
        if not received:
            return  # stopped before any update arrived; the round reruns on resume
        t_close = time.perf_counter()
        self.global_state = self.strategy.apply(self.global_state, mean.mean())
        self.model.load_state_dict(self.global_state)
        server_state = {**self.strategy.state_dict(), **self.validator.state_dict()}
        save_checkpoint(self.state_dir, rnd, self.global_state, server_state)
        self._update_layer_bits()
        stragglers = [d for d in selected if d not in received]
        host_s = time.perf_counter() - t_start
        dropped = dict(self.dropped)
        this_round = {
            r: n - dropped_before.get(r, 0)
            for r, n in dropped.items()
            if n > dropped_before.get(r, 0)
        }
        if this_round:
            log.warning("round %d dropped %s (since start: %s)", rnd, this_round, dropped)
        report = RoundReport(
            round=rnd,
            selected=selected,
            received=sorted(received),
            stragglers=stragglers,
            train_loss=sum(u.train_loss * u.n_samples for u in received.values())
            / sum(u.n_samples for u in received.values()),
            host_seconds=host_s,
            wait_seconds=wait_s,
            overhead_seconds=dispatch_s + fold_s + (time.perf_counter() - t_close),
            sim_seconds=self._simulated_seconds(received.values(), payload_bytes),
            dropped=dropped,
        )
        self.store.close_round(rnd, None, None, len(stragglers), host_s, report.sim_seconds)
        self.reports.append(report)
        self._evaluate_async(report, {k: v.clone() for k, v in self.global_state.items()})

    def _collect(
        self,
        rnd: int,
        selected: list[str],
        trial: int | None = None,
        reference: dict[str, torch.Tensor] | None = None,
    ) -> tuple[Any, dict[str, _Update], float, float]:
        """Fold the round's updates as they arrive until all, or quorum by the deadline.

        Returns the aggregate, the updates by device (their tensors already folded), and the
        seconds spent waiting and folding. Trial rounds (`trial`) leave no trace in the store.
        Updates are judged against `reference`, the model the devices were sent (default: the
        global model; a trial round after the first sends the previous trial's mean).
        """
        rc = self.cfg.rounds
        mean = make_aggregator(
            self.cfg.server.aggregation, self.global_state, trim=self.cfg.server.trim
        )
        # Flattened once for all of the round's updates.
        judge_by = Reference(self.global_state if reference is None else reference)
        received: dict[str, _Update] = {}
        quorum = max(1, math.ceil(rc.quorum * len(selected)))
        deadline = time.monotonic() + rc.deadline_s
        wait_s = 0.0
        fold_s = 0.0
        while len(received) < len(selected) and not self._stop.is_set():
            now = time.monotonic()
            if now >= deadline and len(received) >= quorum:
                break
            if now >= deadline + rc.deadline_s:  # a second deadline without quorum: go on
                log.warning("round %d: only %d of %d updates", rnd, len(received), quorum)
                if received:
                    break
                deadline = now + rc.deadline_s
            t_wait = time.perf_counter()
            try:
                upd = self.updates.get(timeout=0.2)
            except queue.Empty:
                wait_s += time.perf_counter() - t_wait
                continue
            wait_s += time.perf_counter() - t_wait
            t_fold = time.perf_counter()
            if upd.round != rnd or upd.device not in selected or upd.trial != trial:
                self._drop("late_or_unexpected", f"update/{upd.device}", f"round {upd.round}")
                continue
            # Before record_update: a forged update must not use up the device's slot.
            verdict = self.validator.check(upd.state, judge_by)
            if verdict.reason is not None:
                self._drop(verdict.reason, f"update/{upd.device}", verdict.detail)
                continue
            if upd.device in received or (
                trial is None
                and not self.store.record_update(
                    rnd, upd.device, upd.n_samples, upd.train_loss, upd.train_seconds
                )
            ):
                self._drop("duplicate", f"update/{upd.device}", f"round {rnd}")
                continue
            try:
                mean.add(verdict.update, float(upd.n_samples))  # checked: not checked again
            except ValueError as exc:
                self._drop("bad_update", f"update/{upd.device}", exc)
                continue
            if trial is None:  # a trial's short update must not set the norm scale
                self.validator.observe(verdict)
            if verdict.scale < 1:
                log.warning("round %d: clipped %s's update: %s", rnd, upd.device, verdict.detail)
            received[upd.device] = upd
            self._outstanding.pop(upd.device, None)
            fold_s += time.perf_counter() - t_fold
        self._outstanding = {}
        return mean, received, wait_s, fold_s

    def _simulated_seconds(self, updates: Iterable[_Update], payload_bytes: int) -> float:
        """The round's wall clock on the real boards: the slowest participant (DESIGN 5).

        A device states its training time on its board (`board_seconds`: measured on a real
        board, modelled on a virtual one); an older agent's host seconds are scaled by its
        profile's relative speed. Transfer time comes from the profile's link bandwidth.
        """
        profiles = {d.id: d.profile for d in self.store.devices()}
        longest = 0.0
        for upd in updates:
            board = profiles.get(upd.device, {}).get("board", {})
            speed = float(board.get("relative_speed", 1.0)) or 1.0
            mbps = float(board.get("link_mbps", 100.0)) or 100.0
            comm = 2 * payload_bytes * 8 / (mbps * 1e6)
            train = upd.train_seconds / speed if upd.board_seconds is None else upd.board_seconds
            longest = max(longest, train + comm)
        return longest

    # -- FedHQ's fine stage: short trial rounds, a fitted cost model, a chosen assignment ----

    def _fine_stage(self, fleet: AllocationInput, allocation: Allocation) -> None:
        """Revisit the ambiguous devices with trial rounds (DESIGN 4, the fine adjustment).

        Each candidate QAT set among the ambiguous devices trains `fine_rounds` short rounds
        from the current global model, without committing them; the accuracy gained at the
        lowest deploy width and the simulated round time feed `CostModel`, and
        `choose_assignment` picks the set that maximises accuracy at the job's time weight.
        """
        t0 = time.perf_counter()
        a = self.cfg.allocation
        points, ambiguous = allocation.significance, allocation.ambiguous
        costs = {c.device: c for c in fleet.costs(a.calib_batches)}
        fixed = {d: s for d, s in allocation.strategies.items() if d not in ambiguous}

        def strategies(qat: frozenset[str]) -> dict[str, str]:
            hybrid = {d: a.qat_strategy if d in qat else a.ptq_strategy for d in ambiguous}
            return {**fixed, **hybrid}

        def predicted(qat: frozenset[str]) -> float:
            return max(costs[d].round_seconds(s) for d, s in strategies(qat).items())

        bits = min(self.cfg.deploy.bits)
        base_acc = self.evaluate_state(self.global_state, bits)
        selected = sorted(d.id for d in self.store.devices(online_only=True))
        candidates = plan_fine_candidates(ambiguous, points, a.fine_candidates)
        shares, gains, preds, measured = [], [], [], []
        trial = 0
        for qat in candidates:
            for dev, strategy in strategies(qat).items():
                self._assign(dev, strategy)
            state = {k: v.clone() for k, v in self.global_state.items()}
            seconds = 0.0
            for _ in range(a.fine_rounds):
                payload = self._dispatch(0, selected, state, a.fine_epochs, trial=trial)
                mean, received, _, _ = self._collect(0, selected, trial=trial, reference=state)
                trial += 1
                if not received:
                    return  # stopped
                state = {**state, **mean.mean()}  # the mean holds no integer buffers
                seconds += self._simulated_seconds(received.values(), payload)
            shares.append(qat_share(qat, ambiguous, points))
            gains.append(self.evaluate_state(state, bits) - base_acc)
            preds.append(predicted(qat) * a.fine_epochs / self.cfg.training.local_epochs)
            measured.append(seconds / a.fine_rounds)
        model = CostModel.fit(shares, gains, preds, measured)
        r_ptq = max(c.ptq_round for c in costs.values())
        r_qat = max(c.qat_round for c in costs.values())
        chosen = choose_assignment(model, ambiguous, points, predicted, r_ptq, r_qat, a.time_weight)
        for dev, strategy in strategies(chosen).items():
            allocation.strategies[dev] = strategy
            if dev in ambiguous:
                allocation.rules[dev] = "fine_qat" if dev in chosen else "fine_ptq"
            self._assign(dev, strategy)
        self.allocation_seconds["fine"] = time.perf_counter() - t0
        self.fine_report = {
            "trial_sim_seconds_total": sum(measured) * a.fine_rounds,
            "candidates": [sorted(q) for q in candidates],
            "qat_share": shares,
            "acc_gain": gains,
            "trial_sim_seconds": measured,
            "acc_coef": list(model.acc_coef),
            "time_scale": model.time_scale,
            "chosen_qat": sorted(chosen),
        }
        log.info("fine stage: QAT for %s among ambiguous %s", sorted(chosen), ambiguous)

    # -- FedMPQ: per-layer bits under each device's budget ------------------------------------

    def _mpq_layer_bits(self, device: str, budget: int) -> dict[str, int]:
        """The device's per-layer bits: last round's pruning-growing, or at first the same
        pruning from the global model's full width with no sparsity known (sizes decide)."""
        if device not in self.layer_bits:
            self.layer_bits[device] = self._prune_grow({}, budget)
        return self.layer_bits[device]

    def _prune_grow(self, sparsity: dict[str, list[float]], budget: int) -> dict[str, int]:
        from bitfleet.quant import SUPPORTED_BITS
        from bitfleet.quant.mpq import layer_sizes

        from .mpq import prune_grow

        sizes = layer_sizes(self.model)
        full = {name: max(SUPPORTED_BITS) for name in sizes}
        return prune_grow(sparsity, sizes, budget, start=full)

    def _update_layer_bits(self) -> None:
        """After aggregation, fit each FedMPQ device's layer bits to its budget (paper 002).

        The aggregate holds every device's precision, so each device's bits are pruned down
        from the full width: the layers with the most weights first, sooner where the group
        Lasso emptied their top bit planes (the aggregate's planes at that width), and grown
        back on the smallest layers wherever the budget allows.
        """
        with self._alloc_lock:
            mpq = {d: b for d, b in self.assignments.items() if b["strategy"] == "mpq"}
        if not mpq:
            return
        from bitfleet.quant import SUPPORTED_BITS
        from bitfleet.quant.mpq import plane_sparsity

        sparsity = plane_sparsity(self.model, max(SUPPORTED_BITS))
        for device, body in mpq.items():
            self.layer_bits[device] = self._prune_grow(sparsity, body["bits"])
            with self._alloc_lock:
                self.assignments[device] = {**body, "per_layer_bits": self.layer_bits[device]}

    def device_deploy_bits(self, device: str) -> int | dict[str, int]:
        """What `device` deploys: its FedMPQ layer bits, its budget, or the job's rule."""
        record = self.store.device(device)
        profile = record.profile if record is not None else {}
        if device in self.layer_bits:
            return self.layer_bits[device]
        if self.cfg.allocation.bits_from == "profile":
            return self.device_budget(profile)
        return self.device_bits(profile)

    def evaluate_state(self, state: dict[str, torch.Tensor], bits: int | dict[str, int]) -> float:
        """Test accuracy of `state` deployed at `bits` (one width, or per layer)."""
        model = self._new_model()
        model.load_state_dict(state)
        x, y = self._test_set()
        return evaluate(self.method.deploy(model, bits), x, y)

    # -- evaluation runs beside the next round, off the critical path -----------------------

    def _evaluate_async(self, report: RoundReport, state: dict[str, torch.Tensor]) -> None:
        self._join_evaluation()

        def work() -> None:
            model = self._new_model()
            model.load_state_dict(state)
            x, y = self._test_set()
            report.acc_fp32 = evaluate(self.method.deploy(model, 32), x, y)
            for bits in self.cfg.deploy.bits:
                report.acc_deploy[str(bits)] = evaluate(self.method.deploy(model, bits), x, y)
            self.store.set_round_accuracy(report.round, report.acc_fp32, report.acc_deploy)
            if self.on_round is not None:
                self.on_round(report)

        self._eval_thread = threading.Thread(target=work, name=f"eval-{report.round}")
        self._eval_thread.start()

    def _join_evaluation(self) -> None:
        if self._eval_thread is not None:
            self._eval_thread.join()
            self._eval_thread = None

    def _test_set(self) -> tuple[torch.Tensor, torch.Tensor]:
        n = self.cfg.data.test_samples
        x, y = self.data.test_x, self.data.test_y
        return (x[:n], y[:n]) if n else (x, y)

    # -- the end of the job: one quantized ONNX model per device ----------------------------

    def device_bits(self, profile: dict) -> int:
        """The board's deploy bit-width among the job's (DESIGN section 6).

        Speed-bound boards (int8 kernels) take the lowest width they run fast; storage-bound
        ones (`preferred_storage = "packed"`) the lowest they can store. When none of the job's
        widths fits, the widest one.
        """
        from .mpq import device_budget

        return device_budget(profile, self.cfg.deploy.bits)

    def _export_models(self) -> dict[str, Path]:
        exporter = plugins.load("bitfleet.exporters", "onnx")
        out_dir = self.state_dir / "exports"
        last = self.reports[-1] if self.reports else None
        calib = self.data.train_x[:EXPORT_CALIB_SAMPLES].float().div(255).numpy()
        shape = (self.spec.in_channels, self.spec.image_size, self.spec.image_size)
        by_kind: dict[tuple[str, str], Path] = {}
        for device in self.store.devices():
            bits = self.device_deploy_bits(device.id)
            storage = device.profile.get("board", {}).get("preferred_storage", "int8")
            if isinstance(bits, dict):  # FedMPQ: per-layer bits, named by their digest
                digest = hashlib.sha256(json.dumps(bits, sort_keys=True).encode()).hexdigest()
                tag = f"mixed{sum(bits.values()) / len(bits):.1f}-{digest[:6]}"
            else:
                tag = f"{bits}bit"
            if (tag, storage) not in by_kind:
                model = self._new_model()
                model.load_state_dict(self.global_state)
                self.method.deploy(model, bits)
                name = f"{self.cfg.model.name}-{tag}-{storage}.onnx"
                by_kind[tag, storage] = exporter(
                    model,
                    out_dir / name,
                    shape,
                    storage=storage,
                    activations=storage == "int8",
                    calib=calib,
                    metadata={
                        "strategy": self.cfg.allocation.strategy,
                        "source_round": last.round if last else None,
                        "job_id": self.job_id,
                        "accuracy_pytorch": last.acc_deploy.get(str(bits)) if last else None,
                        "class_labels": list(self.spec.class_names),
                    },
                ).path
            path = by_kind[tag, storage]
            self.exported[device.id] = path
            meta = {
                "job_id": self.job_id,
                "bits": bits if isinstance(bits, int) else max(bits.values()),
                "per_layer_bits": bits if isinstance(bits, dict) else None,
                "storage": storage,
                "filename": f"{self.job_id}-{path.name}",
            }
            chunks = split_payload("model", make_message("model", meta), path.read_bytes())
            assert self.transport is not None
            self.transport.publish_many(self.topics.model(device.id), chunks)
        return self.exported
