"""Aggregation rules: how a round's updates become one mean state, one small class per rule.

Updates are folded into a `RunningMean` as they arrive, so the coordinator holds one model's
worth of accumulators however many devices report, and partial means from several aggregation
workers (or edge gateways) merge exactly: they are sums and counts (docs/round.md#aggregation).
A server optimiser (`coordinator.server_optimizers`) then turns the round's mean into the next
global model.

Beside the mean, `[server] aggregation` may pick a robust rule (`TrimmedMean`,
`CoordinateMedian`); those must buffer the round's updates, O(N x model) memory.

Every aggregator validates a state it is given. The coordinator's validator has already checked
each update, as one flat vector (`Layout.check`), and hands that `CheckedUpdate` on, so an
update is checked once and folded in a handful of ops whatever its number of tensors.
"""

from __future__ import annotations

import bisect
import functools
import itertools
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor

__all__ = [
    "AGGREGATIONS",
    "ROBUST_AGGREGATORS",
    "CheckedUpdate",
    "CoordinateMedian",
    "Layout",
    "RunningMean",
    "TrimmedMean",
    "UpdateError",
    "capped_weights",
    "describe",
    "make_aggregator",
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


class UpdateError(ValueError):
    """An update that does not fit the model, for an aggregator's caller to refuse.

    `reason` is one of the validator's stable reasons (`bad_shape`, `non_finite`, ...), which the
    coordinator counts; `detail`, also the message, says which tensor broke which rule.
    """

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


def _structure_problem(spec: Spec, state: Mapping[str, Tensor]) -> tuple[str, str] | None:
    """What is wrong with an update's names, types, shapes or dtypes, as (reason, detail)."""
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
    return None


def _all_finite(vector: Tensor) -> bool:
    """Whether a vector holds no NaN or Inf, in one reduction.

    Its smallest and largest values are finite exactly when all are (`aminmax` propagates NaN).
    `torch.isfinite(v).all()` runs several kernels over the vector: about ten times the cost.
    """
    if vector.numel() == 0:
        return True
    lo, hi = torch.aminmax(vector)
    return math.isfinite(float(lo)) and math.isfinite(float(hi))


class Layout:
    """Where each floating tensor of a model state lies in one flat vector.

    Folding an update tensor by tensor costs a few small torch ops per tensor (about 100 for
    LeNet-5, 1200 for ResNet-18), and on a loaded machine each op pays for waking torch's
    thread pool far more than for its arithmetic. Flattened once, an update is checked,
    measured, clipped and summed in a handful of ops over one vector. Integer buffers
    (BatchNorm's batch counters) are bookkeeping, not learned values, and stay out of it.
    """

    def __init__(self, template: Mapping[str, Tensor]) -> None:
        self.spec: Spec = spec_of(template)
        self.keys = tuple(k for k, (_, dtype) in self.spec.items() if dtype.is_floating_point)
        self.sizes = tuple(math.prod(self.spec[k][0]) for k in self.keys)
        self.numel = sum(self.sizes)
        # At least float32, so that a half-precision model is not measured in half precision.
        floating = [self.spec[k][1] for k in self.keys]
        self.dtype: torch.dtype = functools.reduce(torch.promote_types, floating, torch.float32)

    def flatten(self, state: Mapping[str, Tensor], dtype: torch.dtype | None = None) -> Tensor:
        """The floating tensors of `state` in the template's order, as a new vector.

        Unchecked: for the trusted global model, or inside `check`. `dtype` defaults to the
        layout's (float32 for a float32 model).
        """
        dtype = dtype or self.dtype
        if not self.keys:
            return torch.zeros(0, dtype=dtype)
        with torch.no_grad():
            return torch.cat([state[k].detach().reshape(-1) for k in self.keys]).to(dtype)

    def unflatten(self, vector: Tensor, dtype: torch.dtype | None = None) -> dict[str, Tensor]:
        """Cut a flat vector back into the template's floating tensors.

        Each comes out in `dtype` (default: its own in the template) and owns its memory, so a
        caller may change one without touching the others or the vector.
        """
        pieces = vector.split(self.sizes) if self.keys else ()
        return {
            k: p.reshape(self.spec[k][0]).to(dtype or self.spec[k][1], copy=True)
            for k, p in zip(self.keys, pieces, strict=True)
        }

    def check(self, state: Mapping[str, Tensor]) -> CheckedUpdate:
        """Validate a whole update, or raise `UpdateError` naming what is wrong.

        Structure first (names, shapes, dtypes: nothing is flattened before they fit), then
        whether every floating value is finite, in one pass over the flattened vector.
        """
        problem = _structure_problem(self.spec, state)
        if problem is not None:
            raise UpdateError(*problem)
        vector = self.flatten(state)
        if not _all_finite(vector):
            first = int(torch.isfinite(vector).logical_not().nonzero()[0])
            key = self.keys[bisect.bisect_right(list(itertools.accumulate(self.sizes)), first)]
            raise UpdateError("non_finite", f"tensor {key!r}: contains NaN or Inf")
        return CheckedUpdate(self, vector)

    def accept(self, update: Mapping[str, Tensor] | CheckedUpdate) -> CheckedUpdate:
        """An update as a checked vector, for an aggregator over this layout.

        A mapping is checked here. A `CheckedUpdate` was checked when `check` made it (for the
        coordinator's validator, say), so only its model is compared, not its values again.
        """
        if not isinstance(update, CheckedUpdate):
            return self.check(update)
        if update.layout is not self and update.layout.spec != self.spec:
            raise ValueError("the checked update is of another model than this aggregator's")
        return update


@dataclass(frozen=True, eq=False)
class CheckedUpdate:
    """An update that passed `Layout.check`: its floating tensors as one finite vector.

    Only `Layout.check` makes one (the validator's clipping scales a checked one), so an
    aggregator takes it without a second check. Read-only: aggregators keep it, not a copy.
    """

    layout: Layout
    vector: Tensor


def _check_weight(weight: float) -> float:
    if isinstance(weight, bool) or not isinstance(weight, (int, float)):
        raise ValueError(f"weight must be a number, got {weight!r}")
    w = float(weight)
    if not math.isfinite(w) or w <= 0:
        raise ValueError(f"weight must be finite and > 0, got {weight!r}")
    return w


class RunningMean:
    """Weighted mean of model states, accumulated one update at a time.

    Only floating tensors are averaged; integer buffers (e.g. BatchNorm's
    `num_batches_tracked`) are validated but left out of `mean()`, so the server optimiser keeps the
    global model's value for them. Accumulators are float64 by default: summing thousands of
    float32 updates in float32 would lose the low bits the mean is made of. The sum is one flat
    vector (see `Layout`), so that adding an update is one op however many tensors it has.
    """

    def __init__(self, template: Mapping[str, Tensor], *, dtype: torch.dtype = torch.float64):
        if dtype not in (torch.float64, torch.float32):
            raise ValueError(f"accumulator dtype must be float64 or float32, got {dtype}")
        self._layout = Layout(template)
        self._sum = torch.zeros(self._layout.numel, dtype=dtype)
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

    def add(self, update: Mapping[str, Tensor] | CheckedUpdate, weight: float) -> None:
        """Add `weight * update` (weight is typically the device's sample count).

        A state mapping is validated first (`UpdateError`, and nothing changes, if it is bad);
        a `CheckedUpdate` from `Layout.check` is not checked again.
        """
        w = _check_weight(weight)
        vector = self._layout.accept(update).vector
        with torch.no_grad():
            self._sum.add_(vector.to(self._sum.device), alpha=w)
        self._count += 1
        self._total += w

    def merge(self, other: RunningMean) -> None:
        """Fold another partial aggregate (over the same model) into this one."""
        if other._layout.spec != self._layout.spec or other._dtype != self._dtype:
            raise ValueError("cannot merge running means over different models or dtypes")
        self._sum.add_(other._sum)
        self._count += other._count
        self._total += other._total

    def mean(self) -> dict[str, Tensor]:
        """The weighted mean of the floating tensors, in the template's dtypes."""
        if self._count == 0:
            raise ValueError("no updates were added; the mean is undefined")
        return self._layout.unflatten(self._sum / self._total)

    def partial_state(self) -> dict[str, Tensor]:
        """Sums, count and total weight as tensors, to ship a partial aggregate as safetensors.

        One sum per floating tensor (`sum.<name>`, in the accumulator's dtype), not the flat
        vector, so that the format does not depend on how the sum is kept.
        """
        sums = self._layout.unflatten(self._sum, dtype=self._dtype)
        out = {_SUM + k: t for k, t in sums.items()}
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
        layout = rm._layout
        expected = {_SUM + k for k in layout.keys} | {_COUNT, _TOTAL}
        if set(partial) != expected:
            raise ValueError(
                "partial aggregate does not match the model: missing "
                f"{sorted(expected - set(partial))}, unexpected {sorted(set(partial) - expected)}"
            )
        sums = {k: partial[_SUM + k] for k in layout.keys}
        for k, t in sums.items():
            shape = layout.spec[k][0]
            if tuple(t.shape) != shape or t.dtype != acc_dtype:
                raise ValueError(
                    f"partial sum {k!r}: expected {shape} {acc_dtype}, got {describe(t)}"
                )
        rm._sum = layout.flatten(sums, dtype=acc_dtype)
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
    merge (docs/protocol.md#beyond-one-broker): a sharded coordinator must use `mean`.

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
        self._layout = Layout(template)
        self._updates: list[Tensor] = []
        """Each update's floating tensors as one flat vector (see `Layout`)."""

    @property
    def count(self) -> int:
        """How many updates were added."""
        return len(self._updates)

    def add(self, update: Mapping[str, Tensor] | CheckedUpdate, weight: float) -> None:
        """Keep the update's floating tensors (`weight` is checked, then ignored).

        A state mapping is validated and flattened into a new vector; a `CheckedUpdate`'s
        vector is kept as it is (it is read-only).
        """
        _check_weight(weight)
        self._updates.append(self._layout.accept(update).vector)

    def mean(self) -> dict[str, Tensor]:
        """The rule's aggregate, computed coordinate-wise in float64.

        Coordinates go through in blocks of about `_BLOCK` values across all updates, so the
        sorted copy stays small however large N and the tensors are.
        """
        if not self._updates:
            raise ValueError("no updates were added; the aggregate is undefined")
        step = max(1, _BLOCK // len(self._updates))
        result = torch.empty(self._layout.numel, dtype=torch.float64)
        with torch.no_grad():
            for lo in range(0, result.numel(), step):
                block = torch.stack([u[lo : lo + step] for u in self._updates]).to(torch.float64)
                result[lo : lo + step] = self._reduce(block.sort(dim=0).values)
        return self._layout.unflatten(result)

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


def capped_weights(counts: Mapping[str, int], max_share: float) -> dict[str, float]:
    """Each device's weight in a round's mean: its sample count, with no device above
    `max_share` of the round's total (docs/round.md#weights).

    FedAvg weighs by sample count, which a device states itself; the cap bounds what one device
    can gain by overstating it (within what the data set can hold: `bitfleet.registration`).
    The cut is water-filling: the largest counts are lowered to one common level `t`, chosen so
    that `t` is exactly `max_share` of the new total, and the rest keep theirs. When even equal
    weights would break the cap (fewer than 1 / max_share devices), weights are equal.
    """
    if not 0 < max_share <= 1:
        raise ValueError(f"max_share must be in (0, 1], got {max_share}")
    if not counts:
        return {}
    if len(counts) * max_share <= 1:
        return dict.fromkeys(counts, 1.0)
    ordered = sorted(counts.values(), reverse=True)
    rest = float(sum(ordered))
    level = float(ordered[0])
    # Lower the k largest to `level` while level exceeds max_share of the total so formed.
    for k in range(1, len(ordered) + 1):
        rest -= ordered[k - 1]
        level = max_share * rest / (1 - k * max_share) if k * max_share < 1 else math.inf
        next_count = ordered[k] if k < len(ordered) else 0
        if level >= next_count:
            break
    return {d: min(float(n), level) for d, n in counts.items()}


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
