"""Checks of every update against the global model, before it reaches the aggregate.

An update is whatever a device (or whoever holds its credentials) chose to send. One NaN would
turn the whole mean into NaN, and one update scaled up a hundredfold moves the global model
wherever its sender likes. `UpdateValidator.check` therefore judges each update on arrival and
says why it refuses one, with a short stable reason the coordinator counts:

- `unknown_tensor`, `missing_tensor`: the names differ from the global model's;
- `bad_shape`, `bad_dtype`: a tensor does not have the global model's shape or dtype;
- `non_finite`: a floating tensor holds NaN or Inf;
- `norm_outlier`: the norm of `update - global` is more than `factor` times the median norm of
  recently accepted updates (in `reject` mode; `clip` mode scales the delta down instead).

Updates arrive one by one and are folded into the aggregate and dropped, so the round's median
is not known when its first updates must be judged. The median therefore comes from a sliding
window of the norms of the last `window` accepted updates, across rounds: the first arrivals of a
round are judged against the previous rounds. Deltas shrink as training converges, so a window
reaching back into earlier rounds errs on the lenient side, never towards rejecting honest
devices. Until `min_history` norms are known nothing is judged by norm. The median stays honest
while fewer than half of the remembered updates are hostile (the rule's breakdown point).

Memory: the window holds floats; clipping makes one copy of the update; O(model) in all.
"""

from __future__ import annotations

import math
import statistics
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import Tensor

from .strategies import spec_of, update_problem

__all__ = ["NORM_MODES", "REASONS", "UpdateValidator", "Verdict", "delta_norm"]

NORM_MODES = ("off", "clip", "reject")
"""`off`: no norm rule; `clip`: scale an outlier's delta down to the threshold (median-based
norm clipping); `reject`: drop an outlier with reason `norm_outlier`."""

REASONS = (
    "unknown_tensor",
    "missing_tensor",
    "bad_shape",
    "bad_dtype",
    "non_finite",
    "norm_outlier",
)
"""Every reason `UpdateValidator.check` refuses an update with."""


@dataclass(frozen=True)
class Verdict:
    """What `UpdateValidator.check` decided about one update.

    Accepted: `reason` is None and `state` is what to aggregate (the update itself, or a clipped
    copy when `scale` < 1). Refused: `reason` names the rule. `detail` says what broke it, or
    why a clipped update was clipped.
    `norm` is the delta's norm as received (None when the norm rule is off or was not reached).
    """

    reason: str | None
    detail: str = ""
    state: Mapping[str, Tensor] | None = None
    norm: float | None = None
    scale: float = 1.0

    @property
    def accepted(self) -> bool:
        """Whether the update may be aggregated (as `state`)."""
        return self.reason is None


def delta_norm(state: Mapping[str, Tensor], reference: Mapping[str, Tensor]) -> float:
    """L2 norm of `state - reference` over the floating tensors, taken as one flat vector.

    Integer buffers (BatchNorm's batch counters) are bookkeeping, not learned values, and are
    left out. Summed in float64, one tensor at a time, so no copy of the whole model is made.
    """
    total = 0.0
    with torch.no_grad():
        for k, ref in reference.items():
            if ref.is_floating_point():
                diff = state[k].detach().to(torch.float64) - ref.detach().to(torch.float64)
                total += float(torch.linalg.vector_norm(diff)) ** 2
    return total**0.5


class UpdateValidator:
    """Judges updates against the global model; remembers the norms of accepted ones.

    `check` has no side effect, so the coordinator can still refuse a checked update for another
    reason (a duplicate, say); it calls `observe` once the update is really aggregated, and only
    then does its norm enter the window the median is taken over.
    """

    def __init__(
        self,
        mode: str = "clip",
        factor: float = 10.0,
        min_history: int = 5,
        window: int = 100,
    ) -> None:
        if mode not in NORM_MODES:
            raise ValueError(f"mode must be one of {list(NORM_MODES)}, got {mode!r}")
        if not (math.isfinite(factor) and factor >= 1.0):
            raise ValueError(f"factor must be finite and >= 1, got {factor}")
        if not 1 <= min_history <= window:
            raise ValueError(f"need 1 <= min_history <= window, got {min_history}, {window}")
        self.mode = mode
        self.factor = float(factor)
        self.min_history = min_history
        self._norms: deque[float] = deque(maxlen=window)

    def threshold(self) -> float | None:
        """The norm above which an update is an outlier now; None while it is not judged.

        None with the rule off, with fewer than `min_history` accepted norms, or when their
        median is 0 (every device sent the global model back: there is no scale to judge by).
        """
        if self.mode == "off" or len(self._norms) < self.min_history:
            return None
        median = statistics.median(self._norms)
        return self.factor * median if median > 0 else None

    def check(self, state: Mapping[str, Tensor], reference: Mapping[str, Tensor]) -> Verdict:
        """Judge `state` against the global model `reference` it was trained from."""
        problem = update_problem(spec_of(reference), state)
        if problem is not None:
            return Verdict(*problem)
        if self.mode == "off":
            return Verdict(None, state=state)
        norm = delta_norm(state, reference)
        limit = self.threshold()
        if limit is None or norm <= limit:
            return Verdict(None, state=state, norm=norm)
        detail = f"delta norm {norm:.4g} > {self.factor:g} x median = {limit:.4g}"
        if self.mode == "reject":
            return Verdict("norm_outlier", detail, norm=norm)
        scale = limit / norm
        return Verdict(None, detail, state=_scaled(state, reference, scale), norm=norm, scale=scale)

    def observe(self, verdict: Verdict) -> None:
        """Remember an aggregated update's norm (after clipping) for the median of later ones."""
        if not verdict.accepted:
            raise ValueError(f"a refused update ({verdict.reason}) must not be observed")
        if verdict.norm is not None:
            self._norms.append(verdict.norm * verdict.scale)


def _scaled(
    state: Mapping[str, Tensor], reference: Mapping[str, Tensor], scale: float
) -> dict[str, Tensor]:
    """`reference + scale * (state - reference)` for floating tensors; others as sent."""
    out: dict[str, Tensor] = {}
    with torch.no_grad():
        for k, ref in reference.items():
            t = state[k]
            if ref.is_floating_point():
                ref64 = ref.detach().to(torch.float64)
                t = (ref64 + scale * (t.detach().to(torch.float64) - ref64)).to(ref.dtype)
            out[k] = t
    return out
