"""The agent on a board: profile, register, train what it is told, upload, receive its model.

paho's network thread only parses and enqueues; training runs in the agent's main thread, so a
long local epoch never stalls keep-alives, and a lost broker only delays the next message (the
client reconnects with backoff and re-registers). One line per round is all it prints.
"""

from __future__ import annotations

import logging
import queue
import random
import re
import socket
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import torch

from bitfleet.data import DATASET_SPECS, ImageData, label_histogram, load_dataset, partition
from bitfleet.models import create_model_for
from bitfleet.profiles import (
    detect_board,
    load_profile,
    measure_machine,
    measure_step_times,
    profile_summary,
)
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
    validate_device_id,
    validate_message,
)
from bitfleet.quant import make_method
from bitfleet.training import train

log = logging.getLogger(__name__)

MAX_DOWNLOAD_BYTES = 256 * 2**20


@dataclass
class AgentOptions:
    broker: str
    data: str
    device_id: str | None = None
    dataset: str = "fashion-mnist"
    partition: str = "dirichlet"
    alpha: float = 0.5
    partition_seed: int = 0
    profile: str = "auto"
    out_dir: str = "bitfleet-models"
    state_dir: str | None = None
    fleet: str = "default"
    ca_file: str | None = None
    model: str = "lenet5"
    measure_steps: bool = True
    exit_after_model: bool = False
    threads: int | None = None


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
    `--data NAME:I/N` takes part I of N of a named data set, split by `--partition`, for
    virtual devices in demos and simulations.
    """
    named = re.fullmatch(r"([a-z0-9-]+):(\d+)/(\d+)", opts.data)
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
    data: ImageData = load_dataset(name)
    parts = partition(
        data.train_y.numpy(), count, opts.partition, seed=opts.partition_seed, alpha=opts.alpha
    )
    idx = torch.from_numpy(parts[index]).long()
    return data.train_x[idx], data.train_y[idx]


class EdgeAgent:
    def __init__(self, opts: AgentOptions) -> None:
        self.opts = opts
        state_dir = Path(opts.state_dir or Path.home() / ".local" / "state" / "bitfleet")
        self.device_id = opts.device_id or stable_device_id(state_dir)
        self.topics = Topics(fleet=opts.fleet)
        validate_device_id(self.device_id)
        self.address = parse_broker_url(opts.broker)
        self.inbox: queue.Queue[tuple[str, dict, bytes]] = queue.Queue()
        self.reassembler = Reassembler(
            max_bytes=MAX_DOWNLOAD_BYTES, max_chunks=MAX_DOWNLOAD_BYTES // 2**20 + 1, timeout_s=600
        )
        self.assignment: dict | None = None
        self.done = threading.Event()
        self.models: list[Path] = []
        self.transport: MqttTransport | None = None
        self._registered_at = time.monotonic()

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
        return profile_summary(board, measure_machine(), steps)

    def _register(self) -> None:
        assert self.transport is not None
        status = encode_message("status", {"device_id": self.device_id, "online": True})
        self.transport.publish(self.topics.status(self.device_id), status, retain=True)
        body = {
            "device_id": self.device_id,
            "profile": self.profile,
            "data": self.data_summary,
            "sent_at": time.time(),
        }
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
                self.assignment = decode_message(payload, "assign")
            elif kind in ("task", "model"):
                done = self.reassembler.add(payload, source=kind)
                if done is not None:
                    self.inbox.put((kind, validate_message(done.meta, kind), done.blob))
        except ProtocolError as exc:
            log.warning("dropped message on %s: %s (%s)", topic, exc.reason, exc)

    # -- main loop --------------------------------------------------------------------------

    def run(self) -> int:
        if self.opts.threads:
            torch.set_num_threads(self.opts.threads)
        self.x, self.y = load_local_data(self.opts)
        spec = DATASET_SPECS[self.opts.dataset]
        hist = label_histogram(self.y.numpy(), range(len(self.y)), spec.num_classes)
        self.data_summary = {"n_samples": len(self.y), "label_hist": [int(c) for c in hist]}
        self.profile = self._profile()
        offline = encode_message("status", {"device_id": self.device_id, "online": False})
        self.transport = MqttTransport(
            self.address,
            client_id=f"bitfleet-agent-{self.device_id}",
            on_message=self._on_message,
            will=(self.topics.status(self.device_id), offline, True),
            subscriptions=[
                self.topics.assign(self.device_id),
                self.topics.task(self.device_id),
                self.topics.model(self.device_id),
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
                    if self.assignment is None and time.monotonic() - self._registered_at > 10:
                        self._register()  # no answer yet: say it again
                    continue
                if kind == "task":
                    self._train(meta, blob)
                else:
                    self._store_model(meta, blob)
        finally:
            self.transport.publish(self.topics.status(self.device_id), offline, retain=True)
            self.transport.stop()
        return 0

    def stop(self) -> None:
        self.done.set()

    def _train(self, task: dict, blob: bytes) -> None:
        if self.assignment is None:
            log.warning("task for round %s before any assignment; skipped", task["round"])
            return
        job = self.assignment["job"]
        spec = DATASET_SPECS[job["dataset"]]
        model = create_model_for(job["model"], spec)
        options: dict[str, object] = {}
        if self.assignment["strategy"] in ("qat", "apqn"):
            options["bits"] = int(self.assignment["bits"])
        method = make_method(self.assignment["strategy"], **options)
        method.prepare(model)
        model.load_state_dict(unpack_state(blob))
        t0 = time.perf_counter()
        loss = train(
            model,
            self.x,
            self.y,
            method,
            epochs=float(task["local_epochs"]),
            batch_size=int(job["batch_size"]),
            lr=float(job["lr"]),
            optimizer=job["optimizer"],
            seed=random.Random(f"{self.device_id}:{task['round']}").randrange(2**31),
        )
        seconds = time.perf_counter() - t0
        meta = {
            "round": int(task["round"]),
            "job_id": task["job_id"],
            "n_samples": len(self.y),
            "train_loss": float(loss),
            "train_seconds": seconds,
        }
        state = {k: v.detach() for k, v in model.state_dict().items()}
        assert self.transport is not None
        chunks = split_payload("update", make_message("update", meta), pack_state(state))
        self.transport.publish_many(self.topics.update(self.device_id), chunks)
        name = method.name + (f" {options['bits']}-bit" if "bits" in options else "")
        print(
            f"[{self.device_id}] round {task['round']}: {name}, {len(self.y)} samples, "
            f"loss {loss:.3f}, {seconds:.1f} s",
            flush=True,
        )

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
