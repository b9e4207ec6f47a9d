"""Evaluation of the global model on the coordinator's held-out set, beside the next round.

Each round's model is scored in float and at every `[deploy] bits` width on a thread of its
own, off the critical path: the next round is dispatched while the last is evaluated, and the
scores go to the round's report and the store when they are ready (docs/round.md#evaluation).
With `[deploy] act_bits`, every weight width is also scored with each activation width, its
ranges calibrated on the first training images (keys `W<w>A<a>`, `act_key`).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch

from bitfleet.data import ImageData
from bitfleet.quant.modules import BitMap
from bitfleet.training import evaluate

from .config import JobConfig
from .global_model import GlobalModel, StateDict
from .state import StateStore

if TYPE_CHECKING:
    from .server import RoundReport


CALIB_SAMPLES = 256
"""Training images that calibrate activation ranges, wherever the coordinator deploys a model:
its evaluations and its exported candidates see the same ranges."""


def act_key(bits: int, act_bits: int) -> str:
    """The report key of weight width `bits` with `act_bits` activations: "W2A2"."""
    return f"W{bits}A{act_bits}"


def width_label(key: str) -> str:
    """How a report names an evaluated width: "2-bit" for weights only, "W2A2" with
    activations."""
    return f"{key}-bit" if key.isdigit() else key


class Evaluator:
    """Scores states of `model` on the test split of `data()` (loaded on first use)."""

    def __init__(
        self,
        cfg: JobConfig,
        model: GlobalModel,
        store: StateStore,
        data: Callable[[], ImageData],
        on_round: Callable[[RoundReport], None] | None = None,
    ) -> None:
        self.cfg = cfg
        self.model = model
        self.store = store
        self.data = data
        self.on_round = on_round
        self._thread: threading.Thread | None = None

    def test_set(self) -> tuple[torch.Tensor, torch.Tensor]:
        n = self.cfg.data.test_samples
        data = self.data()
        x, y = data.test_x, data.test_y
        return (x[:n], y[:n]) if n else (x, y)

    def accuracy(self, state: StateDict, bits: BitMap, act_bits: int | None = None) -> float:
        """Test accuracy of `state` deployed at `bits` (one width, or per layer), with
        `act_bits` activations calibrated on the first training images (None: float)."""
        x, y = self.test_set()
        model = self.model.deployed(state, bits)
        if act_bits is not None:
            calib = self.data().train_x[:CALIB_SAMPLES]
            model = self.model.method.deploy(model, bits, act_bits=act_bits, calib=calib)
        return evaluate(model, x, y)

    def start(self, report: RoundReport, state: StateDict) -> None:
        """Score a round's model in the background; fills `report` and the store."""
        self.join()

        def work() -> None:
            model = self.model.deployed(state, 32)
            x, y = self.test_set()
            report.acc_fp32 = evaluate(model, x, y)
            for bits in self.cfg.deploy.bits:
                report.acc_deploy[str(bits)] = evaluate(self.model.method.deploy(model, bits), x, y)
            calib = self.data().train_x[:CALIB_SAMPLES]
            for bits in self.cfg.deploy.bits:
                for act in self.cfg.deploy.act_bits:
                    deployed = self.model.method.deploy(model, bits, act_bits=act, calib=calib)
                    report.acc_deploy[act_key(bits, act)] = evaluate(deployed, x, y)
            self.store.set_round_accuracy(report.round, report.acc_fp32, report.acc_deploy)
            if self.on_round is not None:
                self.on_round(report)

        self._thread = threading.Thread(target=work, name=f"eval-{report.round}")
        self._thread.start()

    def join(self) -> None:
        """Wait for the evaluation in flight, if any."""
        if self._thread is not None:
            self._thread.join()
            self._thread = None
