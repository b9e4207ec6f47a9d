"""The coordinator: registers devices, runs federated rounds over MQTT, checkpoints, exports.

One class drives a job from registration to the last export. Network callbacks only parse and
enqueue; the main loop owns the model, so aggregation never races the next dispatch. Memory
stays O(model): updates are folded into a running mean as they arrive and then dropped.
"""

from __future__ import annotations

import json
import logging
import math
import queue
import random
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

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

from .checkpoint import load_latest_checkpoint, save_checkpoint
from .config import JobConfig, config_hash
from .state import StateStore
from .strategies import RunningMean, make_strategy

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


@dataclass
class _Update:
    device: str
    round: int
    n_samples: int
    train_loss: float
    train_seconds: float
    state: dict[str, torch.Tensor]
    payload_bytes: int


class Coordinator:
    """Runs one job (a `JobConfig`) against a broker; `run()` returns when the job is done."""

    def __init__(
        self,
        cfg: JobConfig,
        broker_url: str,
        *,
        ca_file: str | None = None,
        on_round: Callable[[RoundReport], None] | None = None,
        data: ImageData | None = None,
    ) -> None:
        self.cfg = cfg
        self.address = parse_broker_url(broker_url)
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
        self.method = make_method(cfg.allocation.strategy, **self._method_options())
        self.model = self._new_model()
        self.global_state = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
        self.strategy = make_strategy(cfg.server)
        self.reassembler = Reassembler(
            max_bytes=MAX_UPDATE_BYTES,
            max_chunks=MAX_UPDATE_BYTES // 2**20 + 1,
            timeout_s=600,
            max_partial=MAX_CONCURRENT_UPLOADS,
        )
        self.updates: queue.Queue[_Update] = queue.Queue()
        self.registered = threading.Event()
        self.rng = random.Random(cfg.job.seed)
        self.reports: list[RoundReport] = []
        self.dropped: dict[str, int] = {}
        self._stop = threading.Event()
        self.exported: dict[str, Path] = {}
        self._eval_thread: threading.Thread | None = None
        self.transport: MqttTransport | None = None

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
        if self.cfg.allocation.strategy in ("qat", "apqn"):
            return {"bits": self.cfg.allocation.bits}
        return {}

    def _new_model(self) -> nn.Module:
        spec = self.spec
        model = create_model_for(self.cfg.model.name, spec)
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
            elif kind == "update":
                done = self.reassembler.add(payload, source=device)
                if done is not None:
                    self._on_update(device, done.meta, done.blob)
        except ProtocolError as exc:
            self._drop(exc.reason, topic, exc)

    def _on_register(self, device: str, msg: dict) -> None:
        if msg["device_id"] != device:
            raise ProtocolError("bad_device_id", f"register for {msg['device_id']} on {device}")
        self.store.upsert_device(device, msg["profile"], msg["data"])
        self.store.set_online(device, True)
        bits = self.cfg.allocation.bits
        self.store.set_assignment(device, self.cfg.allocation.strategy, bits, None)
        self._publish_assignment(device, bits)
        log.info("registered %s (%s samples)", device, msg["data"].get("n_samples"))
        self.registered.set()

    def _publish_assignment(self, device: str, bits: int) -> None:
        t = self.cfg.training
        body = {
            "device_id": device,
            "strategy": self.cfg.allocation.strategy,
            "bits": bits,
            "per_layer_bits": None,
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
        assert self.transport is not None
        self.transport.publish(self.topics.assign(device), encode_message("assign", body))

    def _on_update(self, device: str, meta: dict, blob: bytes) -> None:
        msg = validate_message(meta, "update")
        if msg["job_id"] != self.job_id:
            raise ProtocolError("wrong_job", f"update for job {msg['job_id']}")
        state = unpack_state(blob)
        self.updates.put(
            _Update(
                device=device,
                round=int(msg["round"]),
                n_samples=int(msg["n_samples"]),
                train_loss=float(msg["train_loss"]),
                train_seconds=float(msg["train_seconds"]),
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
        self.transport = MqttTransport(
            self.address,
            client_id=f"bitfleet-coordinator-{self.cfg.job.fleet}",
            on_message=self._on_message,
            subscriptions=[self.topics.all(k) for k in ("register", "status", "update")],
            ca_file=self.ca_file,
        )
        self.transport.start(timeout=30)
        try:
            self._wait_for_devices()
            self._settle_registrations()
            for rnd in range(start_round, self.cfg.training.rounds):
                if self._stop.is_set():
                    break
                self._run_round(rnd)
            self._join_evaluation()
            if not self._stop.is_set():
                self._export_models()
        finally:
            self._join_evaluation()
            self.transport.stop()
        return self.reports

    def _resume(self) -> int:
        """Start after the last checkpoint; forget rounds that never reached one."""
        found = load_latest_checkpoint(self.state_dir)
        if found is None:
            self.store.rollback_to(None)
            return 0
        rnd, model_state, server_state = found
        self.model.load_state_dict(model_state)
        self.global_state = {k: v.clone() for k, v in model_state.items()}
        self.strategy.load_state_dict(server_state)
        self.store.rollback_to(rnd)
        if self.store.last_completed_round() != rnd:
            # Killed between the checkpoint and the SQLite close: the checkpoint is the truth.
            self.store.close_round(rnd, None, None, 0, 0.0)
        log.warning("resuming job %s after round %d", self.job_id, rnd)
        return rnd + 1

    def _wait_for_devices(self) -> None:
        need = self.cfg.rounds.min_devices
        deadline = time.monotonic() + self.cfg.rounds.register_timeout_s
        while len(self.store.devices(online_only=True)) < need:
            if self._stop.is_set():
                return
            if time.monotonic() > deadline:
                have = len(self.store.devices(online_only=True))
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

    def _select(self) -> list[str]:
        online = sorted(d.id for d in self.store.devices(online_only=True))
        k = max(self.cfg.rounds.min_devices, math.ceil(self.cfg.rounds.fraction * len(online)))
        return sorted(self.rng.sample(online, min(k, len(online))))

    def _run_round(self, rnd: int) -> None:
        t_start = time.perf_counter()
        self._wait_for_devices()
        selected = self._select()
        self.store.open_round(rnd, selected)
        rc = self.cfg.rounds
        task = {
            "round": rnd,
            "job_id": self.job_id,
            "local_epochs": self.cfg.training.local_epochs,
            "deadline_s": rc.deadline_s,
        }
        blob = pack_state(self.global_state)
        assert self.transport is not None
        for device in selected:
            chunks = split_payload("task", make_message("task", task), blob)
            self.transport.publish_many(self.topics.task(device), chunks)
        dispatch_s = time.perf_counter() - t_start

        mean = RunningMean(self.global_state)
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
            if upd.round != rnd or upd.device not in selected:
                self._drop("late_or_unexpected", f"update/{upd.device}", f"round {upd.round}")
                continue
            if not self.store.record_update(
                rnd, upd.device, upd.n_samples, upd.train_loss, upd.train_seconds
            ):
                self._drop("duplicate", f"update/{upd.device}", f"round {rnd}")
                continue
            try:
                mean.add(upd.state, float(upd.n_samples))
            except ValueError as exc:
                self._drop("bad_update", f"update/{upd.device}", exc)
                continue
            received[upd.device] = upd
            fold_s += time.perf_counter() - t_fold

        if not received:
            return  # stopped before any update arrived; the round reruns on resume
        t_close = time.perf_counter()
        self.global_state = self.strategy.apply(self.global_state, mean.mean())
        self.model.load_state_dict(self.global_state)
        save_checkpoint(self.state_dir, rnd, self.global_state, self.strategy.state_dict())
        stragglers = [d for d in selected if d not in received]
        host_s = time.perf_counter() - t_start
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
            sim_seconds=self._simulated_seconds(received.values(), len(blob)),
        )
        self.store.close_round(rnd, None, None, len(stragglers), host_s, report.sim_seconds)
        self.reports.append(report)
        self._evaluate_async(report, {k: v.clone() for k, v in self.global_state.items()})

    def _simulated_seconds(self, updates: object, payload_bytes: int) -> float:
        """The round's wall clock on the real boards: the slowest participant (DESIGN 5)."""
        profiles = {d.id: d.profile for d in self.store.devices()}
        longest = 0.0
        for upd in updates:  # type: ignore[attr-defined]
            board = profiles.get(upd.device, {}).get("board", {})
            speed = float(board.get("relative_speed", 1.0)) or 1.0
            mbps = float(board.get("link_mbps", 100.0)) or 100.0
            comm = 2 * payload_bytes * 8 / (mbps * 1e6)
            longest = max(longest, upd.train_seconds / speed + comm)
        return longest

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
        board = profile.get("board", {})
        key = "storage_bits" if board.get("preferred_storage") == "packed" else "deploy_bits"
        fitting = [b for b in self.cfg.deploy.bits if b in set(board.get(key, []))]
        return min(fitting) if fitting else max(self.cfg.deploy.bits)

    def _export_models(self) -> dict[str, Path]:
        exporter = plugins.load("bitfleet.exporters", "onnx")
        out_dir = self.state_dir / "exports"
        last = self.reports[-1] if self.reports else None
        calib = self.data.train_x[:EXPORT_CALIB_SAMPLES].float().div(255).numpy()
        shape = (self.spec.in_channels, self.spec.image_size, self.spec.image_size)
        by_kind: dict[tuple[int, str], Path] = {}
        for device in self.store.devices():
            bits = self.device_bits(device.profile)
            storage = device.profile.get("board", {}).get("preferred_storage", "int8")
            if (bits, storage) not in by_kind:
                model = self._new_model()
                model.load_state_dict(self.global_state)
                self.method.deploy(model, bits)
                name = f"{self.cfg.model.name}-{bits}bit-{storage}.onnx"
                by_kind[bits, storage] = exporter(
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
            path = by_kind[bits, storage]
            self.exported[device.id] = path
            meta = {
                "job_id": self.job_id,
                "bits": bits,
                "storage": storage,
                "filename": f"{self.job_id}-{path.name}",
            }
            chunks = split_payload("model", make_message("model", meta), path.read_bytes())
            assert self.transport is not None
            self.transport.publish_many(self.topics.model(device.id), chunks)
        return self.exported
