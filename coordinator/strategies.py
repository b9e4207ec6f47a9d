"""Server-side aggregation: a streaming weighted mean and Flower-like server optimisers.

Updates are folded into a `RunningMean` as they arrive, so the coordinator holds one model's
worth of accumulators however many devices report, and partial means from several aggregation
workers (or edge gateways) merge exactly: they are sums and counts (DESIGN section 9). A
`Strategy` then turns the round's mean into the next global model. FedAvgM and FedAdam treat
`mean - global` as a pseudo-gradient (Hsu et al. 2019; Reddi et al. 2021, "Adaptive Federated
Optimization"); their moments are server state, checkpointed through `state_dict`.

Beside the mean, `[server] aggregation` may pick a robust rule (`TrimmedMean`,
`CoordinateMedian`); those must buffer the round's updates, O(N x model) memory.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, ClassVar

import torch
from torch import Tensor

__all__ = [
    "AGGREGATIONS",
    "ROBUST_AGGREGATORS",
    "STRATEGIES",
    "CoordinateMedian",
    "FedAdam",
    "FedAvg",
    "FedAvgM",
    "RunningMean",
    "Strategy",
    "TrimmedMean",
    "make_aggregator",
    "make_strategy",
]

_SUM = "sum."
_COUNT = "meta.count"
_TOTAL = "meta.total_weight"


def describe(t: Tensor) -> str:
    return f"{tuple(t.shape)} {t.dtype}"


Spec = dict[str, tuple[tuple[int, ...], torch.dtype]]


def spec_of(template: Mapping[str, Tensor]) -> Spec:
    """Names, shapes and dtypes of a model state: what every update must match."""
    return {k: (tuple(t.shape), t.dtype) for k, t in template.items()}


def update_problem(spec: Spec, state: Mapping[str, Tensor]) -> tuple[str, str] | None:
    """What is wrong with an update against the model, as (reason, detail), or None.

    The one check of an update's structure: the coordinator's validator turns the reason
    into a dropped message, the aggregators into a ValueError.
    """
    missing = sorted(set(spec) - set(state))
    extra = sorted(set(state) - set(spec))
    if missing or extra:
        detail = (
            f"update does not match the model: missing tensors {missing[:5]}, "
            f"unexpected {extra[:5]}"
        )
        return ("unknown_tensor" if extra else "missing_tensor"), detail
    for k, (shape, dtype) in spec.items():
        t = state[k]
        if not isinstance(t, Tensor):
            return "bad_shape", f"tensor {k!r}: expected a torch.Tensor, got {type(t).__name__}"
        if tuple(t.shape) != shape or t.dtype != dtype:
            reason = "bad_shape" if tuple(t.shape) != shape else "bad_dtype"
            return reason, f"tensor {k!r}: expected {shape} {dtype}, got {describe(t)}"
        if dtype.is_floating_point and not bool(torch.isfinite(t).all()):
            return "non_finite", f"tensor {k!r}: contains NaN or Inf"
    return None


def _check_weight(weight: float) -> float:
    if isinstance(weight, bool) or not isinstance(weight, (int, float)):
        raise ValueError(f"weight must be a number, got {weight!r}")
    w = float(weight)
    if not math.isfinite(w) or w <= 0:
        raise ValueError(f"weight must be finite and > 0, got {weight!r}")
    return w


def _check_update(spec: Spec, state: Mapping[str, Tensor]) -> None:
    """Validate a whole update before an aggregator touches anything, so a bad one changes
    nothing; floating tensors must be finite."""
    problem = update_problem(spec, state)
    if problem is not None:
        raise ValueError(problem[1])


class RunningMean:
    """Weighted mean of model states, accumulated one update at a time.

    Only floating tensors are averaged; integer buffers (e.g. BatchNorm's
    `num_batches_tracked`) are validated but left out of `mean()`, so a strategy keeps the
    global model's value for them. Accumulators are float64 by default: summing thousands of
    float32 updates in float32 would lose the low bits the mean is made of.
    """

    def __init__(self, template: Mapping[str, Tensor], *, dtype: torch.dtype = torch.float64):
        if dtype not in (torch.float64, torch.float32):
            raise ValueError(f"accumulator dtype must be float64 or float32, got {dtype}")
        self._spec = spec_of(template)
        self._sums: dict[str, Tensor] = {
            k: torch.zeros(t.shape, dtype=dtype)
            for k, t in template.items()
            if t.is_floating_point()
        }
        self._dtype = dtype
        self._count = 0
        self._total = 0.0

    @property
    def count(self) -> int:
        """How many updates were added (merged partials included)."""
        return self._count

    @property
    def total_weight(self) -> float:
        """Sum of the weights added (merged partials included)."""
        return self._total

    def add(self, state: Mapping[str, Tensor], weight: float) -> None:
        """Add `weight * state` (weight is typically the device's sample count)."""
        w = _check_weight(weight)
        _check_update(self._spec, state)
        with torch.no_grad():
            for k, acc in self._sums.items():
                acc.add_(state[k].detach().to(acc.device), alpha=w)
        self._count += 1
        self._total += w

    def merge(self, other: RunningMean) -> None:
        """Fold another partial aggregate (over the same model) into this one."""
        if other._spec != self._spec or other._dtype != self._dtype:
            raise ValueError("cannot merge running means over different models or dtypes")
        for k, acc in self._sums.items():
            acc.add_(other._sums[k])
        self._count += other._count
        self._total += other._total

    def mean(self) -> dict[str, Tensor]:
        """The weighted mean of the floating tensors, in the template's dtypes."""
        if self._count == 0:
            raise ValueError("no updates were added; the mean is undefined")
        return {k: (acc / self._total).to(self._spec[k][1]) for k, acc in self._sums.items()}

    def partial_state(self) -> dict[str, Tensor]:
        """Sums, count and total weight as tensors, to ship a partial aggregate as safetensors."""
        out = {_SUM + k: acc.clone() for k, acc in self._sums.items()}
        out[_COUNT] = torch.tensor(self._count, dtype=torch.int64)
        out[_TOTAL] = torch.tensor(self._total, dtype=torch.float64)
        return out

    @classmethod
    def from_partial(
        cls, template: Mapping[str, Tensor], partial: Mapping[str, Tensor]
    ) -> RunningMean:
        """Rebuild a partial aggregate written by `partial_state` (then `merge` it)."""
        acc_dtype = next((t.dtype for k, t in partial.items() if k.startswith(_SUM)), torch.float64)
        rm = cls(template, dtype=acc_dtype)
        expected = {_SUM + k for k in rm._sums} | {_COUNT, _TOTAL}
        if set(partial) != expected:
            raise ValueError(
                "partial aggregate does not match the model: missing "
                f"{sorted(expected - set(partial))}, unexpected {sorted(set(partial) - expected)}"
            )
        for k, acc in rm._sums.items():
            t = partial[_SUM + k]
            if t.shape != acc.shape or t.dtype != acc.dtype:
                raise ValueError(f"partial sum {k!r}: expected {describe(acc)}, got {describe(t)}")
            acc.copy_(t)
        rm._count = int(partial[_COUNT])
        rm._total = float(partial[_TOTAL])
        return rm


_BLOCK = 2**21
"""Values (updates x coordinates) a robust rule sorts at once: with the float64 copy, the sorted
values and their indices, about 50 MB."""


class _BufferedAggregator:
    """Keeps every update of the round, for rules a running sum cannot compute.

    Memory is O(N x model) for N updates, against `RunningMean`'s O(model): a fleet of a
    thousand LeNet-5 boards holds about 250 MB, one of ResNet-18s far more than a server
    should. The result is not a sum either, so partial aggregates from several workers do not
    merge (DESIGN section 9): a sharded coordinator must use `mean`.

    Weights are validated but not used. A device's sample count is its own claim, and a rule
    meant to survive hostile updates must not let one of them buy influence by claiming a large
    one; the rules are unweighted as Yin et al. (2018) define them and Flower implements them.
    `mean()` is named after `RunningMean.mean` so the coordinator can use either; it returns
    the rule's aggregate of the floating tensors, in the template's dtypes.
    """

    name: ClassVar[str] = ""
    options: ClassVar[tuple[str, ...]] = ()
    """Keyword arguments of `__init__` that `make_aggregator` passes on."""

    def __init__(self, template: Mapping[str, Tensor]) -> None:
        self._spec = spec_of(template)
        self._updates: list[dict[str, Tensor]] = []

    @property
    def count(self) -> int:
        """How many updates were added."""
        return len(self._updates)

    def add(self, state: Mapping[str, Tensor], weight: float) -> None:
        """Keep a copy of the update's floating tensors (`weight` is checked, then ignored)."""
        _check_weight(weight)
        _check_update(self._spec, state)
        self._updates.append(
            {
                k: state[k].detach().clone()
                for k, (_, dtype) in self._spec.items()
                if dtype.is_floating_point
            }
        )

    def mean(self) -> dict[str, Tensor]:
        """The rule's aggregate, computed coordinate-wise in float64.

        Coordinates go through in blocks of about `_BLOCK` values across all updates, so the
        sorted copy stays small however large N and the tensors are.
        """
        if not self._updates:
            raise ValueError("no updates were added; the aggregate is undefined")
        n = len(self._updates)
        step = max(1, _BLOCK // n)
        out: dict[str, Tensor] = {}
        with torch.no_grad():
            for k in self._updates[0]:
                shape, dtype = self._spec[k]
                flat = [u[k].reshape(-1) for u in self._updates]
                result = torch.empty(flat[0].numel(), dtype=torch.float64)
                for lo in range(0, result.numel(), step):
                    block = torch.stack([f[lo : lo + step] for f in flat]).to(torch.float64)
                    result[lo : lo + step] = self._reduce(block.sort(dim=0).values)
                out[k] = result.reshape(shape).to(dtype)
        return out

    def _reduce(self, ordered: Tensor) -> Tensor:
        """Aggregate along dim 0, whose values are sorted ascending per coordinate."""
        raise NotImplementedError


class TrimmedMean(_BufferedAggregator):
    """Coordinate-wise trimmed mean (Yin et al. 2018; Flower's FedTrimmedAvg).

    Per coordinate, the `floor(trim * N)` largest and as many smallest values are cut and the
    rest averaged: up to that many hostile updates cannot drag a coordinate outside the honest
    values' range. With few updates nothing may be cut (trim 0.2 of 4 updates cuts none).
    """

    name = "trimmed_mean"
    options = ("trim",)

    def __init__(self, template: Mapping[str, Tensor], trim: float = 0.2) -> None:
        super().__init__(template)
        trim = float(trim)
        if not 0.0 <= trim < 0.5:
            raise ValueError(f"trim must be in [0, 0.5), got {trim}")
        self.trim = trim

    def _reduce(self, ordered: Tensor) -> Tensor:
        cut = int(self.trim * ordered.shape[0])
        return ordered[cut : ordered.shape[0] - cut].mean(dim=0)


class CoordinateMedian(_BufferedAggregator):
    """Coordinate-wise median (Yin et al. 2018; Flower's FedMedian).

    With an even count it is the mean of the two middle values, as numpy's median (torch's
    `median` would return the lower one). It breaks down only when half the updates are hostile.
    """

    name = "median"

    def _reduce(self, ordered: Tensor) -> Tensor:
        n = ordered.shape[0]
        return (ordered[(n - 1) // 2] + ordered[n // 2]) / 2


ROBUST_AGGREGATORS: dict[str, type[_BufferedAggregator]] = {
    cls.name: cls for cls in (TrimmedMean, CoordinateMedian)
}

AGGREGATIONS = ("mean", *ROBUST_AGGREGATORS)
"""How a round may combine its updates: `mean` (`RunningMean`, O(model), sample-weighted) or a
robust rule that buffers the round (O(N x model), unweighted)."""


def make_aggregator(
    name: str, template: Mapping[str, Tensor], **opts: Any
) -> RunningMean | _BufferedAggregator:
    """An empty aggregator for one round. Options the rule does not take are ignored, so a
    caller can pass every configured knob (`trim=...`) whatever the rule."""
    if name == "mean":
        return RunningMean(template)
    cls = ROBUST_AGGREGATORS.get(name)
    if cls is None:
        raise ValueError(f"unknown aggregation {name!r}; known: {', '.join(AGGREGATIONS)}")
    return cls(template, **{k: v for k, v in opts.items() if k in cls.options})


class Strategy:
    """Turns the round's mean state into the next global state; may keep server state."""

    name: ClassVar[str] = ""
    default_lr: ClassVar[float] = 1.0
    """Server learning rate a job gets when it names this strategy without `server.lr`."""

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
        """Server-optimiser state to checkpoint (empty for stateless strategies)."""
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


class FedAvg(Strategy):
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


class _MomentStrategy(Strategy):
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


class FedAvgM(_MomentStrategy):
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


class FedAdam(_MomentStrategy):
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


STRATEGIES: dict[str, type[Strategy]] = {cls.name: cls for cls in (FedAvg, FedAvgM, FedAdam)}


def make_strategy(server_cfg: Any) -> Strategy:
    """Build the strategy a job's `[server]` table names (any object with those attributes)."""
    name = server_cfg.optimizer
    if name == "fedavg":
        return FedAvg()
    if name == "fedavgm":
        return FedAvgM(lr=server_cfg.lr, momentum=server_cfg.momentum)
    if name == "fedadam":
        return FedAdam(
            lr=server_cfg.lr, beta1=server_cfg.beta1, beta2=server_cfg.beta2, eps=server_cfg.eps
        )
    raise ValueError(f"unknown server optimizer {name!r}; known: {', '.join(STRATEGIES)}")
