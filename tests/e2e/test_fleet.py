"""The fleet end to end against a real Mosquitto: coordinator, agent processes, faults."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from bitfleet.data import DEFAULT_VALIDATION_FRACTION
from bitfleet.data.validation import validation_indices
from bitfleet.protocol import MqttTransport, Topics, parse_broker_url, split_payload
from coordinator.config import job_config_from_dict
from coordinator.server import Coordinator, RoundReport
from tests.tiny_fmnist import make_tiny_fmnist

FLEET = "t"


@pytest.fixture
def tiny_data(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Tiny data the agents and the coordinator both find through the env var."""
    folder = make_tiny_fmnist(tmp_path / "data", n_train=900, n_test=300)
    monkeypatch.setenv("BITFLEET_DATA_DIR", str(folder))
    return folder


def job(tmp_path: Path, **rounds: object) -> dict:
    return {
        "job": {"name": "t", "fleet": FLEET, "seed": 0, "state_dir": str(tmp_path / "state")},
        "data": {"partition": "iid"},
        "training": {"rounds": rounds.pop("n_rounds", 2), "local_epochs": 1.0, "batch_size": 32},
        "rounds": {
            "min_devices": 3,
            "deadline_s": 20.0,
            "quorum": 0.6,
            "register_timeout_s": 60.0,
            **rounds,
        },
        "allocation": {"strategy": "qat", "bits": 4},
        "deploy": {"bits": [8, 4]},
    }


PART_SAMPLES = len(validation_indices(900, DEFAULT_VALIDATION_FRACTION)[0]) // 3
"""Each agent's share of the 900 tiny training images, less the coordinator's validation split."""


def start_agent(url: str, i: int, tmp_path: Path) -> subprocess.Popen:
    cmd = [
        sys.executable, "-m", "bitfleet", "agent", "run",
        "--broker", url, "--data", f"fashion-mnist:{i}/3", "--partition", "iid",
        "--device-id", f"a{i}", "--profile", ["rpi4", "rpi5", "x86-server"][i],
        "--fleet", FLEET, "--out-dir", str(tmp_path / f"a{i}"), "--threads", "1",
        "--no-step-measure", "--exit-after-model",
    ]  # fmt: skip
    log = (tmp_path / f"a{i}.log").open("w")
    return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=os.environ.copy())


def wait_registered(url: str, n: int, timeout: float = 60.0) -> None:
    """Block until n agents have (retained) registrations on the broker."""
    seen: set[str] = set()
    topics = Topics(fleet=FLEET)
    watcher = MqttTransport(
        parse_broker_url(url),
        client_id="watcher",
        on_message=lambda topic, _: seen.add(topics.parse(topic)[1]),
        subscriptions=[topics.all("register")],
    )
    watcher.start(timeout=10)
    try:
        end = time.monotonic() + timeout
        while len(seen) < n:
            assert time.monotonic() < end, f"only {sorted(seen)} registered"
            time.sleep(0.05)
    finally:
        watcher.stop()


def stop_all(procs: list[subprocess.Popen]) -> None:
    for p in procs:
        if p.poll() is None:
            p.kill()
        p.wait()


def run_coordinator(cfg_dict: dict, url: str, **kwargs: object) -> tuple[Coordinator, list]:
    cfg = job_config_from_dict(cfg_dict, source="test")
    coordinator = Coordinator(cfg, url, **kwargs)  # type: ignore[arg-type]
    return coordinator, coordinator.run().reports


def test_two_round_federation_with_three_agents(mosquitto, tiny_data, tmp_path: Path) -> None:
    agents = [start_agent(mosquitto.url, i, tmp_path) for i in range(3)]
    try:
        coordinator, reports = run_coordinator(job(tmp_path), mosquitto.url)
        for p in agents:
            assert p.wait(timeout=60) == 0
    finally:
        stop_all(agents)
    # registration and assignment
    devices = {d.id: d for d in coordinator.store.devices()}
    assert set(devices) == {"a0", "a1", "a2"}
    assert all(devices[d].data["n_samples"] == PART_SAMPLES for d in devices)
    assert {d: coordinator.store.assignment(d).strategy for d in devices} == dict.fromkeys(
        devices, "qat"
    )
    # two rounds, every agent in each, evaluated
    assert [r.round for r in reports] == [0, 1]
    assert all(r.received == ["a0", "a1", "a2"] and not r.stragglers for r in reports)
    assert reports[-1].acc_fp32 > 0.5
    history = coordinator.store.round_history()
    assert [h["status"] for h in history] == ["done", "done"]
    assert [h["received"] for h in history] == [3, 3]
    # every agent received its ONNX model, which runs in onnxruntime
    for i in range(3):
        files = list((tmp_path / f"a{i}").glob("*.onnx"))
        assert len(files) == 1
        session = ort.InferenceSession(str(files[0]), providers=["CPUExecutionProvider"])
        out = session.run(None, {"pixels": np.zeros((2, 1, 28, 28), np.float32)})[0]
        assert out.shape == (2, 10)


def test_killed_agent_is_left_out_by_deadline_and_marked_offline(
    mosquitto, tiny_data, tmp_path: Path
) -> None:
    """a2 is killed the moment its round-1 task arrives: mid-round, before it can upload."""
    agents = [start_agent(mosquitto.url, i, tmp_path) for i in range(3)]
    tasks_seen: list[int] = []

    def on_task(topic: str, payload: bytes) -> None:
        tasks_seen.append(len(payload))
        if len(tasks_seen) == 2:  # round 0's task went through; round 1's just arrived
            agents[2].send_signal(signal.SIGKILL)

    watcher = MqttTransport(
        parse_broker_url(mosquitto.url),
        client_id="watcher-a2",
        on_message=on_task,
        subscriptions=[Topics(fleet=FLEET).task("a2")],
    )
    watcher.start(timeout=10)
    wait_registered(mosquitto.url, 3)
    try:
        # min_devices 2: the fleet goes on without the killed board after its round
        cfg = job(tmp_path, n_rounds=3, deadline_s=4.0, min_devices=2)
        coordinator, reports = run_coordinator(cfg, mosquitto.url)
    finally:
        watcher.stop()
        stop_all(agents)
    assert [r.round for r in reports] == [0, 1, 2]
    assert "a2" in reports[0].received
    assert reports[1].stragglers == ["a2"]  # selected, never reported: closed by deadline
    assert len(reports[1].received) == 2  # ... with the quorum of the other two
    assert "a2" not in reports[2].selected  # its last will marked it offline
    assert {d.id: d.online for d in coordinator.store.devices()}["a2"] is False


def test_malformed_message_and_oversized_chunk_are_dropped(
    mosquitto, tiny_data, tmp_path: Path
) -> None:
    agents = [start_agent(mosquitto.url, i, tmp_path) for i in range(3)]
    topics = Topics(fleet=FLEET)
    intruder = MqttTransport(
        parse_broker_url(mosquitto.url), client_id="intruder", on_message=lambda t, p: None
    )
    intruder.start(timeout=10)

    def attack(report: RoundReport) -> None:
        if report.round == 0:
            intruder.publish(topics.register("a1"), b"{not json", wait=True)
            big = split_payload("update", {"round": 1}, b"x" * 64, chunk_size=64)[0]
            header_len = int.from_bytes(big[:4], "big")
            forged = big[: 4 + header_len] + b"x" * (3 * 2**19)  # 1.5 MiB: more than a chunk
            intruder.publish(topics.update("a1"), forged, wait=True)

    try:
        coordinator, reports = run_coordinator(
            job(tmp_path, n_rounds=3), mosquitto.url, on_round=attack
        )
    finally:
        intruder.stop()
        stop_all(agents)
    assert len(reports) == 3
    assert coordinator.dropped.get("bad_json", 0) >= 1
    assert coordinator.dropped.get("too_large", 0) + coordinator.dropped.get("bad_chunk", 0) >= 1


def test_coordinator_killed_and_restarted_resumes_without_double_counting(
    mosquitto, tiny_data, tmp_path: Path
) -> None:
    cfg = job(tmp_path, n_rounds=4)
    toml = tmp_path / "job.toml"
    toml.write_text(_to_toml(cfg))
    agents = [start_agent(mosquitto.url, i, tmp_path) for i in range(3)]
    serve = [
        sys.executable, "-m", "bitfleet", "coordinator", "serve",
        "--config", str(toml), "--broker", mosquitto.url,
    ]  # fmt: skip
    ckpts = tmp_path / "state" / "checkpoints"
    try:
        first = subprocess.Popen(serve, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 120
        while not (ckpts / "round-00001.safetensors").exists():
            assert first.poll() is None, first.stdout.read().decode()
            assert time.monotonic() < deadline, "no checkpoint for round 1"
            time.sleep(0.05)
        first.send_signal(signal.SIGKILL)
        first.wait()
        second = subprocess.run(serve, capture_output=True, text=True, timeout=180)
        assert second.returncode == 0, second.stdout + second.stderr
        for p in agents:
            assert p.wait(timeout=60) == 0
    finally:
        stop_all(agents)
    from coordinator.state import StateStore

    store = StateStore(tmp_path / "state" / "state.sqlite")
    history = store.round_history()
    assert [h["round"] for h in history] == [0, 1, 2, 3]
    assert all(h["status"] == "done" for h in history)
    for h in history:
        updates = store.round_updates(h["round"])
        assert len(updates) == h["received"] == len({u["device_id"] for u in updates})
    assert "round 1/4" not in second.stdout  # resumed after the checkpointed round
    assert "round 4/4" in second.stdout


def _to_toml(d: dict) -> str:
    lines = []
    for table, values in d.items():
        lines.append(f"[{table}]")
        for k, v in values.items():
            if isinstance(v, str):
                lines.append(f'{k} = "{v}"')
            elif isinstance(v, bool):
                lines.append(f"{k} = {'true' if v else 'false'}")
            else:
                lines.append(f"{k} = {v}")
    return "\n".join(lines) + "\n"


def test_demo_on_the_embedded_broker_writes_its_outputs(tiny_data, tmp_path: Path) -> None:
    """`bitfleet demo` end to end (embedded amqtt broker, 2 agent processes, 1 round)."""
    import json

    out = tmp_path / "demo"
    summary = tmp_path / "demo.json"
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "bitfleet",
            "demo",
            "--devices",
            "2",
            "--rounds",
            "1",
            "--out",
            str(out),
            "--json",
            str(summary),
        ],  # fmt: skip
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "round 1/1" in done.stdout and "Traceback" not in done.stderr
    result = json.loads(summary.read_text())
    keys = {"devices", "rounds_completed", "final_acc_fp32", "final_acc_deploy", "deploy_bits"}
    keys |= {"onnx_files", "coordinator_overhead_s", "round_seconds"}
    assert keys <= set(result)
    assert result["devices"] == 2 and result["rounds_completed"] == 1
    assert len(result["onnx_files"]) == 2
    for row in result["per_device"]:
        assert abs(row["acc_onnx"] - result["final_acc_deploy"][str(row["bits"])]) <= 0.01
    for name in ("report.md", "metrics.jsonl", "accuracy.png", "devices.png"):
        assert (out / name).stat().st_size > 0
