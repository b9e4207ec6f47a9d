"""Evaluation of the global model on the coordinator's held-out set, beside the next round.

Each round's model is scored in float and at every `[deploy] bits` width on a thread of its
own, off the critical path: the next round is dispatched while the last is evaluated, and the
scores go to the round's report and the store when they are ready (docs/round.md#evaluation).
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

    def accuracy(self, state: StateDict, bits: BitMap) -> float:
        """Test accuracy of `state` deployed at `bits` (one width, or per layer)."""
        x, y = self.test_set()
        return evaluate(self.model.deployed(state, bits), x, y)

    def start(self, report: RoundReport, state: StateDict) -> None:
        """Score a round's model in the background; fills `report` and the store."""
        self.join()

        def work() -> None:
            model = self.model.deployed(state, 32)
            x, y = self.test_set()
            report.acc_fp32 = evaluate(model, x, y)
            for bits in self.cfg.deploy.bits:
                report.acc_deploy[str(bits)] = evaluate(self.model.method.deploy(model, bits), x, y)
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
