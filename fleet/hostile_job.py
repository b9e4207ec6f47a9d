"""One job of `bitfleet bench hostile`: a provisioned fleet of four boards, the real coordinator
and three honest agents as processes, the hostile board in this process, and what it all left
behind (exit codes, models, accuracy, memory, drops).

Each job provisions a fleet of four boards (`fleet.provision`: TLS, one account each, the ACL),
starts Mosquitto with its config, and runs the real coordinator (`bitfleet coordinator serve`,
its own process) and three honest agents (`bitfleet agent run`, processes) on a subset of the
real Fashion-MNIST, written as IDX files into the work folder. The hostile board, dev3, is
`fleet.hostile_board.HostileBoard`, logged in with its own account; it registers before the
honest boards start and answers its tasks as its attack says.
"""

from __future__ import annotations

import contextlib
import gzip
import os
import re
import sqlite3
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

from .broker import MosquittoProcess, free_port
from .broker_config import MAX_PACKET_SIZE
from .hostile_board import HostileBoard

FLEET = "hostile"
HONEST = ("dev0", "dev1", "dev2")
HOSTILE = "dev3"
N_TRAIN, N_TEST = 1800, 1000
CHUNK_KIB = 64
"""The honest boards' upload chunks (`--chunk-kib`): LeNet-5's update is then several chunks,
so a partial honest upload is in progress when an attack could evict it."""
SETTLE_S = 1.0
"""How long after the attack's last acknowledged chunk its memory effect is still counted."""

_AGENT = (
    "import sys, torch, edge_agent.agent, bitfleet.cli.main as m\n"
    "if sys.stdin.readline().strip() != 'go': sys.exit(3)\n"  # the bench went away
    "sys.exit(m.main(sys.argv[1:]))"
)
"""`python -m bitfleet ARGS` with its imports done first, started while the coordinator starts:
the honest boards then register within a second of each other once released (a `go` line),
so round 0 holds all three, and each job saves the import time."""


# -- data, job, credentials -----------------------------------------------------------------


def _write_idx(path: Path, array: np.ndarray) -> None:
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(
        int(d).to_bytes(4, "big") for d in array.shape
    )
    with gzip.open(path, "wb", compresslevel=1) as f:
        f.write(header + array.astype(np.uint8).tobytes())


def write_fmnist_subset(folder: Path, n_train: int = N_TRAIN, n_test: int = N_TEST) -> Path:
    """The first `n_train` / `n_test` samples of the real Fashion-MNIST, as IDX .gz files."""
    from bitfleet.data import load_dataset

    data = load_dataset("fashion-mnist")
    folder.mkdir(parents=True, exist_ok=True)
    for prefix, x, y, n in (
        ("train", data.train_x, data.train_y, n_train),
        ("t10k", data.test_x, data.test_y, n_test),
    ):
        _write_idx(folder / f"{prefix}-images-idx3-ubyte.gz", x[:n, 0].numpy())
        _write_idx(folder / f"{prefix}-labels-idx1-ubyte.gz", y[:n].numpy())
    return folder


def job_config(state_dir: Path, rounds: int, deadline_s: float) -> dict[str, dict[str, Any]]:
    return {
        "job": {"name": "hostile", "fleet": FLEET, "seed": 0, "state_dir": str(state_dir)},
        "model": {"name": "lenet5"},
        "data": {"dataset": "fashion-mnist", "partition": "iid"},
        "training": {"rounds": rounds, "local_epochs": 1.0, "batch_size": 32},
        "rounds": {
            "min_devices": 3,
            "deadline_s": deadline_s,
            "quorum": 0.7,  # 3 of 4
            "register_timeout_s": 60.0,
        },
        "allocation": {"mode": "fixed", "strategy": "qat", "bits": 4},
        "deploy": {"bits": [8]},
    }


def _toml(d: dict[str, dict[str, Any]]) -> str:
    def value(v: Any) -> str:
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, str):
            return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
        if isinstance(v, list):
            return "[" + ", ".join(value(x) for x in v) + "]"
        return repr(v)

    return "".join(
        f"[{t}]\n" + "".join(f"{k} = {value(v)}\n" for k, v in kv.items()) for t, kv in d.items()
    )


def broker_login(fleet: Any, user: str) -> tuple[str, dict[str, str]]:
    """How a subprocess logs in as `user`: a broker URL for its command line, which never holds
    the password, and the environment variable that carries it (bitfleet.protocol.credentials)."""
    from bitfleet.protocol.credentials import PASSWORD_ENV

    return fleet.public_url(user), {PASSWORD_ENV: fleet.password(user)}


def honest_registration(data_dir: Path, n: int = 600) -> dict[str, Any]:
    """A real registration body for the hostile board: rpi5, 600 real labels."""
    from bitfleet.data import load_dataset
    from bitfleet.profiles import load_profile, measure_machine, profile_summary
    from bitfleet.registration import DataSummary

    labels = load_dataset("fashion-mnist", data_dir=data_dir).train_y[:n].numpy()
    return {
        "device_id": HOSTILE,
        "profile": profile_summary(load_profile("rpi5"), measure_machine(), None),
        "data": DataSummary.of_labels(labels, 10).to_dict(),
        "sent_at": time.time(),
    }


class RssSampler(threading.Thread):
    """VmRSS of one process (bytes) every `period` seconds, on the wall clock (`time.time`, as
    the store's `started_at`)."""

    def __init__(self, pid: int, period: float = 0.05) -> None:
        super().__init__(name="rss-sampler", daemon=True)
        self.path, self.period = Path(f"/proc/{pid}/status"), period
        self.samples: list[tuple[float, int]] = []
        self.halt = threading.Event()

    def run(self) -> None:
        while not self.halt.is_set():
            try:
                text = self.path.read_text()
            except OSError:
                return  # the process is gone
            match = re.search(r"^VmRSS:\s+(\d+) kB", text, re.M)
            if match:
                self.samples.append((time.time(), int(match.group(1)) * 1024))
            self.halt.wait(self.period)

    def growth(self, window: tuple[float, float]) -> tuple[int, int] | None:
        """(before, peak): the last sample before the window, the largest in it."""
        t0, t1 = window
        before = [r for t, r in self.samples if t < t0]
        inside = [r for t, r in self.samples if t0 <= t <= t1]
        if not before or not inside:
            return None
        return before[-1], max(inside)


# -- one job ----------------------------------------------------------------------------------


def _onnx_accuracy(path: Path, data: Any) -> float:
    from export.runtime import run_batches, session

    x = data.test_x.numpy().astype(np.float32) / 255.0
    logits = run_batches(session(str(path), threads=1), x)
    return float((logits.argmax(1) == data.test_y.numpy()).mean())


def _updates_in(db: Path, rnd: int) -> int:
    """Updates the coordinator stored for round `rnd` (a read-only look at its SQLite)."""
    try:
        with contextlib.closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True)) as conn:
            query = "SELECT COUNT(*) FROM updates WHERE round = ?"
            return conn.execute(query, (rnd,)).fetchone()[0]
    except sqlite3.Error:
        return 0


def _wait_connected(broker_log: Path, user: str, proc: subprocess.Popen, timeout: float) -> None:
    """Until Mosquitto logged `user`'s login (its subscriptions follow within milliseconds)."""
    end = time.monotonic() + timeout
    while f"u'{user}')" not in broker_log.read_text(errors="replace"):
        if proc.poll() is not None or time.monotonic() > end:
            return  # the job's figures will show it
        time.sleep(0.05)
    time.sleep(0.3)


def _spawn(cmd: list[str], log: Path, env: dict[str, str], **kw: Any) -> subprocess.Popen:
    with log.open("wb") as out:
        return subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, **kw)


def run_job(
    attack: str | None,
    work: Path,
    data_dir: Path,
    rounds: int = 3,
    deadline_s: float = 6.0,
    chunk_kib: int = CHUNK_KIB,
) -> dict[str, Any]:
    """One job: the three honest boards and, unless `attack` is None, the hostile dev3."""
    from fleet.provision import provision

    t_start = time.perf_counter()
    work.mkdir(parents=True, exist_ok=True)
    port = free_port()
    fleet = provision(FLEET, 4, work / "fleet", hosts=["localhost"], port=port, bind="127.0.0.1")
    if os.geteuid() == 0:  # root's Mosquitto would drop to a user that cannot read 0600 files
        with fleet.conf.open("a") as conf:
            conf.write("user root\n")
    base_env = {k: v for k, v in os.environ.items() if not k.startswith("BITFLEET_BROKER")}
    base_env.update(BITFLEET_DATA_DIR=str(data_dir), PYTHONUNBUFFERED="1")
    toml = work / "job.toml"
    toml.write_text(_toml(job_config(work / "state", rounds, deadline_s)))
    coord_log = work / "coordinator.log"
    procs: list[subprocess.Popen] = []
    board: HostileBoard | None = None
    result: dict[str, Any] = {"attack": attack or "baseline"}
    with MosquittoProcess(fleet.conf, port, work / "mosquitto.log"):
        try:
            url, env = broker_login(fleet, "coordinator")
            serve = [sys.executable, "-m", "bitfleet", "coordinator", "serve", "--config",
                     str(toml), "--broker", url, "--ca-file", str(fleet.ca_file)]  # fmt: skip
            coordinator = _spawn(serve, coord_log, {**base_env, **env})
            procs.append(coordinator)
            rss = RssSampler(coordinator.pid)
            rss.start()
            for i, device in enumerate(HONEST):
                url, env = broker_login(fleet, device)
                cmd = [sys.executable, "-c", _AGENT, "agent", "run", "--broker", url,
                       "--ca-file", str(fleet.ca_file), "--device-id", device, "--fleet", FLEET,
                       "--data", f"fashion-mnist:{i}/3", "--partition", "iid", "--profile",
                       "rpi5", "--threads", "1", "--no-step-measure", "--exit-after-model",
                       "--chunk-kib", str(chunk_kib), "--out-dir", str(work / device)]  # fmt: skip
                procs.append(
                    _spawn(cmd, work / f"{device}.log", {**base_env, **env}, stdin=subprocess.PIPE)
                )
            _wait_connected(work / "mosquitto.log", "coordinator", coordinator, 60)
            if attack is not None:
                from bitfleet.protocol import Topics

                address = fleet.address(HOSTILE)
                reg = honest_registration(data_dir)
                quiet = lambda: _updates_in(work / "state" / "state.sqlite", 0) >= len(HONEST)  # noqa: E731
                board = HostileBoard(attack, address, str(fleet.ca_file), Topics(fleet=FLEET),
                                     HOSTILE, reg, quiet)  # fmt: skip
                board.start()
                result["hostile_joined"] = board.join(
                    lambda: f"register/{HOSTILE}" in coord_log.read_text(errors="replace")
                )
            for p in procs[1:]:  # release the honest boards
                assert p.stdin is not None
                p.stdin.write(b"go\n")
                p.stdin.close()
            timeout = 60 + rounds * 3 * deadline_s
            with contextlib.suppress(subprocess.TimeoutExpired):
                coordinator.wait(timeout=timeout)
            for p in procs[1:]:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    p.wait(timeout=20 if coordinator.poll() is not None else 1)
            rss.halt.set()
            result["coordinator_exit"] = coordinator.poll()
            result["agent_exits"] = [p.poll() for p in procs[1:]]
        finally:
            if board is not None:
                board.stop()
            for p in procs:
                if p.poll() is None:
                    p.kill()
                    p.wait()
    result.update(_collect(work, data_dir, rounds, board, rss, deadline_s))
    result["wall_s"] = round(time.perf_counter() - t_start, 1)
    return result


def _collect(
    work: Path,
    data_dir: Path,
    rounds: int,
    board: HostileBoard | None,
    rss: RssSampler,
    deadline_s: float,
) -> dict[str, Any]:
    from bitfleet.data import load_dataset
    from coordinator.state import StateStore

    out: dict[str, Any] = {}
    store = StateStore.in_dir(work / "state")
    try:
        done = [h for h in store.round_history() if h["status"] == "done"]
        out["rounds_done"] = len(done)
        history = store.round_history()
        out["round0_started_at"] = history[0]["started_at"] if history else None
        out["acc_fp32"] = done[-1]["acc_fp32"] if done else None
        updates = [sorted(u["device_id"] for u in store.round_updates(r)) for r in range(rounds)]
    finally:
        store.close()
    out["updates_per_round"] = updates
    out["honest_updates_ok"] = all(set(HONEST) <= set(u) for u in updates)
    data = load_dataset("fashion-mnist", data_dir=data_dir)
    models: dict[str, float | None] = {}
    for device in HONEST:
        files = sorted((work / device).glob("*.onnx"))
        try:
            models[device] = _onnx_accuracy(files[0], data) if files else None
        except Exception:  # present but not loadable: no model
            models[device] = None
    out["honest_models"] = models
    log = (work / "coordinator.log").read_text(errors="replace")
    out["dropped"] = dict(Counter(re.findall(r"dropped message on \S+: (\w+)", log)))
    evicted = re.findall(r"dropping incomplete payload \S+ from '([^']*)'", log)
    out["evicted"] = dict(Counter(evicted))  # by source, the hostile's own included
    broker_log = (work / "mosquitto.log").read_text(errors="replace")
    out["broker_dropped_for_coordinator"] = broker_log.count("being dropped for client coordinator")
    out["coordinator_errors"] = [x for x in log.splitlines() if "Traceback" in x or "rror:" in x]
    out["_rss"] = rss.samples  # (wall time, bytes): not for JSON
    peak = max((r for _, r in rss.samples), default=0)
    out["rss_peak_mb"] = round(peak / 2**20, 1)
    if board is not None:
        out["hostile_tasks"] = board.tasks
        out["hostile_sent"] = board.sent
        out["hostile_errors"] = board.errors[:5]
        if board.model_bytes:
            out["model_bytes"] = board.model_bytes
            out["rss_limit_mb"] = round(rss_limit(board.model_bytes) / 2**20, 2)
        window = board.window
        if window and out["round0_started_at"]:  # not past round 0's deadline: its close
            end = min(window[1] + SETTLE_S, out["round0_started_at"] + deadline_s)
            window = (window[0], max(window[0], end))
        measured = rss.growth(window) if window else None
        if measured:
            before, peak = measured
            out["rss_before_mb"] = round(before / 2**20, 1)
            out["rss_window_peak_mb"] = round(peak / 2**20, 1)
            out["rss_growth_mb"] = round((peak - before) / 2**20, 2)
            out["attack_window_s"] = round(board.window[1] - board.window[0], 2)
            t0 = board.window[0]
            out["rss_trace_mb"] = [  # (s from the attack's start, MB), from 1 s before
                (round(t - t0, 2), round(r / 2**20, 1))
                for t, r in rss.samples
                if t0 - 1 <= t <= window[1] + 1
            ]
    return out


PACKET_ALLOWANCE = 2 * MAX_PACKET_SIZE
"""What receiving one MQTT packet costs the coordinator whatever it then does with it: paho's
read buffer and the payload's copy, kept by the allocator for the next packet. Measured with
huge_declared's headers all refused at the first chunk (nothing held): +3.74 MB for one 1 MiB
packet, +3.93 MB for 10, +3.82 MB for 1000 (docs/security.md#threat-model)."""


def rss_limit(model_bytes: int, devices: int = len(HONEST) + 1) -> int:
    """The most the coordinator's RSS may grow in a memory attack: 2 x the model's update size
    per device (what the reassembly quotas let a fleet hold), plus one packet's receive cost
    (`PACKET_ALLOWANCE`), which no receiver avoids and does not grow with the attack."""
    return 2 * model_bytes * devices + PACKET_ALLOWANCE
