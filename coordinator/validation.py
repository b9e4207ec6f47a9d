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
devices. Until `min_history` norms are remembered (the first round, a fresh job), an update is
judged against the round's own norms instead: `check` says `pending`, the round runner holds the
update (at most `min_history` of them), and `decide` judges the held ones once the round has
`min_history` norms, or at the round's end with what it has. The median is the low median, so
with two norms the smaller judges the larger. It stays honest while fewer than half of the
norms it is taken over are hostile (the rule's breakdown point).

Cost: every check works on the update's floating tensors flattened into one vector, measured
against the global model flattened once per round (`Reference`), so it is a handful of torch
ops however many tensors the model has; the vector it checked goes on to the aggregator
(`Verdict.update`), which does not check it again. Memory: the window holds floats; a check
makes the flat copy of the update and a float64 difference for its norm, clipping one more
vector, and the reference is the model in float64: O(model) in all.
"""

from __future__ import annotations

import math
import statistics
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace

import torch
from torch import Tensor

from .aggregation import CheckedUpdate, Layout, UpdateError

__all__ = [
    "NORM_MODES",
    "NORMS_KEY",
    "REASONS",
    "Reference",
    "UpdateValidator",
    "Verdict",
    "delta_norm",
]

NORMS_KEY = "validator.norms"
"""The checkpoint tensor holding the remembered norms, oldest first."""

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
    copy when `scale` < 1), and `update` is the same again as the checked flat vector, which an
    aggregator's `add` takes without checking it again. Refused: `reason` names the rule.
    `detail` says what broke it, or why a clipped update was clipped.
    `norm` is the delta's norm as received (None when the norm rule is off or was not reached).
    """

    reason: str | None
    detail: str = ""
    state: Mapping[str, Tensor] | None = None
    norm: float | None = None
    scale: float = 1.0
    update: CheckedUpdate | None = None
    pending: bool = False
    """Well-formed, but not judged by norm yet: too few norms are known (see `decide`)."""

    @property
    def accepted(self) -> bool:
        """Whether the update may be aggregated (as `state`)."""
        return self.reason is None


class Reference:
    """The global model that a round's updates are judged against, flattened once.

    Every update's delta is taken against it; flattening (and widening to float64) the model
    once per round rather than once per update keeps a check a handful of ops. Build one when
    the round starts, after the global model last changed; `check` also takes a plain state and
    builds a reference for that call.
    """

    def __init__(self, state: Mapping[str, Tensor]) -> None:
        self.state = state
        self.layout = Layout(state)
        self.vector = self.layout.flatten(state, dtype=torch.float64)

    def distance(self, vector: Tensor) -> float:
        """L2 norm of `vector - reference`, for a vector in this reference's layout.

        The difference is taken in float64, where no difference of float32 values overflows,
        in one op over the whole model rather than a few per tensor.
        """
        with torch.no_grad():
            return float(torch.linalg.vector_norm(vector - self.vector))


def delta_norm(state: Mapping[str, Tensor], reference: Mapping[str, Tensor]) -> float:
    """L2 norm of `state - reference` over the floating tensors, taken as one flat vector.

    Integer buffers (BatchNorm's batch counters) are bookkeeping, not learned values, and are
    left out. `state` is not checked: it must have the reference's tensors.
    """
    ref = Reference(reference)
    return ref.distance(ref.layout.flatten(state))


class UpdateValidator:
    """Judges updates against the global model; remembers the norms of accepted ones.

    `check` has no side effect, so the coordinator can still refuse a checked update for another
    reason (a duplicate, say); it calls `observe` once the update is really aggregated, and only
    then does its norm enter the window the median is taken over.
    """

    def __init__(
        self,
        mode: str = "reject",
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

    def threshold(self, round_norms: Sequence[float] = (), final: bool = False) -> float | None:
        """The norm above which an update is an outlier now; None while it is not judged.

        With fewer than `min_history` remembered norms, the round's held `round_norms` count
        too, and `final` (the round is over) judges with however many there are. None with the
        rule off, with too few norms, or when their median is 0 (every device sent the global
        model back: there is no scale to judge by).
        """
        norms = list(self._norms)
        if len(norms) < self.min_history:
            norms += round_norms
        if self.mode == "off" or not norms or (len(norms) < self.min_history and not final):
            return None
        median = statistics.median_low(norms)
        return self.factor * median if median > 0 else None

    def judging(self) -> bool:
        """Whether `check` judges by norm on arrival (False: updates come back `pending`)."""
        return self.mode == "off" or len(self._norms) >= self.min_history

    def check(
        self, state: Mapping[str, Tensor], reference: Mapping[str, Tensor] | Reference
    ) -> Verdict:
        """Judge `state` against the global model `reference` it was trained from; `pending`
        while too few norms are remembered to judge by (`decide` finishes it).

        Pass a `Reference` built once for the round: a plain state is flattened on every call.
        """
        if not isinstance(reference, Reference):
            reference = Reference(reference)
        try:
            update = reference.layout.check(state)
        except UpdateError as refused:
            return Verdict(refused.reason, refused.detail)
        if self.mode == "off":
            return Verdict(None, state=state, update=update)
        verdict = Verdict(None, state=state, norm=reference.distance(update.vector), update=update)
        if not self.judging():
            return replace(verdict, pending=True)
        return self.decide(verdict, reference, self.threshold())

    def decide(self, verdict: Verdict, reference: Reference, limit: float | None) -> Verdict:
        """Judge a well-formed update by its norm against `limit` (None: accept as it is)."""
        norm, update, state = verdict.norm, verdict.update, verdict.state
        if norm is None or update is None or state is None:
            raise ValueError("decide takes a well-formed verdict of check's, with its norm")
        accepted = Verdict(None, state=state, norm=norm, update=update)
        if limit is None or norm <= limit:
            return accepted
        detail = f"delta norm {norm:.4g} > {self.factor:g} x median = {limit:.4g}"
        if self.mode == "reject":
            return Verdict("norm_outlier", detail, norm=norm)
        scale = limit / norm
        clipped = _scaled(update, reference, scale)
        clipped_state = {**state, **reference.layout.unflatten(clipped.vector)}
        return Verdict(None, detail, clipped_state, norm=norm, scale=scale, update=clipped)

    def observe(self, verdict: Verdict) -> None:
        """Remember an aggregated update's norm (after clipping) for the median of later ones."""
        if not verdict.accepted or verdict.pending:
            raise ValueError(f"a refused or unjudged update ({verdict.reason}) is not observed")
        if verdict.norm is not None:
            self._norms.append(verdict.norm * verdict.scale)

    def state_dict(self) -> dict[str, Tensor]:
        """The remembered norms, saved with each round's checkpoint: a restarted coordinator
        then judges its next update as an uninterrupted one would, instead of waiving the
        norm rule until `min_history` updates have been seen again."""
        return {NORMS_KEY: torch.tensor(list(self._norms), dtype=torch.float64)}

    def load_state_dict(self, state: Mapping[str, Tensor]) -> None:
        """Restore `state_dict`'s norms; a checkpoint without them (older) starts empty."""
        unknown = sorted(set(state) - {NORMS_KEY})
        if unknown:
            raise ValueError(f"unexpected validator state {unknown}; expected {NORMS_KEY!r}")
        saved = state.get(NORMS_KEY)
        values = [] if saved is None else saved.detach().to(torch.float64).flatten().tolist()
        if not all(math.isfinite(v) and v >= 0 for v in values):
            raise ValueError(f"{NORMS_KEY} must hold finite norms >= 0")
        self._norms = deque(values, maxlen=self._norms.maxlen)


def _scaled(update: CheckedUpdate, reference: Reference, scale: float) -> CheckedUpdate:
    """`reference + scale * (update - reference)`, computed in float64, in the update's dtype.

    With 0 < scale < 1 this lies between two finite vectors, so it is as checked as `update`.
    """
    with torch.no_grad():
        vector = reference.vector + scale * (update.vector - reference.vector)
    return CheckedUpdate(update.layout, vector.to(update.layout.dtype))
