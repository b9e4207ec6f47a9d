"""The local training loop and evaluation, shared by boards, simulator and benchmarks.

Data arrive as whole tensors (uint8 images or float in [0, 1]); batches are sliced from
them rather than going through a DataLoader, which on 2-core boards costs more than the
small models it feeds.
"""

from __future__ import annotations

import random
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .data import to_float
from .quant import LocalMethod

OPTIMIZERS = {"sgd", "adam"}
LR_SCHEDULES = {"constant", "cosine"}


def make_optimizer(model: nn.Module, name: str, lr: float) -> torch.optim.Optimizer:
    if name == "adam":
        return torch.optim.Adam(model.parameters(), lr=lr)
    if name == "sgd":
        return torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    raise ValueError(f"unknown optimizer {name!r}; known: {sorted(OPTIMIZERS)}")


def train(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    method: LocalMethod,
    *,
    epochs: float = 1.0,
    batch_size: int = 64,
    lr: float = 1e-3,
    optimizer: str = "adam",
    seed: int = 0,
    lr_schedule: str = "constant",
    on_step: Callable[[int, int, float], None] | None = None,
) -> float:
    """Train `model` with `method` for `epochs` passes (fractions allowed); return mean loss.

    The method's hooks run at the start (`begin_round`, then `calibrate` on the round's first
    `method.act_calib_batches` batches when it quantizes activations in training, so their
    ranges are this device's and stay fixed for the round) and before every step; `on_step`
    receives (step, total_steps, loss) for progress display. Federated rounds keep a
    constant rate; centralised runs may decay it with `lr_schedule="cosine"`.
    """
    if len(x) != len(y) or len(x) == 0:
        raise ValueError(f"need matching, non-empty inputs and labels, got {len(x)} and {len(y)}")
    if epochs <= 0 or batch_size <= 0:
        raise ValueError(f"epochs and batch_size must be positive, got {epochs}, {batch_size}")
    if lr_schedule not in LR_SCHEDULES:
        raise ValueError(f"unknown lr_schedule {lr_schedule!r}; known: {sorted(LR_SCHEDULES)}")
    method.prepare(model)
    model.train()
    opt = make_optimizer(model, optimizer, lr)
    rng = random.Random(seed)
    gen = torch.Generator().manual_seed(seed)
    steps_per_epoch = max(1, -(-len(x) // batch_size))
    total = max(1, round(epochs * steps_per_epoch))
    sched = (
        torch.optim.lr_scheduler.CosineAnnealingLR(opt, total) if lr_schedule == "cosine" else None
    )
    method.begin_round(model, rng)
    order = torch.randperm(len(x), generator=gen)
    if method.training_act_bits() is not None:
        n = max(1, min(method.act_calib_batches, steps_per_epoch))
        method.calibrate(model, [x[order[i * batch_size : (i + 1) * batch_size]] for i in range(n)])
    loss_sum = 0.0
    for step in range(total):
        pos = step % steps_per_epoch
        if pos == 0 and step > 0:
            order = torch.randperm(len(x), generator=gen)
        idx = order[pos * batch_size : (pos + 1) * batch_size]
        loss_value = train_step(model, opt, method, x[idx], y[idx], rng)
        if sched is not None:
            sched.step()
        loss_sum += loss_value
        if on_step is not None:
            on_step(step + 1, total, loss_value)
    return loss_sum / total


def train_step(
    model: nn.Module,
    opt: torch.optim.Optimizer,
    method: LocalMethod,
    xb: torch.Tensor,
    yb: torch.Tensor,
    rng: random.Random,
) -> float:
    """One optimiser step on one batch; the unit the step-time benchmarks measure."""
    method.before_step(model, rng)
    loss = F.cross_entropy(model(to_float(xb)), yb)
    reg = method.regularizer(model)
    if reg is not None:
        loss = loss + reg
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return float(loss.detach())


@torch.no_grad()
def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 1000) -> float:
    """Top-1 accuracy as a fraction in [0, 1]."""
    if len(x) == 0:
        raise ValueError("cannot evaluate on an empty set")
    was_training = model.training
    model.eval()
    correct = 0
    for i in range(0, len(x), batch_size):
        pred = model(to_float(x[i : i + batch_size])).argmax(1)
        correct += int((pred == y[i : i + batch_size]).sum())
    model.train(was_training)
    return correct / len(x)
