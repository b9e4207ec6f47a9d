"""Evaluation of the global model on the coordinator's held-out sets, beside the next round.

Each round's model is scored in float and at every `[deploy] bits` width on a thread of its
own, off the critical path: the next round is dispatched while the last is evaluated, and the
scores go to the round's report and the store when they are ready (docs/round.md#evaluation).
With `[deploy] act_bits`, every weight width is also scored with each activation width, its
ranges calibrated on the coordinator's first validation images (keys `W<w>A<a>`, `act_key`).

Two held-out sets, two uses (docs/round.md#validation): the validation split carved from
the training images decides (the deploy loss FedHQ reads, the fine stage's trials, each
board's deploy choice); the test split only reports.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch

from bitfleet.data import ImageData
from bitfleet.data.validation import calibration_images
from bitfleet.quant.modules import BitMap
from bitfleet.training import evaluate

from .config import JobConfig
from .global_model import GlobalModel, StateDict
from .state import StateStore

if TYPE_CHECKING:
    from .server import RoundReport


SPLITS = ("validation", "test")


@dataclass(frozen=True)
class HeldOut:
    """The held-out sets as ([0, 1] float pixels, labels) arrays, for onnxruntime."""

    validation: tuple[np.ndarray, np.ndarray]
    """What the deploy choice reads."""
    test: tuple[np.ndarray, np.ndarray]
    """What reports show beside it."""


def act_key(bits: int, act_bits: int) -> str:
    """The report key of weight width `bits` with `act_bits` activations: "W2A2"."""
    return f"W{bits}A{act_bits}"


def width_label(key: str) -> str:
    """How a report names an evaluated width: "2-bit" for weights only, "W2A2" with
    activations."""
    return f"{key}-bit" if key.isdigit() else key


class Evaluator:
    """Scores states of `model` on the held-out splits of `data()` (loaded on first use)."""

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

    def split(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """Images and labels of the "validation" or the "test" split (its first
        `[data] test_samples` when set)."""
        data = self.data()
        if name == "validation":
            if data.val_x is None or data.val_y is None:
                raise ValueError("the data have no validation split (carve_validation)")
            return data.val_x, data.val_y
        if name != "test":
            raise ValueError(f"unknown split {name!r}; known: {', '.join(SPLITS)}")
        n = self.cfg.data.test_samples
        return (data.test_x[:n], data.test_y[:n]) if n else (data.test_x, data.test_y)

    def held_out(self) -> HeldOut:
        """Both splits as the float arrays onnxruntime scores files on."""

        def arrays(name: str) -> tuple[np.ndarray, np.ndarray]:
            x, y = self.split(name)
            return x.float().div(255).numpy(), y.numpy()

        return HeldOut(arrays("validation"), arrays("test"))

    def accuracy(
        self,
        state: StateDict,
        bits: BitMap,
        act_bits: int | None = None,
        split: str = "validation",
    ) -> float:
        """Accuracy of `state` deployed at `bits` (one width, or per layer) on `split`, with
        `act_bits` activations (None: float). Validation by default: what decides."""
        x, y = self.split(split)
        model = self.model.deployed(state, bits)
        if act_bits is not None:
            calib = calibration_images(self.data())
            model = self.model.method.deploy(model, bits, act_bits=act_bits, calib=calib)
        return evaluate(model, x, y)

    def start(self, report: RoundReport, state: StateDict) -> None:
        """Score a round's model in the background; fills `report` and the store. The test
        scores report; `val_deploy` (float and the weight-only widths) is what decides."""
        self.join()

        def work() -> None:
            model = self.model.deployed(state, 32)  # `deploy` re-widths it in place below
            vx, vy = self.split("validation")
            x, y = self.split("test")
            val = {"32": evaluate(model, vx, vy)}
            report.acc_fp32 = evaluate(model, x, y)
            for bits in self.cfg.deploy.bits:
                deployed = self.model.method.deploy(model, bits)
                val[str(bits)] = evaluate(deployed, vx, vy)
                report.acc_deploy[str(bits)] = evaluate(deployed, x, y)
            calib = calibration_images(self.data())
            for bits in self.cfg.deploy.bits:
                for act in self.cfg.deploy.act_bits:
                    deployed = self.model.method.deploy(model, bits, act_bits=act, calib=calib)
                    report.acc_deploy[act_key(bits, act)] = evaluate(deployed, x, y)
            report.val_deploy = val
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
