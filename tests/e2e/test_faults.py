"""Faults a fleet must survive, each against a real Mosquitto process.

A board killed halfway through its upload, the broker restarted while boards train, the
coordinator killed and restarted, a checkpoint that cannot be written. Each test states what
must hold afterwards: no partial upload counted, no update lost or counted twice, the same model
as a run without the fault, a clear error and an intact previous checkpoint.

What a fault kills is a process of its own (`bitfleet agent run`, `bitfleet coordinator serve`);
the other agents are the same `EdgeAgent` in threads of the test process, which spares each the
seconds a process spends importing torch on the 2-core CI machine.
"""

from __future__ import annotations

import json
import queue
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from bitfleet.protocol import MqttTransport, Reassembler, Topics, unpack_state
from coordinator.checkpoint import (
    CHECKPOINT_DIR,
    LATEST,
    checkpoint_path,
    load_latest_checkpoint,
)
from coordinator.config import job_config_from_dict
from coordinator.server import Coordinator, RoundReport
from coordinator.state import StateStore
from edge_agent.agent import AgentOptions, EdgeAgent
from tests.read_only import make_read_only
from tests.tiny_fmnist import make_tiny_fmnist

FLEET = "faults"


@pytest.fixture
def tiny_data(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """600 tiny images: agents (200 each of 3 parts) and the coordinator find them by env var."""
    folder = make_tiny_fmnist(tmp_path / "data", n_train=600, n_test=100)
    monkeypatch.setenv("BITFLEET_DATA_DIR", str(folder))
    return folder


@pytest.fixture
def other_mosquitto(mosquitto, tmp_path: Path) -> Iterator[Any]:
    """A second broker beside `mosquitto`: the same binary, its own port and config."""
    folder = tmp_path / "other-broker"
    folder.mkdir()
    broker = type(mosquitto)(mosquitto.binary, folder)
    broker.start()
    try:
        yield broker
    finally:
        broker.stop()


def job(state_dir: Path, *, fleet: str = FLEET, rounds: int = 2, **table: object) -> dict:
    """A small job: QAT at 4 bits, one deploy width (one ONNX export), `[rounds]` from `table`."""
    return {
        "job": {"name": "faults", "fleet": fleet, "seed": 0, "state_dir": str(state_dir)},
        "data": {"partition": "iid"},
        "training": {"rounds": rounds, "local_epochs": 1.0, "batch_size": 32},
        "rounds": {
            "min_devices": 3,
            "deadline_s": 60.0,
            "quorum": 1.0,
            "register_timeout_s": 90.0,
            **table,
        },
        "allocation": {"strategy": "qat", "bits": 4},
        "deploy": {"bits": [8]},
    }


def start_agent(
    url: str, i: int, log_dir: Path, *, fleet: str = FLEET, extra: Sequence[str] = ()
) -> subprocess.Popen:
    """`bitfleet agent run` as `a<i>` on part i of 3 of the tiny data; exits once its model
    arrived."""
    cmd = [
        sys.executable, "-m", "bitfleet", "agent", "run",
        "--broker", url, "--data", f"fashion-mnist:{i}/3", "--partition", "iid",
        "--device-id", f"a{i}", "--profile", "x86-server", "--fleet", fleet,
        "--out-dir", str(log_dir / f"{fleet}-a{i}"), "--threads", "1", "--no-step-measure",
        "--exit-after-model", *extra,
    ]  # fmt: skip
    with (log_dir / f"{fleet}-a{i}.log").open("a") as log:
        return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)


class AgentThread(threading.Thread):
    """The same agent as `start_agent`'s, run in a thread of the test process."""

    def __init__(self, url: str, i: int, out_dir: Path, fleet: str = FLEET) -> None:
        super().__init__(name=f"{fleet}-a{i}", daemon=True)
        options = AgentOptions(
            broker=url,
            data=f"fashion-mnist:{i}/3",
            device_id=f"a{i}",
            partition="iid",
            profile="x86-server",
            fleet=fleet,
            out_dir=str(out_dir / f"{fleet}-a{i}"),
            measure_steps=False,
            exit_after_model=True,
        )
        self.agent = EdgeAgent(options)
        self.code: int | None = None
        self.start()

    def run(self) -> None:
        self.code = self.agent.run()

    def wait(self, timeout: float) -> int | None:
        """The agent's exit code once it got its model; None if it did not within `timeout`."""
        self.join(timeout)
        return self.code


def agent_threads(url: str, count: int, out_dir: Path, fleet: str = FLEET) -> list[AgentThread]:
    """Agents a0 .. a<count-1>, started."""
    return [AgentThread(url, i, out_dir, fleet) for i in range(count)]


def stop_all(procs: Sequence[subprocess.Popen] = (), threads: Sequence[AgentThread] = ()) -> None:
    for p in procs:
        if p.poll() is None:
            p.kill()
        p.wait()
    for t in threads:
        t.agent.stop()
    for t in threads:
        t.join(10)


def serve(config: dict, url: str, tmp_path: Path) -> list[str]:
    """The `bitfleet coordinator serve` command line for `config`, written as a TOML job file."""
    toml = tmp_path / f"{config['job']['fleet']}.toml"
    lines = []
    for table, values in config.items():
        lines.append(f"[{table}]")
        lines += [f"{key} = {json.dumps(value)}" for key, value in values.items()]
    toml.write_text("\n".join(lines) + "\n")
    return [sys.executable, "-m", "bitfleet", "coordinator", "serve", "--config", str(toml),
            "--broker", url]  # fmt: skip


@contextmanager
def watching(
    url: str, topics: Sequence[str], on_message: Callable[[str, bytes], None]
) -> Iterator[MqttTransport]:
    """A test's own MQTT client on `topics` (the broker's view of what went through)."""
    watcher = MqttTransport(
        url, f"watcher-{time.monotonic_ns()}", on_message, subscriptions=list(topics)
    )
    watcher.start(timeout=10)
    try:
        yield watcher
    finally:
        watcher.stop(flush_timeout=1)


def chunk_header(payload: bytes) -> dict:
    """The JSON header of one chunk message (bitfleet.protocol.chunks)."""
    size = int.from_bytes(payload[:4], "big")
    return json.loads(payload[4 : 4 + size])


def checkpoint_model(state_dir: Path, rnd: int) -> dict[str, torch.Tensor]:
    """The global model in round `rnd`'s checkpoint file (kept: the last three rounds)."""
    tensors = load_file(str(checkpoint_path(state_dir, rnd)))
    return {k.removeprefix("model."): v for k, v in tensors.items() if k.startswith("model.")}


def assert_consistent(state_dir: Path, received: Sequence[int]) -> None:
    """SQLite intact; round r done with `received[r]` updates, one row per (round, device)."""
    db = state_dir / "state.sqlite"
    with sqlite3.connect(db) as conn:
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        twice = conn.execute(
            "SELECT round, device_id FROM updates GROUP BY round, device_id HAVING COUNT(*) > 1"
        ).fetchall()
        assert twice == []
    with StateStore(db) as store:
        history = store.round_history()
        assert [h["round"] for h in history] == list(range(len(received)))
        assert all(h["status"] == "done" for h in history)
        for h, n in zip(history, received, strict=True):
            rows = store.round_updates(h["round"])
            assert h["received"] == len(rows) == n, (h, rows)


class Relay:
    """A TCP relay to the broker: a client's network path, which a test can make slow or cut.

    `rate` (bytes/s) throttles the uplink, client to broker, like a board on a slow link; what
    the client wrote but the link has not carried yet dies with the client, as on a real link,
    so a client killed mid-upload leaves the broker with part of it. While `held`, the path is
    down: connections are accepted and closed at once, so the client keeps retrying.
    """

    SLICE = 4096

    def __init__(self, broker_port: int, rate: float | None = None) -> None:
        self.broker_port = broker_port
        self.rate = rate
        self.held = False
        self.server = socket.create_server(("127.0.0.1", 0))
        self.url = f"mqtt://127.0.0.1:{self.server.getsockname()[1]}"
        threading.Thread(target=self._accept, daemon=True).start()

    def close(self) -> None:
        self.server.close()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.server.accept()
            except OSError:
                return  # closed
            if self.held:
                client.close()
                continue
            try:
                upstream = socket.create_connection(("127.0.0.1", self.broker_port))
            except OSError:  # the broker is down, and so is this path
                client.close()
                continue
            pending: queue.Queue[bytes] = queue.Queue()
            gone = threading.Event()
            for target, args in (
                (self._read, (client, pending, gone)),
                (self._uplink, (pending, gone, upstream, client)),
                (self._downlink, (upstream, client)),
            ):
                threading.Thread(target=target, args=args, daemon=True).start()

    @staticmethod
    def _read(client: socket.socket, pending: queue.Queue[bytes], gone: threading.Event) -> None:
        with suppress(OSError):
            while data := client.recv(65536):
                pending.put(data)
        gone.set()

    def _uplink(
        self,
        pending: queue.Queue[bytes],
        gone: threading.Event,
        upstream: socket.socket,
        client: socket.socket,
    ) -> None:
        step = self.SLICE if self.rate else 1 << 30
        with suppress(OSError):
            while not gone.is_set():
                try:
                    data = pending.get(timeout=0.05)
                except queue.Empty:
                    continue
                for start in range(0, len(data), step):
                    if gone.is_set():
                        break  # the bytes still queued are lost with the client
                    upstream.sendall(data[start : start + step])
                    if self.rate:
                        time.sleep(step / self.rate)
        for sock in (upstream, client):
            with suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()

    @staticmethod
    def _downlink(upstream: socket.socket, client: socket.socket) -> None:
        with suppress(OSError):
            while data := upstream.recv(65536):
                client.sendall(data)
        with suppress(OSError):
            client.shutdown(socket.SHUT_RDWR)


def test_agent_killed_mid_upload(mosquitto, tiny_data, tmp_path: Path) -> None:
    """a2 uploads in 16 KiB chunks over a slow link and is SIGKILLed when its first chunk reaches
    the broker. Round 0 closes by quorum with a0 and a1, its model is the mean of theirs, and
    the coordinator dropped a2's partial upload when the broker announced a2 offline. a2,
    started again once round 0 closed, takes part in round 1."""
    topics = Topics(fleet=FLEET)
    link = Relay(mosquitto.port, rate=128 * 1024)  # the 250 KB update would take 2 s
    others = agent_threads(mosquitto.url, 2, tmp_path)
    a2 = [start_agent(link.url, 2, tmp_path, extra=["--chunk-kib", "16"])]
    a2_chunks: list[dict] = []
    round0: dict[str, dict[str, torch.Tensor]] = {}
    reassembler = Reassembler(max_bytes=2**24, max_chunks=64, timeout_s=60)

    def on_update(topic: str, payload: bytes) -> None:
        device = topics.parse(topic)[1]
        if device == "a2":
            if not a2_chunks:
                a2[0].send_signal(signal.SIGKILL)
            a2_chunks.append(chunk_header(payload))
        elif (done := reassembler.add(payload, source=device)) and done.meta["round"] == 0:
            round0[device] = unpack_state(done.blob)

    def on_round(report: RoundReport) -> None:
        if report.round == 0:  # round 1 waits for three devices online: a2 again
            a2[0].wait()
            a2.append(start_agent(mosquitto.url, 2, tmp_path))

    cfg = job(tmp_path / "state", deadline_s=6.0, quorum=0.6)
    try:
        with watching(mosquitto.url, [topics.all("update")], on_update):
            coordinator = Coordinator(
                job_config_from_dict(cfg, source="test"), mosquitto.url, on_round=on_round
            )
            reports = coordinator.run().reports
        assert a2[1].wait(timeout=60) == 0  # the restarted a2 got its model
        assert [t.wait(timeout=60) for t in others] == [0, 0]
    finally:
        stop_all(a2, others)
        link.close()

    first_upload = [h for h in a2_chunks if h["meta"]["round"] == 0]
    assert 0 < len({h["index"] for h in first_upload}) < first_upload[0]["count"]
    assert reports[0].received == ["a0", "a1"] and reports[0].stragglers == ["a2"]
    assert [u["device_id"] for u in coordinator.store.round_updates(0)] == ["a0", "a1"]
    expected = {k: (round0["a0"][k] + round0["a1"][k]) / 2 for k in round0["a0"]}  # 200 each
    got = checkpoint_model(tmp_path / "state", 0)
    assert all(torch.allclose(got[k], expected[k], atol=1e-6) for k in expected)
    assert coordinator.intake.reassembler.pending == 0
    assert reports[1].received == ["a0", "a1", "a2"]  # a2 rejoined
    assert_consistent(tmp_path / "state", received=[2, 3])


def test_broker_restarted_mid_round(mosquitto, tiny_data, tmp_path: Path) -> None:
    """Mosquitto stops while the three agents train round 0 and comes back on the same port two
    seconds later, without persistence: it forgets every session and subscription. The
    coordinator's own path to it stays down two seconds longer, so the boards are back first
    and publish their updates while nobody subscribes to them. Both sides reconnect, and the
    job completes with every update counted exactly once."""
    topics = Topics(fleet=FLEET)
    agents = agent_threads(mosquitto.url, 3, tmp_path)
    path = Relay(mosquitto.port)  # the coordinator's
    tasks: set[str] = set()
    all_tasked = threading.Event()

    def on_task(topic: str, payload: bytes) -> None:
        tasks.add(topics.parse(topic)[1])
        if len(tasks) == 3:
            all_tasked.set()

    def restart_broker() -> None:
        if all_tasked.wait(120):
            path.held = True
            mosquitto.stop()
            time.sleep(2.0)
            mosquitto.start()
            time.sleep(2.0)
            path.held = False

    restarter = threading.Thread(target=restart_broker, daemon=True)
    restarter.start()
    cfg = job(tmp_path / "state", rounds=2, deadline_s=20.0)
    cfg["training"]["local_epochs"] = 8.0  # about a second of training on a loaded core
    coordinator = Coordinator(job_config_from_dict(cfg, source="test"), path.url)
    guard = threading.Timer(90, coordinator.stop)  # a lost update must fail the test, not hang
    guard.start()
    try:
        with watching(mosquitto.url, [topics.all("task")], on_task):
            reports = coordinator.run().reports
        restarter.join(timeout=10)
        assert not restarter.is_alive() and all_tasked.is_set()
        assert [r.received for r in reports] == [["a0", "a1", "a2"]] * 2
        assert [p.wait(timeout=60) for p in agents] == [0, 0, 0]
    finally:
        guard.cancel()
        stop_all(threads=agents)
        path.close()
    assert_consistent(tmp_path / "state", received=[3, 3])


RESUMED_ALLOCATIONS = {
    "fixed_qat": {"mode": "fixed", "strategy": "qat"},
    "fedhq": {"mode": "fedhq"},
    # A 4-bit budget pruned from 8 bits: each round's aggregate revises the layer bits.
    "mpq": {"mode": "fixed", "strategy": "mpq", "bits": 4, "mpq_lasso": 0.01},
}


@pytest.mark.parametrize("allocation", list(RESUMED_ALLOCATIONS))
def test_coordinator_killed_and_restarted_matches_an_uninterrupted_run(
    allocation: str, mosquitto, other_mosquitto, tiny_data, tmp_path: Path
) -> None:
    """Two jobs with the same seed and boards run side by side, each on its own broker: `ref`
    without a fault; in `kill`, the coordinator (`bitfleet coordinator serve`) is SIGKILLed
    as the first update of round 1 reaches the broker, and started again. It resumes after
    round 0's checkpoint and ends with `ref`'s model and `ref`'s assignments (FedMPQ's layer
    bits included); its SQLite state is intact: round 1's half-counted updates were rolled
    back, every round counted once per device."""
    kill_cfg = job(tmp_path / "kill", fleet="kill", rounds=3)
    ref_cfg = job(tmp_path / "ref", fleet="ref", rounds=3)
    for cfg in (kill_cfg, ref_cfg):
        cfg["allocation"] = dict(RESUMED_ALLOCATIONS[allocation])
    agents = agent_threads(mosquitto.url, 3, tmp_path, fleet="kill")
    agents += agent_threads(other_mosquitto.url, 3, tmp_path, fleet="ref")
    cmd = serve(kill_cfg, mosquitto.url, tmp_path)
    with (tmp_path / "killed-coordinator.log").open("w") as log:
        coordinators = [subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)]
    killed = threading.Event()

    def on_update(topic: str, payload: bytes) -> None:
        if not killed.is_set() and chunk_header(payload)["meta"]["round"] == 1:
            coordinators[0].send_signal(signal.SIGKILL)
            killed.set()
            coordinators[0].wait()
            coordinators.append(
                subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            )

    try:
        with watching(mosquitto.url, [Topics(fleet="kill").all("update")], on_update):
            ref = Coordinator(job_config_from_dict(ref_cfg, source="test"), other_mosquitto.url)
            ref_result = ref.run()
            assert killed.wait(120)
        out, err = coordinators[1].communicate(timeout=180)
        assert coordinators[1].returncode == 0, out + err
        assert [p.wait(timeout=60) for p in agents] == [0] * 6
    finally:
        stop_all(coordinators, agents)
    assert "resuming job" in err and "after round 0" in err
    assert "round 1/3" not in out and "round 3/3" in out
    found = load_latest_checkpoint(tmp_path / "kill")
    assert found is not None and found[0] == 2
    resumed, reference = found[1], ref_result.global_state
    assert resumed.keys() == reference.keys()
    for name, tensor in reference.items():
        assert torch.allclose(resumed[name], tensor, rtol=1e-5, atol=1e-6), name
    assert_consistent(tmp_path / "kill", received=[3, 3, 3])
    assert_consistent(tmp_path / "ref", received=[3, 3, 3])
    with StateStore(tmp_path / "kill" / "state.sqlite") as store:
        kept = {d: (a.strategy, a.bits, a.per_layer_bits) for d, a in store.assignments().items()}
    want = {d: (a.strategy, a.bits, a.per_layer_bits) for d, a in ref_result.assignments.items()}
    assert kept == want
    if allocation == "mpq":  # FedMPQ's per-layer bits are part of what survives
        assert all(layers for _, _, layers in kept.values())


def block_checkpoints(state_dir: Path) -> Callable[[], None]:
    """Make the state directory and its checkpoints read-only; return the undo.

    Where no directory can be made read-only for root (no CAP_LINUX_IMMUTABLE, a file system
    without the flag), a non-empty directory on round 1's checkpoint path makes the final
    rename fail instead, for root as well.
    """
    undo = make_read_only(state_dir, state_dir / CHECKPOINT_DIR)
    if undo is not None:
        return undo
    squat = checkpoint_path(state_dir, 1)
    (squat / "in-the-way").mkdir(parents=True)
    return lambda: shutil.rmtree(squat)


def test_checkpoint_write_failure_keeps_the_previous_checkpoint(
    mosquitto, tiny_data, tmp_path: Path
) -> None:
    """The state directory turns read-only while round 1 runs: `coordinator serve` stops with
    an error (no traceback) naming the checkpoint it could not write, and round 0's checkpoint
    is intact: LATEST names it, it loads, no temporary file is left behind."""
    state = tmp_path / "state"
    cmd = serve(job(state, rounds=2, min_devices=2), mosquitto.url, tmp_path)
    agents = agent_threads(mosquitto.url, 2, tmp_path)
    undo: list[Callable[[], None]] = []

    def on_task(topic: str, payload: bytes) -> None:
        if not undo and chunk_header(payload)["meta"]["round"] == 1:
            undo.append(block_checkpoints(state))

    try:
        with watching(mosquitto.url, [Topics(fleet=FLEET).all("task")], on_task):
            done = subprocess.run(cmd, capture_output=True, text=True, timeout=180)
    finally:
        for restore in undo:
            restore()
        stop_all(threads=agents)
    assert undo, "round 1 never started"
    assert done.returncode == 1, done.stdout + done.stderr
    assert f"cannot write the checkpoint of round 1 to {checkpoint_path(state, 1)}" in done.stderr
    assert "Traceback" not in done.stderr
    ckdir = state / CHECKPOINT_DIR
    assert (ckdir / LATEST).read_text().strip() == "round-00000.safetensors"
    assert not list(ckdir.glob(".*.tmp"))
    found = load_latest_checkpoint(state)
    assert found is not None and found[0] == 0
