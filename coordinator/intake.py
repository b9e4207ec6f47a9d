"""Message intake: what arrives from the broker becomes validated events, or a counted drop.

Runs on the network thread, so it only parses, checks and enqueues; nothing here touches the
model. A registration becomes a `Registration` (checked once, at the door: `bitfleet.registration`)
handed to the coordinator; a status message updates presence; update chunks are reassembled
and become `Update` events on a queue the round runner reads (docs/round.md#intake); a board's
timing of a deploy candidate becomes a `TimingReport` on `timings`.
"""

from __future__ import annotations

import logging
import queue
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from bitfleet.deploy import CandidateTiming
from bitfleet.protocol import (
    ProtocolError,
    Reassembler,
    Topics,
    decode_message,
    unpack_state,
    validate_message,
)
from bitfleet.registration import Registration

from .state import StateStore

log = logging.getLogger(__name__)

MAX_CONCURRENT_UPLOADS = 4096
"""Partial uploads held at once: at least the devices of a round, which upload together."""

UPLOADS_PER_DEVICE = 2
"""Each device's byte quota, in updates: one upload in flight, and the next one starting
while a redelivered chunk of the last is still on its way (docs/protocol.md#reassembly-quotas)."""


MAX_PENDING_TIMINGS = 65536
"""Timings held for the exchange in progress: a device answers once per candidate, so more
than this is a flood, dropped (`timing_overflow`) instead of growing without bound."""

MIN_UPLOAD_CHUNK = 1024
"""The smallest chunk an agent uploads in (`agent run --chunk-kib 1`)."""


def update_limit(tensor_bytes: int) -> int:
    """The largest update this job can receive: the model's tensor bytes plus the safetensors
    header (names, shapes, offsets: a few hundred bytes per tensor) with room to spare."""
    return tensor_bytes + tensor_bytes // 100 + 64 * 1024


@dataclass
class Update:
    """One device's local model for a round (or a fine-stage trial), as it arrived."""

    device: str
    round: int
    n_samples: int
    train_loss: float
    train_seconds: float
    board_seconds: float | None
    trial: int | None
    state: dict[str, torch.Tensor]
    payload_bytes: int


@dataclass(frozen=True)
class TimingReport:
    """One device's timing of one deploy candidate, for the phase that sent it."""

    device: str
    phase: str
    timing: CandidateTiming


class Intake:
    """Turns broker messages into `Registration`s (to `on_register`) and `Update`s (to
    `updates`), and counts every dropped message by reason in `dropped`."""

    def __init__(
        self,
        topics: Topics,
        store: StateStore,
        *,
        job_id: str,
        num_classes: int,
        update_bytes: int,
        on_register: Callable[[Registration], None],
    ) -> None:
        """`update_bytes` is the model's tensor bytes: it bounds what an upload may declare."""
        self.topics = topics
        self.store = store
        self.job_id = job_id
        self.num_classes = num_classes
        self.max_samples: int | None = None
        """The training split's size, once the job's data is loaded: registrations claiming
        more samples than the data set holds are refused."""
        self.on_register = on_register
        limit = update_limit(update_bytes)
        self.reassembler = Reassembler(
            max_bytes=limit,
            max_chunks=limit // MIN_UPLOAD_CHUNK + 1,
            timeout_s=600,
            max_partial=MAX_CONCURRENT_UPLOADS,
            max_source_bytes=UPLOADS_PER_DEVICE * limit,
            slot_of=lambda meta: (meta.get("round"), meta.get("trial")),
        )
        self.updates: queue.Queue[Update] = queue.Queue()
        self.timings: queue.Queue[TimingReport] = queue.Queue(MAX_PENDING_TIMINGS)
        self.timing_phase: str | None = None
        """The phase of the candidate exchange in progress; timings outside one are dropped."""
        self.dropped: dict[str, int] = {}

    def drop(self, reason: str, topic: str, detail: object = "") -> None:
        """Count and log a message or update that is not used."""
        self.dropped[reason] = self.dropped.get(reason, 0) + 1
        log.warning("dropped message on %s: %s %s", topic, reason, detail)

    def on_message(self, topic: str, payload: bytes) -> None:
        """The transport's callback: never raises for bad input, drops it with a reason."""
        try:
            kind, device = self.topics.parse(topic)
            if kind == "register":
                self._register(device, decode_message(payload, "register"))
            elif kind == "status":
                msg = decode_message(payload, "status")
                self.store.set_online(device, bool(msg["online"]))
                if not msg["online"]:
                    # Its partial upload can never complete. A board that comes back is sent
                    # its task again and uploads the whole update anew.
                    self.reassembler.discard_source(device)
            elif kind == "update":
                done = self.reassembler.add(payload, source=device)
                if done is not None:
                    self._update(device, done.meta, done.blob)
            elif kind == "timing":
                self._timing(device, decode_message(payload, "timing"))
        except ProtocolError as exc:
            self.drop(exc.reason, topic, exc)

    def _register(self, device: str, msg: dict) -> None:
        if msg["device_id"] != device:
            raise ProtocolError("bad_device_id", f"register for {msg['device_id']} on {device}")
        registration = Registration.from_message(msg, self.num_classes, self.max_samples)
        self.store.upsert_device(device, registration.profile, msg["data"])
        self.store.set_online(device, True)
        log.info("registered %s (%s samples)", device, registration.data.n_samples)
        self.on_register(registration)

    @contextmanager
    def timing_exchange(self, phase: str) -> Iterator[None]:
        """Take `timing` messages of `phase` while the block runs; after it, drop the rest
        (answers after the deadline are not the next exchange's)."""
        self.timing_phase = phase
        try:
            yield
        finally:
            self.timing_phase = None
            while True:
                try:
                    self.timings.get_nowait()
                except queue.Empty:
                    break

    def _timing(self, device: str, msg: dict) -> None:
        if msg["device_id"] != device:
            raise ProtocolError("bad_device_id", f"timing for {msg['device_id']} on {device}")
        if msg["job_id"] != self.job_id:
            raise ProtocolError("wrong_job", f"timing for job {msg['job_id']}")
        if msg["phase"] != self.timing_phase:
            raise ProtocolError("unexpected_timing", f"no {msg['phase']} exchange in progress")
        timing = CandidateTiming(
            msg["name"], float(msg["latency_ms"]), int(msg["memory_bytes"]), msg["source"][:200]
        )
        try:
            self.timings.put_nowait(TimingReport(device, msg["phase"], timing))
        except queue.Full:
            raise ProtocolError("timing_overflow", "too many timings pending") from None

    def _update(self, device: str, meta: dict, blob: bytes) -> None:
        msg = validate_message(meta, "update")  # every number in range (bitfleet.protocol)
        if msg["job_id"] != self.job_id:
            raise ProtocolError("wrong_job", f"update for job {msg['job_id']}")
        board_s = msg.get("board_seconds")
        update = Update(
            device=device,
            round=msg["round"],
            n_samples=msg["n_samples"],
            train_loss=float(msg["train_loss"]),
            train_seconds=float(msg["train_seconds"]),
            board_seconds=None if board_s is None else float(board_s),
            trial=msg.get("trial"),
            state=unpack_state(blob),
            payload_bytes=len(blob),
        )
        # It answered: whatever presence said, it is there (docs/round.md#presence).
        self.store.set_online(device, True)
        self.updates.put(update)
