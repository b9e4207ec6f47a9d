"""Unit tests of the board's agent (`edge_agent`), without a broker process.

The agent runs `run()` in a thread on an `InProcessBus`; the test stands where the coordinator
would and speaks only the wire protocol: it publishes `assign`, `task` and `model` messages built
with `bitfleet.protocol` and reads back what the board sends (register, status, update chunks).
Data are 60 generated Fashion-MNIST look-alikes (`tests.tiny_fmnist`), the model LeNet-5, so a
round trains in a fraction of a second.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import re
import signal
import socket
import struct
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from bitfleet.data import DATASET_SPECS, DEFAULT_VALIDATION_FRACTION, load_dataset
from bitfleet.data.validation import validation_indices
from bitfleet.models import create_model_for
from bitfleet.profiles import detect_board, load_profile, load_profiles, profile_summary
from bitfleet.protocol import (
    DEVICE_ID_PATTERN,
    Payload,
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
from bitfleet.protocol.inprocess import InProcessBus
from edge_agent import agent as agent_module
from edge_agent import cli
from edge_agent.agent import AgentOptions, EdgeAgent, load_local_data, stable_device_id
from tests.tiny_fmnist import make_tiny_fmnist

DEVICE = "board-1"
JOB_ID = "job-1"
TOPICS = Topics(fleet="unit")
JOB = {
    "model": "lenet5",
    "dataset": "fashion-mnist",
    "batch_size": 32,
    "local_epochs": 1,
    "lr": 1e-3,
    "optimizer": "adam",
}
N_TRAIN = 60
#: Update chunks of 16 KiB: a LeNet-5 update is many chunks, so "the same chunks" means a list.
CHUNK = 16 * 1024
WAIT_S = 20.0

#: Any board but the one this host is: an agent standing for it is an emulated board.
OTHER_BOARD = next(name for name in sorted(load_profiles()) if name != detect_board().name)


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_fmnist(tmp_path_factory.mktemp("fmnist"), n_train=N_TRAIN, n_test=10)


@pytest.fixture(scope="module")
def samples(tiny_data: Path) -> tuple[torch.Tensor, torch.Tensor]:
    data = load_dataset("fashion-mnist", data_dir=tiny_data)
    return data.train_x, data.train_y


def initial_state() -> dict[str, torch.Tensor]:
    """The global model a coordinator sends with a task (seeded; the global RNG is left as is)."""
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = create_model_for(JOB["model"], DATASET_SPECS[JOB["dataset"]])
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _options(tmp_path: Path, **changes: Any) -> AgentOptions:
    base = AgentOptions(
        broker="mqtt://in-process",
        data="(given)",
        device_id=DEVICE,
        fleet=TOPICS.fleet,
        out_dir=str(tmp_path / "models"),
        state_dir=str(tmp_path / "state"),
        measure_steps=False,
        quiet=True,
        chunk_size=CHUNK,
    )
    return replace(base, **changes)


class CoordinatorSide:
    """The coordinator's end of the bus: what it publishes to a board, and what it receives."""

    def __init__(self, bus: InProcessBus) -> None:
        self._got: dict[str, list[bytes]] = defaultdict(list)
        self._changed = threading.Condition()
        kinds = ("register", "status", "update")
        self.transport = bus.transport(
            "coordinator", self._on_message, subscriptions=[TOPICS.all(k) for k in kinds]
        )
        self.transport.start()

    def _on_message(self, topic: str, payload: bytes) -> None:
        kind, _ = TOPICS.parse(topic)
        with self._changed:
            self._got[kind].append(payload)
            self._changed.notify_all()

    def count(self, kind: str) -> int:
        with self._changed:
            return len(self._got[kind])

    def wait_for(self, kind: str, done: Callable[[list[bytes]], bool], what: str) -> list[bytes]:
        """Everything of `kind` received so far, once `done` says it is enough."""
        with self._changed:
            if not self._changed.wait_for(lambda: done(self._got[kind]), WAIT_S):
                raise AssertionError(f"expected {what}, got {len(self._got[kind])} {kind}")
            return list(self._got[kind])

    def received(self, kind: str, n: int = 1) -> list[bytes]:
        return self.wait_for(kind, lambda got: len(got) >= n, f"{n} {kind} messages")

    def update(self, index: int = 0) -> tuple[Payload, list[bytes]]:
        """The board's `index`-th update: reassembled, and its chunks as they arrived."""
        count = _chunk_count(self.received("update")[0])
        chunks = self.received("update", (index + 1) * count)[index * count : (index + 1) * count]
        reassembler = Reassembler(max_bytes=2**26, max_chunks=1024, timeout_s=60, max_chunk=CHUNK)
        done = [p for c in chunks if (p := reassembler.add(c, now=0.0)) is not None]
        assert len(done) == 1, f"update {index} is not one whole payload"
        return done[0], chunks

    def assign(self, strategy: str = "qat", bits: int = 4) -> None:
        body = {
            "device_id": DEVICE,
            "strategy": strategy,
            "bits": bits,
            "per_layer_bits": None,
            "job": JOB,
        }
        self.transport.publish(TOPICS.assign(DEVICE), encode_message("assign", body))

    def task(self, rnd: int, payload_id: str) -> None:
        """A task for round `rnd`; a resend of the same task has another `payload_id`."""
        body = {"round": rnd, "job_id": JOB_ID, "local_epochs": 1, "deadline_s": 60}
        chunks = split_payload(
            "task", make_message("task", body), pack_state(initial_state()), payload_id=payload_id
        )
        self.transport.publish_many(TOPICS.task(DEVICE), chunks)

    def model(self, filename: str, blob: bytes) -> None:
        meta = {"job_id": JOB_ID, "bits": 4, "storage": "int8", "filename": filename}
        chunks = split_payload("model", make_message("model", meta), blob, chunk_size=CHUNK)
        self.transport.publish_many(TOPICS.model(DEVICE), chunks)


def _chunk_count(chunk: bytes) -> int:
    """How many chunks the payload of `chunk` has, from its header (`>I` length + JSON)."""
    (length,) = struct.unpack(">I", chunk[:4])
    return int(json.loads(chunk[4 : 4 + length])["count"])


@dataclass
class Board:
    """An agent running in a thread, and how many times it trained (its `compute` calls)."""

    agent: EdgeAgent
    thread: threading.Thread
    trainings: list[None] = field(default_factory=list)


@pytest.fixture
def fleet(
    tmp_path: Path, samples: tuple[torch.Tensor, torch.Tensor]
) -> Iterator[tuple[CoordinatorSide, Callable[..., Board]]]:
    """A bus with the coordinator's end, and `start(...)` for a board on it (stopped after)."""
    bus = InProcessBus()
    coordinator = CoordinatorSide(bus)
    boards: list[Board] = []

    def start(
        board: str = OTHER_BOARD, clock: Callable[[str, int], float] | None = None, **opts: Any
    ) -> Board:
        options = _options(tmp_path, profile=opts.pop("profile", board), **opts)
        summary = profile_summary(load_profile(board), {}, None)

        def compute(work: Callable[[], Any]) -> Any:
            running.trainings.append(None)
            return work()

        agent = EdgeAgent(
            options,
            transport_factory=bus.transport,
            clock=clock,
            data=samples,
            profile=summary,
            compute=compute,
        )
        running = Board(agent, threading.Thread(target=agent.run, name=DEVICE, daemon=True))
        boards.append(running)
        running.thread.start()
        coordinator.received("register")  # subscribed and listening from here on
        return running

    yield coordinator, start
    for board in boards:
        board.agent.stop()
        board.thread.join(WAIT_S)
        assert not board.thread.is_alive(), "the agent did not stop"
    coordinator.transport.stop()


# -- stable_device_id, load_local_data ----------------------------------------------------------


@pytest.mark.parametrize("host", ["lab bench/#1+é", "", "x" * 80, "rpi5-07"])
def test_stable_device_id_is_kept_and_valid(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, host: str
) -> None:
    monkeypatch.setattr(socket, "gethostname", lambda: host)
    first = stable_device_id(tmp_path / "state")
    validate_device_id(first)  # one topic level: no "/", "+", "#", spaces, at most 64
    assert re.fullmatch(DEVICE_ID_PATTERN, first)
    assert stable_device_id(tmp_path / "state") == first
    # Another board (another state dir) on a host of the same name gets an id of its own.
    assert stable_device_id(tmp_path / "elsewhere") != first


def _local(data: str) -> tuple[torch.Tensor, torch.Tensor]:
    return load_local_data(AgentOptions(broker="mqtt://b", data=data, partition="iid"))


def test_load_local_data_takes_part_i_of_n(
    tiny_data: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("BITFLEET_DATA_DIR", str(tiny_data))
    whole_x, whole_y = _local(str(tiny_data))  # a folder: all of it
    assert len(whole_x) == len(whole_y) == N_TRAIN

    parts = [_local(f"fashion-mnist:{i}/3") for i in range(3)]
    keep, held = validation_indices(N_TRAIN, DEFAULT_VALIDATION_FRACTION)
    seen: list[bytes] = []
    for x, y in parts:
        assert len(x) == len(y) == len(keep) // 3
        seen += [bytes(row.numpy()) for row in x]
    # Disjoint parts that cover the data set less the coordinator's validation images, labels
    # travelling with their images.
    kept = {bytes(x.numpy()) for x in whole_x[keep]}
    assert len(set(seen)) == len(seen) and set(seen) == kept
    assert not kept & {bytes(x.numpy()) for x in whole_x[held]}
    whole_y = whole_y[keep]
    labels = np.concatenate([y.numpy() for _, y in parts])
    np.testing.assert_array_equal(np.bincount(labels), np.bincount(whole_y.numpy()))
    again = _local("fashion-mnist:1/3")
    assert torch.equal(again[0], parts[1][0]) and torch.equal(again[1], parts[1][1])


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ("fashion-mnist:3/3", r"--data fashion-mnist:3/3: partition index must be in 0\.\.2"),
        ("fashion-mnist:0/0", r"partition index"),
        ("nosuch:0/2", r"--data nosuch:0/2: unknown data set 'nosuch'; known: \[.*fashion-mnist"),
    ],
)
def test_load_local_data_refuses_a_bad_part_or_name(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, data: str, message: str
) -> None:
    monkeypatch.setenv("BITFLEET_DATA_DIR", str(tmp_path / "empty"))  # no data: fail first
    with pytest.raises(ValueError, match=message):
        _local(data)


# -- the agent on the bus ----------------------------------------------------------------------


def test_registers_with_its_profile_and_a_label_summary_only(
    fleet: tuple[CoordinatorSide, Callable[..., Board]], samples: tuple[torch.Tensor, torch.Tensor]
) -> None:
    coordinator, start = fleet
    board = start("rpi4")
    raw = coordinator.received("register")[0]
    message = decode_message(raw, "register")
    assert message["device_id"] == DEVICE
    assert message["profile"]["board"] == load_profile("rpi4").to_dict()
    data = message["data"]
    assert set(data) <= {"n_samples", "label_hist", "label_fit"}
    assert data["n_samples"] == N_TRAIN
    assert data["label_hist"] == np.bincount(samples[1].numpy(), minlength=10).tolist()
    assert len(raw) < samples[0][0].numel() * 4  # a few images' worth at most: no samples
    assert _online(coordinator.received("status")[0])

    board.agent.stop()
    statuses = coordinator.wait_for(
        "status", lambda got: len(got) > 1 and not _online(got[-1]), "an offline status"
    )
    assert [_online(s) for s in statuses] == [True, False]


def _online(status: bytes) -> bool:
    return bool(decode_message(status, "status")["online"])


def test_trains_the_task_and_publishes_its_update(
    fleet: tuple[CoordinatorSide, Callable[..., Board]],
) -> None:
    coordinator, start = fleet
    board = start()
    coordinator.assign("qat", 4)
    coordinator.task(3, payload_id="task-3")
    payload, chunks = coordinator.update()
    assert payload.kind == "update" and len(chunks) > 1
    meta = validate_message(payload.meta, "update")
    assert (meta["round"], meta["job_id"], meta["n_samples"]) == (3, JOB_ID, N_TRAIN)
    assert math.isfinite(meta["train_loss"]) and meta["train_seconds"] >= 0
    sent, trained = initial_state(), unpack_state(payload.blob)
    assert set(trained) == set(sent)
    assert any(not torch.equal(trained[k], sent[k]) for k in sent)  # it did train
    assert len(board.trainings) == 1


def test_the_same_task_again_gets_the_same_update_without_training(
    fleet: tuple[CoordinatorSide, Callable[..., Board]],
) -> None:
    coordinator, start = fleet
    board = start()
    coordinator.assign()
    coordinator.task(1, payload_id="round-1")
    _, first = coordinator.update(0)
    coordinator.task(1, payload_id="round-1-resent")  # after a reconnect: a new payload id
    _, second = coordinator.update(1)
    assert second == first  # the very same chunk bytes, payload id included
    assert len(board.trainings) == 1
    # Another round is a new task: trained, not answered from the last one.
    coordinator.task(2, payload_id="round-2")
    payload, _ = coordinator.update(2)
    assert payload.meta["round"] == 2 and len(board.trainings) == 2


def test_a_task_before_any_assignment_is_skipped_with_a_warning(
    fleet: tuple[CoordinatorSide, Callable[..., Board]], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger=agent_module.__name__)
    coordinator, start = fleet
    board = start()
    coordinator.task(5, payload_id="early")
    deadline = time.monotonic() + WAIT_S
    while not any("before any assignment" in r.getMessage() for r in caplog.records):
        assert time.monotonic() < deadline, "no warning for a task without an assignment"
        time.sleep(0.02)
    assert any("round 5" in r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)
    assert board.trainings == [] and coordinator.count("update") == 0
    # Skipped, not remembered as answered: once assigned, the task sent again is trained.
    coordinator.assign()
    coordinator.task(5, payload_id="early-resent")
    payload, _ = coordinator.update()
    assert payload.meta["round"] == 5 and len(board.trainings) == 1


@pytest.mark.parametrize(
    "filename", ["../../escape.onnx", "/etc/escape.onnx", "deep/../../../escape.onnx"]
)
def test_a_model_is_stored_by_its_file_name_only_and_atomically(
    fleet: tuple[CoordinatorSide, Callable[..., Board]],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    filename: str,
) -> None:
    renames: list[tuple[Path, Path]] = []
    real_replace = os.replace

    def replace(src: Any, dst: Any) -> None:
        renames.append((Path(src), Path(dst)))
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    coordinator, start = fleet
    board = start(exit_after_model=True)
    blob = bytes(range(256)) * 300  # several chunks
    coordinator.model(filename, blob)
    board.thread.join(WAIT_S)
    assert not board.thread.is_alive(), "--exit-after-model: the agent should end on its model"

    out = tmp_path / "models"
    assert sorted(out.iterdir()) == [out / "escape.onnx"]  # nothing else, no temporary left
    assert (out / "escape.onnx").read_bytes() == blob
    assert not (tmp_path / "escape.onnx").exists()
    assert not (tmp_path.parent / "escape.onnx").exists()
    # Written beside the target, then renamed over it in one step: never a half-written model.
    ((src, dst),) = renames
    assert dst == out / "escape.onnx" and src.parent == out and src != dst


@pytest.mark.parametrize("case", ["emulated", "own board", "clock"])
def test_board_seconds_scale_to_the_board_or_come_from_its_clock(
    fleet: tuple[CoordinatorSide, Callable[..., Board]], case: str
) -> None:
    coordinator, start = fleet
    asked: list[tuple[str, int, int]] = []

    def clock(strategy: str, steps: int, rnd: int) -> float:
        asked.append((strategy, steps, rnd))
        return 42.5

    if case == "emulated":  # a profile named for another machine than this one
        start(OTHER_BOARD)
    elif case == "own board":  # --profile auto: the board is the machine it runs on
        start(OTHER_BOARD, profile="auto")
    else:
        start(OTHER_BOARD, clock=clock)
    coordinator.assign("qat", 4)
    coordinator.task(1, payload_id="t1")
    meta = coordinator.update()[0].meta
    seconds = meta["train_seconds"]
    expected = {
        "emulated": seconds
        / load_profile(OTHER_BOARD).relative_speed
        * load_profile(OTHER_BOARD).qat_overhead
        / detect_board().qat_overhead,
        "own board": seconds,
        "clock": 42.5,
    }[case]
    assert meta["board_seconds"] == pytest.approx(expected, rel=1e-9)
    steps = math.ceil(N_TRAIN / JOB["batch_size"]) * JOB["local_epochs"]
    assert asked == ([("qat", steps, 1)] if case == "clock" else [])


# -- the command line --------------------------------------------------------------------------


def _run_agent(*argv: str) -> int:
    parser = argparse.ArgumentParser()
    cli.add_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["agent", "run", *argv])
    return args.run(args)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--broker", "http://host", "--data", "d"], "scheme must be mqtt"),
        (["--broker", "mqtt://host", "--data", "d", "--chunk-kib", "0"], "--chunk-kib"),
        (["--broker", "mqtt://host", "--data", "d", "--chunk-kib", "1025"], "1..1024"),
    ],
)
def test_cli_refuses_bad_values_before_any_set_up(
    monkeypatch: pytest.MonkeyPatch, argv: list[str], message: str
) -> None:
    monkeypatch.setattr(agent_module, "EdgeAgent", None)  # never reached
    with pytest.raises(ValueError, match=message):
        _run_agent(*argv)


def test_cli_builds_the_agent_options_and_stops_it_on_sigterm(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    made: list[Any] = []
    handlers: dict[int, Any] = {}

    class FakeAgent:
        def __init__(self, options: AgentOptions) -> None:
            self.options, self.stopped = options, False
            made.append(self)

        def run(self) -> int:
            handlers[signal.SIGTERM]()
            return 0

        def stop(self) -> None:
            self.stopped = True

    monkeypatch.setattr(agent_module, "EdgeAgent", FakeAgent)
    monkeypatch.setattr(signal, "signal", lambda sig, handler: handlers.__setitem__(sig, handler))
    code = _run_agent(
        "--broker", "mqtts://host:8883", "--data", "fashion-mnist:2/6", "--chunk-kib", "64",
        "--no-step-measure", "--exit-after-model", "--profile", "rpi5", "--device-id", "b7",
    )  # fmt: skip
    assert code == 0
    (fake,) = made
    options = fake.options
    assert (options.broker, options.data, options.device_id) == (
        parse_broker_url("mqtts://host:8883"),
        "fashion-mnist:2/6",
        "b7",
    )
    assert options.chunk_size == 64 * 1024 and options.profile == "rpi5"
    assert options.measure_steps is False and options.exit_after_model is True
    assert fake.stopped  # SIGTERM asks the agent to stop
