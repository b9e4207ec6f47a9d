"""One local round of training as a value: what the agent trains, and where it runs.

The agent builds a `LocalTraining` for every task and hands it to its compute runner. On a
board the runner calls it right there; the simulator's runner may send it to a worker
process (`fleet/simulate/compute.py`), which is why it is a plain, picklable value (tensors and
a typed `Assignment`) and not a closure: the training itself is the same code either way.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from bitfleet.assignment import Assignment
from bitfleet.data import DATASET_SPECS
from bitfleet.models import create_model_for
from bitfleet.training import train


@dataclass
class LocalResult:
    """The trained state, the mean training loss and the seconds the training took here."""

    state: dict[str, torch.Tensor]
    loss: float
    seconds: float


@dataclass
class LocalTraining:
    """One device's local round: its assignment, the global state, its data, the job's
    settings and the round's seed."""

    model: str
    dataset: str
    assignment: Assignment
    state: dict[str, torch.Tensor]
    x: torch.Tensor
    y: torch.Tensor
    epochs: float
    batch_size: int
    lr: float
    optimizer: str
    seed: int

    def __call__(self) -> LocalResult:
        model = create_model_for(self.model, DATASET_SPECS[self.dataset])
        method = self.assignment.method()
        method.prepare(model)
        model.load_state_dict(self.state)
        t0 = time.perf_counter()
        loss = train(
            model,
            self.x,
            self.y,
            method,
            epochs=self.epochs,
            batch_size=self.batch_size,
            lr=self.lr,
            optimizer=self.optimizer,
            seed=self.seed,
        )
        seconds = time.perf_counter() - t0
        state = {k: v.detach() for k, v in model.state_dict().items()}
        return LocalResult(state, float(loss), seconds)
