"""The coordinator daemon: drives one job from registration to the last device's model.

The loop only drives; each job has a collaborator of its own (docs/round.md):
- `Intake` turns broker messages into validated registrations and updates;
- `Assigner` decides each device's `Assignment` (the allocation rules, FedMPQ's layer bits);
- `RoundRunner` dispatches tasks, collects updates with deadline and quorum, and prices a
  round on the boards' clock; FedHQ's fine stage (`run_fine_stage`) runs its trials through it;
- the server optimiser (`coordinator.server_optimizers`) turns a round's mean into the next
  global model, which is checkpointed before anything else happens;
- `Evaluator` scores each round beside the next; `DeployStage` plans every device's deploy
  width before training and sends each its best candidate at the end.
Network callbacks only parse and enqueue; this loop owns the model, so aggregation never races
the next dispatch. `run()` returns a `JobResult`, the public account of the job.
"""

from __future__ import annotations

import json
import logging
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bitfleet.assignment import Assignment
from bitfleet.data import DATASET_SPECS, ImageData, carve_validation, load_dataset
from bitfleet.deploy import DeployChoice
from bitfleet.protocol import BrokerAddress, MqttTransport, Topics, encode_message, parse_broker_url
from bitfleet.quant.modules import BitMap
from bitfleet.registration import Registration

from .assigner import Assigner
from .checkpoint import load_latest_checkpoint, save_checkpoint
from .config import JobConfig, config_hash
from .deployment import DeployStage
from .evaluation import Evaluator
from .fine_stage import run_fine_stage
from .global_model import GlobalModel, StateDict
from .intake import Intake
from .results import JobResult, RoundReport
from .rounds import RoundRunner
from .server_optimizers import make_server_optimizer
from .state import StateStore
from .validation import NORMS_KEY, UpdateValidator

log = logging.getLogger(__name__)


class Coordinator:
    """Runs one job (a `JobConfig`) against a broker; `run()` returns when the job is done."""

    def __init__(
        self,
        cfg: JobConfig,
        broker_url: str | BrokerAddress | None,
        *,
        ca_file: str | None = None,
        on_round: Callable[[RoundReport], None] | None = None,
        data: ImageData | None = None,
        transport_factory: Callable[..., Any] | None = None,
        export: bool = True,
    ) -> None:
        """`transport_factory(client_id, on_message, **options)` replaces the MQTT connection
        (the simulator's in-process bus); `export=False` skips the end-of-job ONNX files."""
        if broker_url is None and transport_factory is None:
            raise ValueError("give a broker URL or a transport factory")
        self.cfg = cfg
        self.address = parse_broker_url(broker_url) if broker_url is not None else None
        self.transport_factory = transport_factory
        self.export = export
        self.ca_file = ca_file
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
        self.model = GlobalModel(cfg, self.spec)
        self.optimizer = make_server_optimizer(cfg.server)
        v = cfg.validation
        self.validator = UpdateValidator(
            mode=v.mode, factor=v.factor, min_history=v.min_history, window=v.window
        )
        self.registered = threading.Event()
        self.listening = threading.Event()
        """Set once the coordinator is connected and subscribed: boards may start."""
        self.reports: list[RoundReport] = []
        self.fine: dict[str, Any] = {}
        self.deploy: dict[str, DeployChoice] = {}
        self.exported: dict[str, Path] = {}
        self.export_failures: dict[str, str] = {}
        self._stop = threading.Event()
        self.transport: Any = None
        self.intake = Intake(
            self.topics,
            self.store,
            job_id=self.job_id,
            num_classes=self.spec.num_classes,
            update_bytes=self.model.payload_bytes,
            on_register=self._on_register,
        )
        self.deployment = DeployStage(
            cfg,
            self.model,
            self.intake,
            self.topics,
            job_id=self.job_id,
            state_dir=self.state_dir,
            transport=lambda: self.transport,
            data=lambda: self.data,
            held_out=lambda: self.evaluator.held_out(),
            online=lambda: {d.id for d in self.store.devices(online_only=True)},
            stop=self._stop,
        )
        self.assigner = Assigner(
            cfg,
            self.store,
            self.model.module,
            model_bytes=self.model.payload_bytes,
            publish=self._publish_assignment,
            plan_late=self.deployment.plan_late,
        )
        self.runner = RoundRunner(
            cfg,
            job_id=self.job_id,
            topics=self.topics,
            store=self.store,
            intake=self.intake,
            validator=self.validator,
            registrations=lambda: self.assigner.registrations,
            assignment_body=lambda device: self.assigner.message_body(device, self.job_id),
            transport=lambda: self.transport,
            stop=self._stop,
        )
        self.evaluator = Evaluator(cfg, self.model, self.store, lambda: self.data, on_round)

    def _check_same_job(self) -> None:
        digest = config_hash(self.cfg)
        stored = self.store.get_meta("config_hash")
        if stored is not None and stored != digest:
            raise ValueError(
                f"state directory {self.state_dir} holds a different job (config changed); "
                "use a new [job] state_dir or remove the old one to start over"
            )
        self.store.set_meta("config_hash", digest)

    @property
    def data(self) -> ImageData:
        """The job's data set, its validation split carved (bitfleet/data/validation.py)."""
        if self._data is None:
            self._data = load_dataset(self.cfg.data.dataset, data_dir=self.cfg.data.data_dir)
        self._data = carve_validation(self._data, self.cfg.data.validation_fraction)
        return self._data

    @property
    def dropped(self) -> dict[str, int]:
        """Messages and updates dropped since the job started, per reason."""
        return self.intake.dropped

    def pending_updates(self) -> int:
        """Updates received but not folded yet (what the fold still owes in memory)."""
        return self.intake.updates.qsize()

    def evaluate_state(
        self, state: StateDict, bits: BitMap, act_bits: int | None = None, split: str = "test"
    ) -> float:
        """Accuracy of `state` deployed at `bits` (one width, or per layer), with `act_bits`
        activations (None: float), on the test split (what reports show) or "validation"."""
        return self.evaluator.accuracy(state, bits, act_bits, split=split)

    # -- messages ---------------------------------------------------------------------------

    def _on_register(self, reg: Registration) -> None:
        self.assigner.registered(reg)
        self.registered.set()
        self.runner.resend([reg.device_id])

    def _publish_assignment(self, device: str, assignment: Assignment) -> None:
        if self.transport is not None:
            body = self.assigner.message_body(device, self.job_id)
            self.transport.publish(self.topics.assign(device), encode_message("assign", body))

    # -- the job ----------------------------------------------------------------------------

    def stop(self) -> None:
        """Ask the main loop to finish after the current step (SIGTERM, Ctrl-C)."""
        self._stop.set()

    def run(self) -> JobResult:
        start_round = self._resume()
        # The data before the broker: a missing data set fails at once, not after a round, and
        # its size bounds the sample counts devices may register (docs/security.md).
        self.intake.max_samples = len(self.data.train_y)
        options = dict(
            client_id=f"bitfleet-coordinator-{self.cfg.job.fleet}",
            on_message=self.intake.on_message,
            subscriptions=[self.topics.all(k) for k in ("register", "status", "update", "timing")],
            on_connect=self.runner.resend,
            ca_file=self.ca_file,
        )
        if self.transport_factory is not None:
            self.transport = self.transport_factory(**options)
        else:
            self.transport = MqttTransport(self.address, **options)
        self.transport.start(timeout=30)
        self.listening.set()
        try:
            self._wait_for_devices()
            self._settle_registrations()
            self.assigner.plans = self.deployment.plan(self.assigner.registrations)
            self._allocate(resumed=start_round > 0)
            for rnd in range(start_round, self.cfg.training.rounds):
                if self._stop.is_set():
                    break
                self._run_round(rnd)
            self.evaluator.join()
            if not self._stop.is_set() and self.export:
                self._export()
        finally:
            self.evaluator.join()
            self.transport.stop()
        return self.result()

    def result(self) -> JobResult:
        """The job as it stands: after `run()`, what it produced."""
        return JobResult(
            job_id=self.job_id,
            reports=list(self.reports),
            global_state=self.model.state,
            assignments=dict(self.assigner.assignments),
            registrations=dict(self.assigner.registrations),
            allocation=self.assigner.allocation,
            allocation_seconds=dict(self.assigner.seconds),
            fine=dict(self.fine),
            exported=dict(self.exported),
            export_failures=dict(self.export_failures),
            dropped=dict(self.dropped),
            deploy=dict(self.deploy),
            plans=dict(self.assigner.plans),
            moves=list(self.assigner.moves),
        )

    def _resume(self) -> int:
        """Start after the last checkpoint; forget rounds that never reached one."""
        found = load_latest_checkpoint(self.state_dir)
        if found is None:
            self.store.rollback_to(None)
            self.assigner.restore()
            return 0
        rnd, model_state, server_state = found
        self.model.load(model_state)
        validator_state = {k: v for k, v in server_state.items() if k == NORMS_KEY}
        self.validator.load_state_dict(validator_state)
        self.optimizer.load_state_dict(
            {k: v for k, v in server_state.items() if k not in validator_state}
        )
        self.store.rollback_to(rnd)
        self.assigner.restore()
        if self.store.last_completed_round() != rnd:
            # Killed between the checkpoint and the SQLite close: the checkpoint is the truth,
            # and FedMPQ's layer bits are refitted to it as the round's close would have.
            self.store.close_round(rnd, None, None, 0, 0.0)
            self.assigner.update_layer_bits(self.model.module)
        log.warning("resuming job %s after round %d", self.job_id, rnd)
        return rnd + 1

    def _wait_for_devices(self, patience_s: float | None = None) -> None:
        """Wait for `[rounds] min_devices` online devices, up to the registration timeout;
        before a later round (`patience_s`), go on after that long with whoever is online,
        so a device marked offline for a missed task costs the job one wait at most."""
        need = self.cfg.rounds.min_devices
        start = time.monotonic()
        while (have := self.store.count_devices(online_only=True)) < need:
            if self._stop.is_set():
                return
            waited = time.monotonic() - start
            if patience_s is not None and have > 0 and waited > patience_s:
                log.warning("%d of the %d devices wanted are online: going on", have, need)
                return
            if waited > self.cfg.rounds.register_timeout_s:
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

    def _allocate(self, resumed: bool) -> None:
        allocation = self.assigner.allocate_all(resumed)
        a = self.cfg.allocation
        if a.mode == "fedhq" and a.fine and allocation.ambiguous and not resumed:
            online = sorted(d.id for d in self.store.devices(online_only=True))
            self.fine = (
                run_fine_stage(
                    self.cfg,
                    self.assigner.fleet(),
                    allocation,
                    state=self.model.state,
                    selected=online,
                    assigner=self.assigner,
                    runner=self.runner,
                    evaluator=self.evaluator,
                )
                or {}
            )

    def _run_round(self, rnd: int) -> None:
        t_start = time.perf_counter()
        self._wait_for_devices(patience_s=self.cfg.rounds.deadline_s)
        self.assigner.reallocate(rnd)
        selected = self.runner.select(rnd, self.assigner.assignments)
        self.store.open_round(rnd, selected)
        dropped_before = dict(self.dropped)
        result = self.runner.run(rnd, selected, self.model.state, self.cfg.training.local_epochs)
        received = result.received
        if not received:
            return  # stopped before any update arrived; the round reruns on resume
        t_close = time.perf_counter()
        self.model.load(self.optimizer.apply(self.model.state, result.aggregate.mean()))
        server_state = {**self.optimizer.state_dict(), **self.validator.state_dict()}
        save_checkpoint(self.state_dir, rnd, self.model.state, server_state)
        self.assigner.update_layer_bits(self.model.module)
        self.assigner.observe(received.values(), self._ptq_loss())
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
        n_total = sum(u.n_samples for u in received.values())
        report = RoundReport(
            round=rnd,
            selected=selected,
            received=sorted(received),
            stragglers=stragglers,
            train_loss=sum(u.train_loss * u.n_samples for u in received.values()) / n_total,
            host_seconds=host_s,
            wait_seconds=result.wait_seconds,
            overhead_seconds=result.dispatch_seconds
            + result.fold_seconds
            + (time.perf_counter() - t_close),
            sim_seconds=result.sim_seconds,
            dropped=dropped,
        )
        self.store.close_round(rnd, None, None, len(stragglers), host_s, report.sim_seconds)
        self.reports.append(report)
        # `load` replaces the state with new tensors, never writes into it: no copy needed.
        self.evaluator.start(report, self.model.state)

    def _ptq_loss(self) -> dict[int, float] | None:
        """Accuracy lost under PTQ per width by the last evaluated round's model."""
        done = [r for r in self.reports if "32" in r.val_deploy]
        if not done:
            return None
        last = done[-1].val_deploy
        return {int(b): last["32"] - a for b, a in last.items() if b != "32"}

    def _export(self) -> None:
        last = self.reports[-1] if self.reports else None
        delivery = self.deployment.deliver(
            self.assigner.assignments, self.assigner.registrations, last.round if last else None
        )
        self.exported, self.export_failures = delivery.files, delivery.failed
        self.deploy = delivery.choices
        if delivery.failed:
            self.store.set_meta("export_failures", json.dumps(delivery.failed))
