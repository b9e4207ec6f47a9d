"""Server optimisers: how the round's mean becomes the next global model (Flower's style).

FedAvg takes the mean as it is. FedAvgM and FedAdam treat `mean - global` as a pseudo-gradient
(Hsu et al. 2019; Reddi et al. 2021, "Adaptive Federated Optimization"); their moments are server
state, checkpointed through `state_dict`. One small class per optimiser, named by `[server]
optimizer`. ("Strategy" in bitfleet is a device's local method, never one of these.)
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, ClassVar

import torch
from torch import Tensor

from .aggregation import describe

__all__ = [
    "SERVER_OPTIMIZERS",
    "FedAdam",
    "FedAvg",
    "FedAvgM",
    "ServerOptimizer",
    "make_server_optimizer",
]


class ServerOptimizer:
    """Turns the round's mean state into the next global state; may keep server state."""

    name: ClassVar[str] = ""
    default_lr: ClassVar[float] = 1.0
    """Server learning rate a job gets when it names this optimiser without `server.lr`."""

    def apply(
        self, global_state: Mapping[str, Tensor], mean_state: Mapping[str, Tensor]
    ) -> dict[str, Tensor]:
        """New global state; tensors absent from `mean_state` keep the global's value."""
        extra = sorted(set(mean_state) - set(global_state))
        if extra:
            raise ValueError(f"mean state has tensors the global model lacks: {extra}")
        for k, m in mean_state.items():
            g = global_state[k]
            if m.shape != g.shape or not g.is_floating_point():
                raise ValueError(
                    f"tensor {k!r}: mean {describe(m)} does not fit global {describe(g)}"
                )
            if not bool(torch.isfinite(m).all()):
                raise ValueError(f"tensor {k!r}: mean contains NaN or Inf")
        self._check_state(global_state, mean_state)
        out: dict[str, Tensor] = {}
        with torch.no_grad():
            for k, g in global_state.items():
                if k in mean_state:
                    new = self._step(k, g.detach().float(), mean_state[k].detach().float())
                    out[k] = new.to(g.dtype)
                else:
                    out[k] = g.detach().clone()
        return out

    def _check_state(
        self, global_state: Mapping[str, Tensor], mean_state: Mapping[str, Tensor]
    ) -> None:
        """Hook: reject loaded server state that does not fit the model, before any step."""

    def _step(self, key: str, global_t: Tensor, mean_t: Tensor) -> Tensor:
        raise NotImplementedError

    def state_dict(self) -> dict[str, Tensor]:
        """Server-optimiser state to checkpoint (empty for stateless optimisers)."""
        return {}

    def load_state_dict(self, state: Mapping[str, Tensor]) -> None:
        """Restore what `state_dict` returned."""
        if state:
            raise ValueError(f"{self.name} keeps no server state, got {sorted(state)}")

    def __repr__(self) -> str:
        params = ", ".join(f"{k}={v}" for k, v in self._params().items())
        return f"{type(self).__name__}({params})"

    def _params(self) -> dict[str, Any]:
        return {}


class FedAvg(ServerOptimizer):
    """McMahan et al. 2017: the new global model is the sample-weighted mean."""

    name = "fedavg"

    def _step(self, key: str, global_t: Tensor, mean_t: Tensor) -> Tensor:
        return mean_t.clone()


def _positive(name: str, value: float) -> float:
    value = float(value)
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be finite and > 0, got {value}")
    return value


def _unit(name: str, value: float) -> float:
    """A decay rate: 0 <= value < 1 (1 would never forget, and FedAdam's v would stay 0)."""
    value = float(value)
    if not 0.0 <= value < 1.0:
        raise ValueError(f"{name} must be in [0, 1), got {value}")
    return value


class _MomentOptimizer(ServerOptimizer):
    """Shared bookkeeping for strategies that keep per-tensor moments (`m.<key>`, `v.<key>`)."""

    _moments: ClassVar[tuple[str, ...]] = ()

    def __init__(self) -> None:
        self._state: dict[str, dict[str, Tensor]] = {p: {} for p in self._moments}

    def _check_state(
        self, global_state: Mapping[str, Tensor], mean_state: Mapping[str, Tensor]
    ) -> None:
        for moment, tensors in self._state.items():
            for k, t in tensors.items():
                g = global_state.get(k)
                if g is None or t.shape != g.shape:
                    raise ValueError(
                        f"{self.name} state {moment}.{k} {describe(t)} does not fit the model"
                    )

    def state_dict(self) -> dict[str, Tensor]:
        return {f"{p}.{k}": t.clone() for p, d in self._state.items() for k, t in d.items()}

    def load_state_dict(self, state: Mapping[str, Tensor]) -> None:
        loaded: dict[str, dict[str, Tensor]] = {p: {} for p in self._moments}
        for name, t in state.items():
            prefix, _, key = name.partition(".")
            if prefix not in loaded or not key:
                raise ValueError(
                    f"{self.name}: unexpected state tensor {name!r}; expected "
                    f"{', '.join(p + '.<tensor>' for p in self._moments)}"
                )
            loaded[prefix][key] = t.detach().to(torch.float32).clone()
        self._state = loaded


class FedAvgM(_MomentOptimizer):
    """Server momentum: m = momentum*m + (mean - global); new = global + lr*m."""

    name = "fedavgm"
    _moments = ("m",)

    def __init__(self, lr: float = 1.0, momentum: float = 0.9) -> None:
        super().__init__()
        self.lr = _positive("lr", lr)
        self.momentum = _unit("momentum", momentum)

    def _step(self, key: str, global_t: Tensor, mean_t: Tensor) -> Tensor:
        delta = mean_t - global_t
        m = self._state["m"].get(key)
        m = delta if m is None else m.mul_(self.momentum).add_(delta)
        self._state["m"][key] = m
        return global_t + self.lr * m

    def _params(self) -> dict[str, Any]:
        return {"lr": self.lr, "momentum": self.momentum}


class FedAdam(_MomentOptimizer):
    """Reddi et al. 2021: Adam on the pseudo-gradient, without bias correction.

    m = b1*m + (1-b1)*delta; v = b2*v + (1-b2)*delta^2; new = global + lr*m/(sqrt(v)+eps),
    with `eps` the paper's adaptivity tau. Its steps are about `lr` per coordinate whatever the
    delta's size, hence a small default learning rate.
    """

    name = "fedadam"
    default_lr = 1e-2
    _moments = ("m", "v")

    def __init__(
        self, lr: float = 1e-2, beta1: float = 0.9, beta2: float = 0.99, eps: float = 1e-3
    ) -> None:
        super().__init__()
        self.lr = _positive("lr", lr)
        self.beta1 = _unit("beta1", beta1)
        self.beta2 = _unit("beta2", beta2)
        self.eps = _positive("eps", eps)

    def _step(self, key: str, global_t: Tensor, mean_t: Tensor) -> Tensor:
        delta = mean_t - global_t
        m = self._state["m"].get(key)
        v = self._state["v"].get(key)
        m = (
            (1 - self.beta1) * delta
            if m is None
            else m.mul_(self.beta1).add_(delta, alpha=1 - self.beta1)
        )
        sq = delta * delta
        v = (
            (1 - self.beta2) * sq
            if v is None
            else v.mul_(self.beta2).add_(sq, alpha=1 - self.beta2)
        )
        self._state["m"][key] = m
        self._state["v"][key] = v
        return global_t + self.lr * m / (v.sqrt() + self.eps)

    def _params(self) -> dict[str, Any]:
        return {"lr": self.lr, "beta1": self.beta1, "beta2": self.beta2, "eps": self.eps}


SERVER_OPTIMIZERS: dict[str, type[ServerOptimizer]] = {
    cls.name: cls for cls in (FedAvg, FedAvgM, FedAdam)
}


def make_server_optimizer(server_cfg: Any) -> ServerOptimizer:
    """The server optimiser a job's `[server]` table names (any object with its attributes)."""
    name = server_cfg.optimizer
    if name == "fedavg":
        return FedAvg()
    if name == "fedavgm":
        return FedAvgM(lr=server_cfg.lr, momentum=server_cfg.momentum)
    if name == "fedadam":
        return FedAdam(
            lr=server_cfg.lr, beta1=server_cfg.beta1, beta2=server_cfg.beta2, eps=server_cfg.eps
        )
    raise ValueError(f"unknown server optimizer {name!r}; known: {', '.join(SERVER_OPTIMIZERS)}")
