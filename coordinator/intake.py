"""Message intake: what arrives from the broker becomes validated events, or a counted drop.

Runs on the network thread, so it only parses, checks and enqueues; nothing here touches the
model. A registration becomes a `Registration` (checked once, at the door: `bitfleet.registration`)
handed to the coordinator; a status message updates presence; update chunks are reassembled
and become `Update` events on a queue the round runner reads (docs/round.md#intake).
"""

from __future__ import annotations

import logging
import queue
from collections.abc import Callable
from dataclasses import dataclass

import torch

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

MAX_UPDATE_BYTES = 256 * 2**20
"""Largest update the coordinator reassembles; far above any model bitfleet targets."""


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
        on_register: Callable[[Registration], None],
    ) -> None:
        self.topics = topics
        self.store = store
        self.job_id = job_id
        self.num_classes = num_classes
        self.on_register = on_register
        self.reassembler = Reassembler(
            max_bytes=MAX_UPDATE_BYTES,
            max_chunks=MAX_UPDATE_BYTES // 2**20 + 1,
            timeout_s=600,
            max_partial=MAX_CONCURRENT_UPLOADS,
        )
        self.updates: queue.Queue[Update] = queue.Queue()
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
        except ProtocolError as exc:
            self.drop(exc.reason, topic, exc)

    def _register(self, device: str, msg: dict) -> None:
        if msg["device_id"] != device:
            raise ProtocolError("bad_device_id", f"register for {msg['device_id']} on {device}")
        registration = Registration.from_message(msg, self.num_classes)
        self.store.upsert_device(device, registration.profile, msg["data"])
        self.store.set_online(device, True)
        log.info("registered %s (%s samples)", device, registration.data.n_samples)
        self.on_register(registration)

    def _update(self, device: str, meta: dict, blob: bytes) -> None:
        msg = validate_message(meta, "update")
        if msg["job_id"] != self.job_id:
            raise ProtocolError("wrong_job", f"update for job {msg['job_id']}")
        board_s = msg.get("board_seconds")
        trial = msg.get("trial")
        self.updates.put(
            Update(
                device=device,
                round=int(msg["round"]),
                n_samples=int(msg["n_samples"]),
                train_loss=float(msg["train_loss"]),
                train_seconds=float(msg["train_seconds"]),
                board_seconds=max(0.0, float(board_s)) if _is_number(board_s) else None,
                trial=trial if isinstance(trial, int) and not isinstance(trial, bool) else None,
                state=unpack_state(blob),
                payload_bytes=len(blob),
            )
        )


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)
