"""The roles of `bitfleet bench fleet`, each in a process of its own.

`python -m fleet.bench_roles coordinator SPEC` runs the real `Coordinator` on synthetic models;
`python -m fleet.bench_roles agents SPEC` runs `SPEC["ids"]` lightweight agents, one MQTT
connection each, that register and answer every task at once with an update of the model's
real size (no training). Each talks to the bench (fleet/bench_fleet.py) over its standard
streams: one line `ready` once it is set up, `result JSON` at the end; agents start connecting
on a `go` line and disconnect on `stop`.
"""

from __future__ import annotations

import json
import queue
import resource
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TextIO

FLEET = "bench"
SAMPLES_PER_AGENT = 100
"""What each lightweight agent registers and claims in its updates: the coordinator checks both."""

DEADLINE_S = 120.0
"""A round's deadline: far beyond what a round takes, so an update that misses it is lost."""


def _job(spec: dict[str, Any]) -> dict[str, Any]:
    """Float FedAvg of LeNet-5 over every agent each round; nothing else to decide."""
    return {
        "job": {"name": "bench-fleet", "fleet": FLEET, "seed": 0, "state_dir": spec["state"]},
        "model": {"name": "lenet5"},
        "training": {"rounds": spec["rounds"], "local_epochs": 1.0},
        "rounds": {
            "fraction": 1.0,
            "min_devices": spec["agents"],
            "quorum": 1.0,
            "deadline_s": DEADLINE_S,
            "register_timeout_s": 300.0,
        },
        "allocation": {"mode": "fixed", "strategy": "fp", "bits": 32},
        "deploy": {"bits": [8]},
    }


def _coordinator_role(spec: dict[str, Any], stdout: TextIO) -> None:
    """The real coordinator; its models are synthetic, so no data set is loaded (eight blank
    test and validation images keep its per-round evaluation trivial; the blank training split
    is as large as the count each agent registers, which the data set must hold) and nothing
    is exported."""
    import torch

    from bitfleet.data import DATASET_SPECS, ImageData
    from coordinator.config import job_config_from_dict
    from coordinator.server import Coordinator

    blank = torch.zeros(8, 1, 28, 28, dtype=torch.uint8)
    labels = torch.zeros(8, dtype=torch.int64)
    train = torch.zeros(SAMPLES_PER_AGENT, 1, 28, 28, dtype=torch.uint8)
    train_labels = torch.zeros(SAMPLES_PER_AGENT, dtype=torch.int64)
    cfg = job_config_from_dict(_job(spec), source="bench fleet")
    data = ImageData(  # the validation split given, so the whole training split stays
        train, train_labels, blank, labels, DATASET_SPECS["fashion-mnist"],
        val_x=blank, val_y=labels, validation_fraction=cfg.data.validation_fraction,
    )  # fmt: skip
    coordinator = Coordinator(cfg, spec["url"], data=data, export=False)

    def announce_ready() -> None:  # once subscribed, so that no registration is missed
        if coordinator.listening.wait(60):
            print("ready", file=stdout, flush=True)

    queued = [0]

    def watch_queue() -> None:  # updates received but not folded yet: memory the fold owes
        while True:
            queued[0] = max(queued[0], coordinator.pending_updates())
            time.sleep(0.02)

    threading.Thread(target=announce_ready, daemon=True).start()
    threading.Thread(target=watch_queue, daemon=True).start()
    job = coordinator.run()
    reports = job.reports
    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    result = {
        "received": [len(r.received) for r in reports],
        "overhead_s": [r.overhead_seconds for r in reports],
        "round_s": [r.host_seconds for r in reports],
        "last_registered_at": max(d.registered_at for d in coordinator.store.devices()),
        "peak_rss_mb": peak_kib / 1024,
        "dropped": job.dropped,
        "max_queued_updates": queued[0],
        "update_bytes": sum(v.numel() * v.element_size() for v in job.global_state.values()),
    }
    print("result " + json.dumps(result), file=stdout, flush=True)


class _Agent:
    """One board as the coordinator sees it: registers, and answers each task with an update."""

    def __init__(self, device: str, url: str, answer: queue.Queue, profile: dict) -> None:
        from bitfleet.protocol import MqttTransport, Reassembler, Topics, encode_message

        self.device = device
        self.topics = Topics(fleet=FLEET)
        self.answer = answer
        self.profile = profile
        self.reassembler = Reassembler(max_bytes=64 * 2**20, max_chunks=65, timeout_s=600)
        offline = encode_message("status", {"device_id": device, "online": False})
        self.transport = MqttTransport(
            url,
            f"bench-{device}",
            self._on_message,
            will=(self.topics.status(device), offline, True),
            subscriptions=[self.topics.task(device)],
            on_connect=self._register,
        )

    def _register(self) -> None:
        from bitfleet.protocol import encode_message

        online = encode_message("status", {"device_id": self.device, "online": True})
        self.transport.publish(self.topics.status(self.device), online, retain=True)
        body = {
            "device_id": self.device,
            "profile": self.profile,
            "data": {
                "n_samples": SAMPLES_PER_AGENT,
                "label_hist": [SAMPLES_PER_AGENT // 10] * 10,
            },
            "sent_at": time.time(),
        }
        self.transport.publish(self.topics.register(self.device), encode_message("register", body))

    def _on_message(self, topic: str, payload: bytes) -> None:
        from bitfleet.protocol import ProtocolError, validate_message

        try:
            done = self.reassembler.add(payload, source="task")
            if done is not None:
                self.answer.put((self, validate_message(done.meta, "task"), done.blob))
        except ProtocolError as exc:
            print(f"{self.device}: bad task ({exc.reason}): {exc}", file=sys.stderr, flush=True)


def _answer_tasks(answer: queue.Queue, sent: list[int]) -> None:
    """Turn tasks into updates: the task's model plus noise, built once per round and process."""
    import torch

    from bitfleet.protocol import make_message, pack_state, split_payload, unpack_state

    cache: tuple[tuple, bytes] | None = None
    while (item := answer.get()) is not None:
        agent, task, blob = item
        key = (task["job_id"], task["round"], task.get("trial"))
        if cache is None or cache[0] != key:
            state = unpack_state(blob)
            noisy = {
                k: v + 1e-3 * torch.randn_like(v) if v.is_floating_point() else v
                for k, v in state.items()
            }
            cache = (key, pack_state(noisy))
        meta = {
            "round": task["round"],
            "job_id": task["job_id"],
            "n_samples": SAMPLES_PER_AGENT,
            "train_loss": 1.0,
            "train_seconds": 0.0,
        }
        if task.get("trial") is not None:
            meta["trial"] = task["trial"]
        chunks = split_payload("update", make_message("update", meta), cache[1])
        agent.transport.publish_many(agent.topics.update(agent.device), chunks, wait=False)
        sent[0] += 1


def _agents_role(spec: dict[str, Any], stdin: TextIO, stdout: TextIO) -> None:
    """`spec["ids"]` agents: connect on `go`, serve tasks, disconnect on `stop`."""
    from bitfleet.profiles import load_profile, measure_machine, profile_summary

    profile = profile_summary(load_profile("x86-server"), measure_machine(), None)
    answer: queue.Queue = queue.Queue()
    sent = [0]
    worker = threading.Thread(target=_answer_tasks, args=(answer, sent), daemon=True)
    worker.start()
    print("ready", file=stdout, flush=True)
    if stdin.readline().strip() != "go":
        return
    agents = [_Agent(device, spec["url"], answer, profile) for device in spec["ids"]]
    with ThreadPoolExecutor(16) as pool:  # connecting waits for the broker: overlap the waits
        list(pool.map(lambda a: a.transport.start(timeout=120), agents))
    stdin.readline()  # "stop", or the bench went away
    answer.put(None)
    worker.join(30)
    for agent in agents:
        agent.transport.stop(flush_timeout=1)
    print("result " + json.dumps({"updates_sent": sent[0]}), file=stdout, flush=True)


def _role_main(argv: list[str]) -> int:
    role, spec = argv[0], json.loads(argv[1])
    if role == "coordinator":
        _coordinator_role(spec, sys.stdout)
    elif role == "agents":
        _agents_role(spec, sys.stdin, sys.stdout)
    else:
        raise SystemExit(f"unknown role {role!r}")
    return 0


if __name__ == "__main__":
    sys.exit(_role_main(sys.argv[1:]))
