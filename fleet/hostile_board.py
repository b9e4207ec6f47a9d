"""One hostile board inside a provisioned fleet, for `bitfleet bench hostile`.

The board logs in with its own account only (the broker's ACL confines it to its own topics, as
it would a stolen board), registers before the honest boards start, reads the tasks the
coordinator sends it, and answers each as its attack says. Everything it sends is written by
hand here (JSON with `NaN`, chunk headers that lie), never through `encode_message` or
`split_payload`, so that the checks under test cannot stop the attack at the sender.

- `inflated_count`: honest registration (600 real labels); every task answered with random
  weights twice, claiming 10**12 samples (out of any range) and 1000 times its registered count
  (in range, but not what it registered).
- `random_weights`: honest registration and count; random weights from round 0.
- `huge_numbers`: registrations with 2**63 and with NaN in every numeric field at once and in
  each field alone, status messages with them, then an honest registration (so that it gets
  tasks and learns the job id); each task is answered with update metas holding 2**63 / NaN in
  every field and in each alone, first of all a valid meta claiming 2**63 samples.
- `bad_registration`: registrations with one bad field each (board storage "zip", deploy_bits
  7, 10**12 and 2**70 samples, an empty profile), the "zip" one again last; silent after that.
- `chunk_flood`: honest registration; in round 0, 5000 tiny first chunks, distinct payload ids.
- `flood_during_upload`: the same flood at once when its round-0 task arrives, while the honest
  boards upload (the broker's queue for the coordinator is shared by every board).
- `huge_declared`: honest registration; in round 0, 3 payloads declaring 256 MiB, 100 x 1 MiB
  chunks each, never completed.
- `clean_disconnect`: honest registration; at its first task a clean disconnect (no offline
  status, no will), for good.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import queue
import struct
import threading
import time
import uuid
from collections.abc import Callable
from typing import Any

import torch

from bitfleet.protocol import MAX_CHUNK, BrokerAddress, MqttTransport, Reassembler, Topics

BIG = 2**63
NAN = float("nan")
MIB = 2**20

ATTACKS = (
    "inflated_count",
    "random_weights",
    "huge_numbers",
    "bad_registration",
    "chunk_flood",
    "flood_during_upload",
    "huge_declared",
    "clean_disconnect",
)
RSS_ATTACKS = ("chunk_flood", "huge_declared")
"""The attacks whose coordinator memory is judged (the others' is reported only)."""
UPLOAD_ATTACKS = (*RSS_ATTACKS, "flood_during_upload")
"""The attacks judged on every honest update arriving in every round."""

FLOOD_CHUNKS = 5000
HUGE_PAYLOADS, HUGE_SENT_CHUNKS, HUGE_DECLARED = 3, 100, 256 * MIB


# -- hand-written messages ------------------------------------------------------------------


def raw_message(type_: str, body: dict[str, Any]) -> bytes:
    """A control message as JSON text, NaN and 2**63 included (json writes `NaN` as is)."""
    return json.dumps({"v": 1, "type": type_, **body}, separators=(",", ":")).encode()


def raw_chunk(
    meta: dict[str, Any],
    data: bytes,
    *,
    index: int = 0,
    count: int = 1,
    size: int | None = None,
    sha256: str | None = None,
    payload_id: str | None = None,
) -> bytes:
    """One update chunk, header fields as given (`>I` length, JSON header, data)."""
    header = {
        "v": 1,
        "payload_id": payload_id or uuid.uuid4().hex,
        "kind": "update",
        "index": index,
        "count": count,
        "size": len(data) if size is None else size,
        "sha256": sha256 or hashlib.sha256(data).hexdigest(),
        "meta": meta,
    }
    text = json.dumps(header, separators=(",", ":")).encode()
    return struct.pack(">I", len(text)) + text + data


def raw_payload(meta: dict[str, Any], blob: bytes) -> list[bytes]:
    """A whole (completable) update with a hand-written meta."""
    count = max(1, -(-len(blob) // MAX_CHUNK))
    sha, pid = hashlib.sha256(blob).hexdigest(), uuid.uuid4().hex
    return [
        raw_chunk(
            meta,
            blob[i * MAX_CHUNK : (i + 1) * MAX_CHUNK],
            index=i,
            count=count,
            size=len(blob),
            sha256=sha,
            payload_id=pid,
        )
        for i in range(count)
    ]


def numeric_paths(obj: Any, path: tuple = ()) -> list[tuple]:
    """Paths to every number (not bool) inside nested dicts and lists."""
    if isinstance(obj, dict):
        return [p for k, v in obj.items() for p in numeric_paths(v, (*path, k))]
    if isinstance(obj, list):
        return [p for i, v in enumerate(obj) for p in numeric_paths(v, (*path, i))]
    if isinstance(obj, (int, float)) and not isinstance(obj, bool):
        return [path]
    return []


def replaced(obj: Any, paths: list[tuple], value: Any) -> Any:
    """A deep copy of `obj` with `value` at each of `paths`."""
    out = copy.deepcopy(obj)
    for path in paths:
        node = out
        for key in path[:-1]:
            node = node[key]
        node[path[-1]] = value
    return out


def random_like(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: torch.randn_like(v) if v.is_floating_point() else v for k, v in state.items()}


# -- the board ------------------------------------------------------------------------------


class HostileBoard:
    """Device `device_id` of the fleet, logged in as itself, running `attack`.

    `registration` is an honest register body (real profile, a real histogram of 600 labels):
    what the attacks start from. `window` is the (start, end) of the attack's heavy sending on
    the wall clock (`time.time`), for the coordinator's memory samples; the memory attacks
    first wait for `quiet()`, so that the window holds the attack and not the round's honest
    updates being folded (the first fold alone grows the coordinator by a few MB).
    """

    def __init__(
        self,
        attack: str,
        address: BrokerAddress,
        ca_file: str,
        topics: Topics,
        device_id: str,
        registration: dict[str, Any],
        quiet: Callable[[], bool] | None = None,
    ) -> None:
        if attack not in ATTACKS:
            raise ValueError(f"unknown attack {attack!r}; known: {', '.join(ATTACKS)}")
        self.attack, self.topics, self.device_id = attack, topics, device_id
        self.registration = registration
        self.quiet = quiet
        self.n_samples = int(registration["data"]["n_samples"])
        self.assigned = threading.Event()
        self.window: tuple[float, float] | None = None
        self.model_bytes: int | None = None
        self.tasks: list[int] = []
        self.sent = 0
        self.errors: list[str] = []
        self._inbox: queue.Queue[tuple[dict, bytes] | None] = queue.Queue()
        self._reassembler = Reassembler(max_bytes=64 * MIB, max_chunks=65, timeout_s=600)
        self._gone = False
        self.transport = MqttTransport(
            address,
            client_id=f"bitfleet-agent-{topics.fleet}-{device_id}",
            on_message=self._on_message,
            subscriptions=[topics.assign(device_id), topics.task(device_id)],
            ca_file=ca_file,
        )
        self._worker = threading.Thread(target=self._work, name="hostile-board", daemon=True)

    # -- network thread: only parse and enqueue --

    def _on_message(self, topic: str, payload: bytes) -> None:
        kind = topic.rsplit("/", 2)[-2]
        if kind == "assign":
            self.assigned.set()
            return
        try:
            done = self._reassembler.add(payload, source="task")
        except Exception as exc:  # a hostile board does not care; keep the note
            self.errors.append(f"task chunk: {exc}")
            return
        if done is not None:
            self._inbox.put((done.meta, done.blob))

    # -- joining --

    def start(self) -> None:
        self.transport.start(timeout=30)
        self._worker.start()

    def join(self, coordinator_saw: Callable[[], bool], timeout: float = 60.0) -> bool:
        """Send the attack's registrations until the coordinator evidently read one (an assign
        came, or `coordinator_saw()`: its log names our register topic), then once more whole,
        so that every variant reached a listening coordinator. False on timeout."""
        messages = self._join_messages()
        end = time.monotonic() + timeout
        seen = False
        while time.monotonic() < end and not seen:
            self._publish_all(messages)
            seen = self.assigned.wait(0.5) or coordinator_saw()
        if seen:
            self._publish_all(messages)
            time.sleep(0.3)
        return seen

    def _publish_all(self, messages: list[tuple[str, bytes, bool]]) -> None:
        for topic, payload, retain in messages:
            self.transport.publish(topic, payload, retain=retain, wait=True)
            self.sent += 1

    def _join_messages(self) -> list[tuple[str, bytes, bool]]:
        reg, status = self.topics.register(self.device_id), self.topics.status(self.device_id)
        online = raw_message("status", {"device_id": self.device_id, "online": True})
        honest = raw_message("register", self.registration)
        if self.attack == "huge_numbers":
            body = self.registration
            paths = [p for p in numeric_paths(body) if p != ("v",)]
            bodies = [replaced(body, paths, v) for v in (BIG, NAN)]
            bodies += [replaced(body, [p], v) for p in paths for v in (BIG, NAN)]
            msgs = [(status, raw_message("status", s), False) for s in self._bad_statuses()]
            msgs += [(reg, raw_message("register", b), False) for b in bodies]
            return [*msgs, (status, online, True), (reg, honest, False)]
        if self.attack == "bad_registration":
            zip_ = replaced(self.registration, [("profile", "board", "preferred_storage")], "zip")
            bodies = [
                zip_,
                replaced(self.registration, [("profile", "board", "deploy_bits")], 7),
                replaced(self.registration, [("data", "n_samples")], 10**12),
                replaced(self.registration, [("data", "n_samples")], 2**70),
                {**self.registration, "profile": {}},
                zip_,
            ]
            return [(status, online, True)] + [
                (reg, raw_message("register", b), False) for b in bodies
            ]
        return [(status, online, True), (reg, honest, False)]

    def _bad_statuses(self) -> list[dict[str, Any]]:
        me = self.device_id
        return [
            {"device_id": me, "online": value, "sent_at": value, "seq": value}
            for value in (BIG, NAN)
        ] + [{"device_id": me, "online": True, "sent_at": NAN}]

    # -- tasks --

    def _work(self) -> None:
        while (item := self._inbox.get()) is not None:
            meta, blob = item
            if self._gone:
                continue
            try:
                self._answer(meta, blob)
            except Exception as exc:  # report, never kill the bench
                self.errors.append(f"round {meta.get('round')}: {type(exc).__name__}: {exc}")

    def _answer(self, task: dict[str, Any], blob: bytes) -> None:
        from bitfleet.protocol import pack_state, unpack_state

        rnd = task.get("round")
        self.tasks.append(rnd)
        state = unpack_state(blob)
        self.model_bytes = sum(t.numel() * t.element_size() for t in state.values())
        topic = self.topics.update(self.device_id)
        meta: dict[str, Any] = {
            "v": 1,
            "type": "update",
            "round": rnd,
            "job_id": task.get("job_id"),
            "n_samples": self.n_samples,
            "train_loss": 1.0,
            "train_seconds": 1.0,
            "board_seconds": 1.0,
        }
        if task.get("trial") is not None:
            meta["trial"] = task["trial"]
        first = len(self.tasks) == 1
        payloads: list[list[bytes]] = []
        if self.attack == "inflated_count":
            blob = pack_state(random_like(state))
            counts = (10**12, 1000 * self.n_samples)
            payloads = [raw_payload({**meta, "n_samples": n}, blob) for n in counts]
        elif self.attack == "random_weights":
            payloads = [raw_payload(meta, pack_state(random_like(state)))]
        elif self.attack == "huge_numbers":
            fields = ["round", "n_samples", "train_loss", "train_seconds", "board_seconds"]
            metas = [{**meta, "n_samples": BIG}]  # valid but for the count: the one that bites
            metas += [{**meta, **dict.fromkeys([*fields, "trial"], v)} for v in (BIG, NAN)]
            metas += [{**meta, f: v} for f in [*fields, "trial"] for v in (BIG, NAN)]
            payloads = [raw_payload(m, blob) for m in metas]
        elif self.attack == "chunk_flood" and first:
            self._flood(topic, meta)
        elif self.attack == "flood_during_upload" and first:
            self._flood(topic, meta, quiet=False)
        elif self.attack == "huge_declared" and first:
            self._huge(topic, meta)
        elif self.attack == "clean_disconnect":
            self._gone = True
            self.transport.stop()  # clean: the broker publishes no will; no status sent
        for chunks in payloads:
            self.transport.publish_many(topic, chunks, wait=True, timeout=60)
            self.sent += len(chunks)

    def _wait_quiet(self, timeout: float = 5.0) -> None:
        """Until `quiet()` (the honest updates of the round are in), at most `timeout` s."""
        end = time.time() + timeout
        while self.quiet is not None and not self.quiet() and time.time() < end:
            time.sleep(0.05)

    def _flood(self, topic: str, meta: dict[str, Any], quiet: bool = True) -> None:
        if quiet:
            self._wait_quiet()
        t0 = time.time()
        chunks = [raw_chunk(meta, b"\0", count=2, size=2) for _ in range(FLOOD_CHUNKS)]
        for i in range(0, len(chunks), 500):
            self.transport.publish_many(topic, chunks[i : i + 500], wait=True, timeout=120)
        self.sent += len(chunks)
        self.window = (t0, time.time())

    def _huge(self, topic: str, meta: dict[str, Any]) -> None:
        self._wait_quiet()
        t0 = time.time()
        data = os.urandom(MIB)
        count = HUGE_DECLARED // MIB
        for _ in range(HUGE_PAYLOADS):
            pid, sha = uuid.uuid4().hex, os.urandom(32).hex()
            for start in range(0, HUGE_SENT_CHUNKS, 10):
                chunks = [
                    raw_chunk(
                        meta, data, index=i, count=count, size=HUGE_DECLARED,
                        sha256=sha, payload_id=pid,
                    )
                    for i in range(start, min(start + 10, HUGE_SENT_CHUNKS))
                ]  # fmt: skip
                self.transport.publish_many(topic, chunks, wait=True, timeout=120)
                self.sent += len(chunks)
        self.window = (t0, time.time())

    def stop(self) -> None:
        self._inbox.put(None)
        self._worker.join(timeout=30)
        if not self._gone:
            self.transport.stop()
