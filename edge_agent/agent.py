"""The agent on a board: profile, register, train what it is told, upload, receive its model.

paho's network thread only parses and enqueues; training runs in the agent's main thread, so a
long local epoch never stalls keep-alives, and a lost broker only delays the next message (the
client reconnects with backoff and re-registers). One line per round is all it prints.
"""

from __future__ import annotations

import hashlib
import json
import logging
import queue
import random
import re
import socket
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from bitfleet.assignment import Assignment
from bitfleet.board_time import steps_per_round
from bitfleet.data import (
    DATASET_SPECS,
    DEFAULT_VALIDATION_FRACTION,
    ImageData,
    carve_validation,
    load_dataset,
    partition,
)
from bitfleet.deploy import DeployLimits
from bitfleet.profiles import (
    detect_board,
    load_profile,
    measure_machine,
    measure_step_times,
    profile_summary,
)
from bitfleet.protocol import (
    BrokerAddress,
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
    validate_device_id,
    validate_message,
)
from bitfleet.quant.methods import QUANT_IN_FORWARD
from bitfleet.registration import DataSummary, Registration
from bitfleet.runtime_facts import probe_runtime

from .candidate_timing import time_candidate
from .local_training import LocalResult, LocalTraining

log = logging.getLogger(__name__)


def _say(text: str) -> None:
    print(text, flush=True)


MAX_DOWNLOAD_BYTES = 256 * 2**20

NAMED_PART = re.compile(r"([a-z0-9-]+):(\d+)/(\d+)")
"""`--data NAME:I/N`: part I of N of a named data set (else `--data` is a folder)."""

HEARTBEAT_S = 30.0
"""How often an idle agent says `online` again: the coordinator marks a board that missed a
round offline (docs/round.md#presence), and one whose upload was lost on the way comes back
at its next heartbeat, while a board that is gone stays out."""


@dataclass
class AgentOptions:
    broker: str | BrokerAddress
    """A URL, or the address `bitfleet.protocol.resolve_broker` read its password into."""
    data: str
    device_id: str | None = None
    dataset: str = "fashion-mnist"
    partition: str = "dirichlet"
    alpha: float = 0.5
    partition_seed: int = 0
    validation_fraction: float = DEFAULT_VALIDATION_FRACTION
    """For NAME:I/N: the share of the named set's training images the coordinator holds back
    (its `[data] validation_fraction`); the I/N parts split the rest."""
    profile: str = "auto"
    out_dir: str = "bitfleet-models"
    state_dir: str | None = None
    fleet: str = "default"
    ca_file: str | None = None
    model: str = "lenet5"
    measure_steps: bool = True
    exit_after_model: bool = False
    threads: int | None = None
    quiet: bool = False
    chunk_size: int = 2**20
    """Upload chunk size in bytes (<= 1 MiB): smaller chunks resend less on a flaky link."""
    limits: DeployLimits = DeployLimits()
    """What the owner allows this board's model (size, batch-1 latency), sent at registration."""


def stable_device_id(state_dir: Path) -> str:
    """The id this board registered with before, or a new one kept for next time."""
    path = state_dir / "device-id"
    if path.exists():
        return path.read_text().strip()
    host = re.sub(r"[^A-Za-z0-9_.-]", "-", socket.gethostname())[:40] or "board"
    device_id = f"{host}-{uuid.uuid4().hex[:6]}"
    state_dir.mkdir(parents=True, exist_ok=True)
    path.write_text(device_id + "\n")
    return device_id


def load_local_data(opts: AgentOptions) -> tuple[torch.Tensor, torch.Tensor]:
    """This device's training data: a folder of its own, or one part of a named data set.

    `--data DIR` reads the job's data set format from DIR (the board's own samples);
    `--data NAME:I/N` takes part I of N of a named data set's training images, less the
    coordinator's validation split, split by `--partition`, for virtual devices in demos and
    simulations.
    """
    named = NAMED_PART.fullmatch(opts.data)
    if named is None:
        data = load_dataset(opts.dataset, data_dir=opts.data)
        return data.train_x, data.train_y
    name, index, count = named.group(1), int(named.group(2)), int(named.group(3))
    if name not in DATASET_SPECS:
        raise ValueError(
            f"--data {opts.data}: unknown data set {name!r}; known: {sorted(DATASET_SPECS)}"
        )
    if not 0 <= index < count:
        raise ValueError(f"--data {opts.data}: partition index must be in 0..{count - 1}")
    data: ImageData = carve_validation(load_dataset(name), opts.validation_fraction)
    parts = partition(
        data.train_y.numpy(), count, opts.partition, seed=opts.partition_seed, alpha=opts.alpha
    )
    idx = torch.from_numpy(parts[index]).long()
    return data.train_x[idx], data.train_y[idx]


BoardClock = Callable[[str, int, int], float]
"""(strategy, optimiser steps, round) -> seconds the round's training takes on the board."""

ComputeRunner = Callable[[LocalTraining], LocalResult]
"""Runs one local round and returns its result: the simulator's runners queue it for one
shared thread or send it to a worker process; the default runs it right here."""


def _run_here(work: LocalTraining) -> LocalResult:
    return work()


class EdgeAgent:
    """One board's agent; `run()` serves the coordinator until stopped or its model arrives.

    `transport_factory` replaces the MQTT connection (the simulator's in-process bus, called
    with `MqttTransport`'s keywords); `clock` gives a virtual board's training time in place
    of the time measured on this host; `compute` runs the training (a callable taking a
    function and returning its result), so virtual boards sharing one host can take turns on
    one thread instead of thrashing its cores.
    """

    def __init__(
        self,
        opts: AgentOptions,
        *,
        transport_factory: Callable[..., Any] | None = None,
        clock: BoardClock | None = None,
        data: tuple[torch.Tensor, torch.Tensor] | None = None,
        profile: dict[str, Any] | None = None,
        compute: ComputeRunner | None = None,
    ) -> None:
        self.opts = opts
        self.compute = compute or _run_here
        self.transport_factory = transport_factory
        self.clock = clock
        self._given_data = data
        self._given_profile = profile
        state_dir = Path(opts.state_dir or Path.home() / ".local" / "state" / "bitfleet")
        self.device_id = opts.device_id or stable_device_id(state_dir)
        self.topics = Topics(fleet=opts.fleet)
        validate_device_id(self.device_id)
        self.address = parse_broker_url(opts.broker)
        self.inbox: queue.Queue[tuple[str, dict, bytes]] = queue.Queue()
        self.reassembler = Reassembler(
            max_bytes=MAX_DOWNLOAD_BYTES, max_chunks=MAX_DOWNLOAD_BYTES // 2**20 + 1, timeout_s=600
        )
        self.assignment: Assignment | None = None
        self.job: dict[str, Any] | None = None
        self.done = threading.Event()
        self.models: list[Path] = []
        self.transport: Any = None
        self._said_online_at = time.monotonic()
        # The last task and the update chunks it produced: the same task sent again (after a
        # reconnect) is answered with the same update instead of a second training.
        self._answered: tuple[str, list[bytes]] | None = None

    # -- set-up -----------------------------------------------------------------------------

    def _profile(self) -> dict:
        board = detect_board() if self.opts.profile == "auto" else load_profile(self.opts.profile)
        steps = None
        if self.opts.measure_steps:
            spec = DATASET_SPECS[self.opts.dataset]
            steps = measure_step_times(
                self.opts.model,
                in_channels=spec.in_channels,
                image_size=spec.image_size,
                num_classes=spec.num_classes,
            )
        return profile_summary(board, measure_machine(), steps, probe_runtime())

    def _with_limits(self, profile: dict) -> dict:
        """The profile as registered: with the owner's limits where any are set."""
        if not self.opts.limits.any:
            return profile
        return {**profile, "limits": self.opts.limits.to_dict()}

    def _heartbeat(self) -> None:
        assert self.transport is not None
        self._said_online_at = time.monotonic()
        status = encode_message("status", {"device_id": self.device_id, "online": True})
        self.transport.publish(self.topics.status(self.device_id), status, retain=True)

    def _register(self) -> None:
        assert self.transport is not None
        self._heartbeat()
        body = self.registration.to_message(sent_at=time.time())
        self.transport.publish(
            self.topics.register(self.device_id), encode_message("register", body)
        )

    # -- network thread ---------------------------------------------------------------------

    def _on_message(self, topic: str, payload: bytes) -> None:
        try:
            kind, device = self.topics.parse(topic)
            if device != self.device_id:
                # Some brokers (amqtt) also hand out other devices' retained messages.
                log.debug("ignored %s: not for %s", topic, self.device_id)
                return
            if kind == "assign":
                self._take_assignment(decode_message(payload, "assign"))
            elif kind in ("task", "model", "candidate"):
                done = self.reassembler.add(payload, source=kind)
                if done is not None:
                    self.inbox.put((kind, validate_message(done.meta, kind), done.blob))
        except ProtocolError as exc:
            log.warning("dropped message on %s: %s (%s)", topic, exc.reason, exc)

    # -- main loop --------------------------------------------------------------------------

    def _connect(self, **options: Any) -> Any:
        if self.transport_factory is not None:
            return self.transport_factory(**options)
        return MqttTransport(self.address, **options)

    def run(self) -> int:
        if self.opts.threads:
            torch.set_num_threads(self.opts.threads)
        self.x, self.y = self._given_data or load_local_data(self.opts)
        spec = DATASET_SPECS[self.opts.dataset]
        # Only statistics leave the board: the histogram and its fitted rank-frequency profile
        # (FedHQ's accuracy significance, docs/allocation.md#sigacc), never samples.
        data = DataSummary.of_labels(self.y.numpy(), spec.num_classes)
        profile = self._with_limits(self._given_profile or self._profile())
        # Read back as the coordinator will: a profile it would refuse fails here, at start.
        self.registration = Registration.from_stored(self.device_id, profile, data.to_dict())
        self.board = self.registration.board
        # A board named with --profile that is not the machine this runs on (the demo's
        # virtual boards): its times are scaled to that board. On the board itself, or with
        # --profile auto, the measured time is the board's time.
        self.host_board = detect_board()
        self.emulated = self.opts.profile != "auto" and self.host_board.name != self.board.name
        offline = encode_message("status", {"device_id": self.device_id, "online": False})
        self.transport = self._connect(
            client_id=f"bitfleet-agent-{self.opts.fleet}-{self.device_id}",
            on_message=self._on_message,
            will=(self.topics.status(self.device_id), offline, True),
            subscriptions=[
                self.topics.assign(self.device_id),
                self.topics.task(self.device_id),
                self.topics.model(self.device_id),
                self.topics.candidate(self.device_id),
            ],
            on_connect=self._register,
            ca_file=self.opts.ca_file,
        )
        self.transport.start(timeout=60)
        try:
            while not self.done.is_set():
                try:
                    kind, meta, blob = self.inbox.get(timeout=0.5)
                except queue.Empty:
                    quiet = time.monotonic() - self._said_online_at
                    if self.assignment is None and quiet > 10:
                        self._register()  # no answer yet: say it again
                    elif quiet > HEARTBEAT_S:
                        self._heartbeat()
                    continue
                if kind == "task":
                    self._train(meta, blob)
                elif kind == "candidate":
                    self._time_candidate(meta, blob)
                else:
                    self._store_model(meta, blob)
        finally:
            self.transport.publish(self.topics.status(self.device_id), offline, retain=True)
            self.transport.stop()
        return 0

    def stop(self) -> None:
        self.done.set()

    def _take_assignment(self, msg: dict[str, Any]) -> None:
        """Keep a validated `assign` message: the typed assignment and the job's settings."""
        self.assignment = Assignment.from_message(msg)
        self.job = msg["job"]

    def _train(self, task: dict, blob: bytes) -> None:
        key = hashlib.sha256(json.dumps(task, sort_keys=True).encode() + blob).hexdigest()
        if self._answered is not None and self._answered[0] == key:
            self.transport.publish_many(self.topics.update(self.device_id), self._answered[1])
            log.info("round %s: the same task again; sent the same update", task["round"])
            return
        if isinstance(task.get("assignment"), dict):
            # The task says what this round trains; it may differ from the first assignment.
            self._take_assignment(
                validate_message({"v": task["v"], "type": "assign", **task["assignment"]}, "assign")
            )
        if self.assignment is None or self.job is None:
            log.warning("task for round %s before any assignment; skipped", task["round"])
            return
        job = self.job
        epochs = float(task["local_epochs"])
        batch_size = int(job["batch_size"])
        work = LocalTraining(
            model=job["model"],
            dataset=job["dataset"],
            assignment=self.assignment,
            state=unpack_state(blob),
            x=self.x,
            y=self.y,
            epochs=epochs,
            batch_size=batch_size,
            lr=float(job["lr"]),
            optimizer=job["optimizer"],
            seed=random.Random(f"{self.device_id}:{task['round']}").randrange(2**31),
        )
        done = self.compute(work)
        loss, seconds = done.loss, done.seconds
        strategy = self.assignment.strategy
        meta = {
            "round": int(task["round"]),
            "job_id": task["job_id"],
            "n_samples": len(self.y),
            "train_loss": float(loss),
            "train_seconds": seconds,
            "board_seconds": self._board_seconds(
                seconds, strategy, epochs, batch_size, int(task["round"])
            ),
        }
        if task.get("trial") is not None:
            meta["trial"] = task["trial"]
        assert self.transport is not None
        chunks = split_payload(
            "update", make_message("update", meta), pack_state(done.state), self.opts.chunk_size
        )
        self._answered = (key, chunks)
        self.transport.publish_many(self.topics.update(self.device_id), chunks)
        name = self.assignment.describe()
        (log.info if self.opts.quiet else _say)(
            f"[{self.device_id}] round {task['round']}: {name}, {len(self.y)} samples, "
            f"loss {loss:.3f}, {seconds:.1f} s"
        )

    def _board_seconds(
        self, seconds: float, strategy: str, epochs: float, batch: int, rnd: int
    ) -> float:
        """This round's training time on the board the agent stands for
        (docs/simulation.md#the-board-clock).

        A real board reports what it measured; a virtual one (a simulator's clock, or a
        profile named with `--profile` on another machine) scales to the board's speed.
        """
        if self.clock is not None:
            return self.clock(strategy, steps_per_round(len(self.y), batch, epochs), rnd)
        if not self.emulated:
            return seconds
        board_s = seconds / self.board.relative_speed
        if strategy in QUANT_IN_FORWARD:  # the board's own QAT cost, not this host's
            board_s *= self.board.qat_overhead / self.host_board.qat_overhead
        return board_s

    def _time_candidate(self, meta: dict, blob: bytes) -> None:
        """Time one deploy candidate on this board and say how it went
        (docs/export.md#deploy-candidates); a file that does not load is reported by its
        absence: the coordinator then chooses without its timing."""
        try:
            timing = time_candidate(blob, self.board, emulated=self.emulated)
        except Exception as exc:  # noqa: BLE001 - any failure of one file is that file's
            log.warning("candidate %s did not run here: %s", meta["name"], exc)
            return
        body = {
            "device_id": self.device_id,
            "job_id": meta["job_id"],
            "name": meta["name"],
            "phase": meta["phase"],
            "latency_ms": max(timing.latency_ms, 1e-6),
            "memory_bytes": timing.memory_bytes,
            "source": timing.source,
        }
        assert self.transport is not None
        self.transport.publish(self.topics.timing(self.device_id), encode_message("timing", body))
        log.info("candidate %s: %.3f ms (%s)", meta["name"], timing.latency_ms, timing.source)

    def _store_model(self, meta: dict, blob: bytes) -> None:
        out = Path(self.opts.out_dir)
        out.mkdir(parents=True, exist_ok=True)
        name = Path(meta["filename"]).name  # never a path from the network
        tmp = out / f".{name}.part"
        tmp.write_bytes(blob)
        tmp.replace(out / name)
        self.models.append(out / name)
        print(f"[{self.device_id}] model {meta['bits']}-bit saved to {out / name}", flush=True)
        if self.opts.exit_after_model:
            self.done.set()


def virtual_agent(
    device_id: str,
    *,
    fleet: str,
    profile: dict[str, Any],
    data: tuple[torch.Tensor, torch.Tensor],
    dataset: str,
    model: str,
    broker: str | None = None,
    transport_factory: Callable[..., Any] | None = None,
    clock: BoardClock | None = None,
    compute: ComputeRunner | None = None,
) -> EdgeAgent:
    """An agent standing for a board it does not run on: the simulator's virtual device.

    Its profile, data and clock are given; everything else (registration, training, upload)
    is the board's own code path. Registered as the `bitfleet.agents` entry point `virtual`,
    so the simulator drives it without the coordinator importing this package.
    """
    opts = AgentOptions(
        broker=broker or "mqtt://in-process",
        data="(given)",
        device_id=device_id,
        dataset=dataset,
        model=model,
        profile=str(profile["board"]["name"]),
        fleet=fleet,
        measure_steps=False,
        quiet=True,
    )
    return EdgeAgent(
        opts,
        transport_factory=transport_factory,
        clock=clock,
        data=data,
        profile=profile,
        compute=compute,
    )
