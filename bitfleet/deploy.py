"""What a board may be given at the end of a job, what it asked for, and the rule that chooses
(docs/export.md#deploy-candidates).

The candidates are the variants of the final model that a board's onnxruntime loads: float,
int8 on integer kernels (QDQ), int8 weights with float compute, 4- and 2-bit packed weights,
and FedMPQ's per-layer widths where the device trained them. The coordinator scores each one's
accuracy on its held-out set; the board times each one on itself. `choose` then takes the most
accurate candidate that meets the owner's limits, ties going to the faster and then the smaller
one. The same values cross the wire (`timing` messages), the store and the reports.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

ACCURACY_TIE = 0.002
"""Accuracies this close are a tie: on 10,000 test images 0.002 is 20 images, about the
spread between float and int8 files of the same model; the faster, smaller file then wins."""
LATENCY_TIE = 0.10
"""Latencies within 10% of each other are a tie: batch-1 times of a small model vary by that
much between repeats on one machine, so a smaller difference cannot decide a choice."""
FULL_BITS = 8
"""Widths from here up cost no accuracy worth a limit; below, a board gets fewer bits only
when its limits leave nothing wider (docs/export.md#deploy-candidates)."""
FLOAT_BITS = 32

MAX_MODEL_BYTES = 2**40
MAX_LATENCY_MS = 1e7


@dataclass(frozen=True)
class CandidateKind:
    """One variant of the final model: the width its weights are deployed at, how they are
    stored (`int8` containers or `packed` INT4/INT2) and whether activations are quantized
    too (integer kernels)."""

    name: str
    bits: int | None
    """Weight width; FLOAT_BITS for float; None for FedMPQ's per-layer widths."""
    storage: str
    activations: bool
    label: str

    @property
    def weight_bits(self) -> int:
        """The width that bounds the file's accuracy; FedMPQ's per-layer file counts as the
        widest, as the width its device trained for."""
        return FLOAT_BITS if self.bits is None else self.bits


CANDIDATE_KINDS: dict[str, CandidateKind] = {
    k.name: k
    for k in (
        CandidateKind("fp32", FLOAT_BITS, "int8", False, "float32"),
        CandidateKind("int8-qdq", 8, "int8", True, "int8 weights and activations"),
        CandidateKind("int8-weights", 8, "int8", False, "int8 weights, float compute"),
        CandidateKind("int4", 4, "packed", False, "4-bit packed weights"),
        CandidateKind("int2", 2, "packed", False, "2-bit packed weights"),
        CandidateKind("mixed", None, "packed", False, "FedMPQ per-layer widths"),
    )
}


def candidate_kinds(widths: Iterable[int], storage: str = "auto", mixed: bool = False) -> list[str]:
    """The candidate names for a job deploying at `widths` (`[deploy] bits`): float, the 8-bit
    pair where 8 is a width, one packed file per lower width; `mixed` adds FedMPQ's file.
    `storage` other than `auto` keeps only the candidates stored that way (and float)."""
    names = ["fp32"]
    wanted = set(widths)
    if 8 in wanted:
        names += ["int8-qdq", "int8-weights"]
    names += [k.name for k in CANDIDATE_KINDS.values() if k.bits in wanted and k.bits < 8]
    if mixed:
        names.append("mixed")
    if storage != "auto":
        names = [n for n in names if n == "fp32" or CANDIDATE_KINDS[n].storage == storage]
    return names


def _limit(value: Any, name: str, hi: float, integer: bool) -> Any:
    if value is None:
        return None
    ok = type(value) is int if integer else type(value) in (int, float)
    if not ok or not (0 < value <= hi) or (not integer and not math.isfinite(value)):
        kind = "an integer" if integer else "a number"
        raise ValueError(f"limits.{name} must be {kind} in (0, {hi:g}], got {value!r}")
    return value if integer else float(value)


@dataclass(frozen=True)
class DeployLimits:
    """What the board's owner allows its model: a file size and a batch-1 latency on the
    board. None: no such limit."""

    max_model_bytes: int | None = None
    max_latency_ms: float | None = None

    def __post_init__(self) -> None:
        _limit(self.max_model_bytes, "max_model_bytes", MAX_MODEL_BYTES, True)
        _limit(self.max_latency_ms, "max_latency_ms", MAX_LATENCY_MS, False)

    @property
    def any(self) -> bool:
        return self.max_model_bytes is not None or self.max_latency_ms is not None

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if v is not None}

    @classmethod
    def from_dict(cls, raw: Any) -> DeployLimits:
        """Read what a board sent; ValueError naming the field otherwise."""
        if raw is None:
            return cls()
        if not isinstance(raw, Mapping):
            raise ValueError("limits must be an object")
        unknown = set(raw) - {"max_model_bytes", "max_latency_ms"}
        if unknown:
            raise ValueError(f"limits: unknown keys {sorted(unknown)}")
        return cls(
            _limit(raw.get("max_model_bytes"), "max_model_bytes", MAX_MODEL_BYTES, True),
            _limit(raw.get("max_latency_ms"), "max_latency_ms", MAX_LATENCY_MS, False),
        )

    def describe(self) -> str:
        parts = []
        if self.max_model_bytes is not None:
            parts.append(f"file <= {self.max_model_bytes / 1024:.0f} KiB")
        if self.max_latency_ms is not None:
            parts.append(f"latency <= {self.max_latency_ms:g} ms")
        return ", ".join(parts) or "none"


@dataclass(frozen=True)
class CandidateTiming:
    """One candidate timed on the board (or scaled to it, for a virtual board)."""

    name: str
    latency_ms: float
    memory_bytes: int
    source: str = "measured"
    """`measured` on the board itself, or how a virtual board scaled the host's figure."""


@dataclass(frozen=True)
class CandidateScore:
    """Everything the choice reads about one candidate of one device."""

    name: str
    bytes: int
    accuracy: float
    """On the coordinator's validation split: what the choice reads."""
    latency_ms: float | None = None
    memory_bytes: int | None = None
    test_accuracy: float | None = None
    """On the test split: reported beside the choice, never read by it."""

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def limit_failure(score: CandidateScore, limits: DeployLimits) -> str | None:
    """Why `score` breaks `limits`, or None. An untimed candidate passes a latency limit only
    for want of a figure; `choose` says so in its reason."""
    if limits.max_model_bytes is not None and score.bytes > limits.max_model_bytes:
        return f"{score.bytes / 1024:.1f} KiB > {limits.max_model_bytes / 1024:.1f} KiB"
    if (
        limits.max_latency_ms is not None
        and score.latency_ms is not None
        and score.latency_ms > limits.max_latency_ms
    ):
        return f"{score.latency_ms:.3g} ms > {limits.max_latency_ms:g} ms"
    return None


@dataclass(frozen=True)
class DeployChoice:
    """One device's candidates, the chosen one, and why."""

    chosen: str | None
    reason: str
    candidates: tuple[CandidateScore, ...]
    excluded: dict[str, str] = field(default_factory=dict)
    """Candidates that break a limit, and how."""

    def score(self, name: str) -> CandidateScore:
        return next(c for c in self.candidates if c.name == name)

    def to_dict(self) -> dict[str, Any]:
        return {
            "chosen": self.chosen,
            "reason": self.reason,
            "candidates": [c.to_dict() for c in self.candidates],
            "excluded": dict(self.excluded),
        }


def _bits(c: CandidateScore) -> int:
    kind = CANDIDATE_KINDS.get(c.name)
    return FLOAT_BITS if kind is None else kind.weight_bits


def _faster_then_smaller(tied: Sequence[CandidateScore]) -> tuple[CandidateScore, bool]:
    """The fastest of `tied` where it is faster by more than `LATENCY_TIE`, else the smallest
    of those as fast; the flag says whether speed decided."""
    timed = [c for c in tied if c.latency_ms is not None]
    if timed:
        fastest = min(c.latency_ms for c in timed)  # type: ignore[type-var]
        fast = [c for c in timed if c.latency_ms <= fastest * (1 + LATENCY_TIE)]  # type: ignore[operator]
        pick = min(fast, key=lambda c: (c.bytes, c.latency_ms))
        return pick, len(fast) < len(tied)
    return min(tied, key=lambda c: c.bytes), False


def choose(
    scores: Sequence[CandidateScore], limits: DeployLimits, tie: float = ACCURACY_TIE
) -> DeployChoice:
    """The most accurate candidate that meets `limits`; among those within `tie` of the best,
    the fastest (by more than `LATENCY_TIE`), then the smallest.

    Fewer than `FULL_BITS` weight bits only where the limits leave no wider candidate: a
    narrower file within the accuracy tie is not a reason to lose accuracy no limit asked
    for. None meets the limits: the smallest (then fastest) one, because a file over a limit
    that cannot be met is still better than no model, and the reason says so.
    """
    if not scores:
        return DeployChoice(None, "no candidate", ())
    excluded = {c.name: why for c in scores if (why := limit_failure(c, limits)) is not None}
    allowed = [c for c in scores if c.name not in excluded]
    if not allowed:
        pick = min(scores, key=lambda c: (c.bytes, c.latency_ms or 0.0))
        return DeployChoice(
            pick.name, f"no candidate meets the limits ({limits.describe()}): the smallest",
            tuple(scores), excluded,
        )  # fmt: skip
    need = min(FULL_BITS, max(_bits(c) for c in allowed))
    for c in allowed:
        if _bits(c) < need:
            excluded[c.name] = f"fewer bits than needed ({_bits(c)} < {need})"
    allowed = [c for c in allowed if _bits(c) >= need]
    best = max(c.accuracy for c in allowed)
    tied = [c for c in allowed if c.accuracy >= best - tie]
    pick, by_speed = _faster_then_smaller(tied)
    why = [f"most accurate within {tie:g} of {best:.4f}"]
    if len(tied) > 1:
        why.append(
            f"{'fastest' if by_speed else 'smallest of the equally fast'} of {len(tied)} tied"
        )
    limited = sorted(n for n, w in excluded.items() if not w.startswith("fewer bits"))
    if limited:
        why.append(f"limits ({limits.describe()}) exclude {', '.join(limited)}")
    if limits.max_latency_ms is not None and pick.latency_ms is None:
        why.append("latency limit not checked: the board sent no timing")
    return DeployChoice(pick.name, "; ".join(why), tuple(scores), excluded)


def planned_width(
    sizes: Mapping[str, int],
    timings: Mapping[str, CandidateTiming] | None,
    limits: DeployLimits,
    widths: Sequence[int],
) -> tuple[int, str]:
    """The width a device will deploy at, known before training (docs/allocation.md#deploy-width):
    the widest of `widths` with a candidate (of the initial model: size and speed do not depend
    on the weights' values) that meets the limits. A device without a binding limit deploys at
    its widest width; one whose limits nothing meets at the narrowest, and the reason says so.
    """
    order = sorted(set(widths), reverse=True)
    if not limits.any:
        return order[0], "no limit: the widest width"
    for bits in order:
        names = [n for n in sizes if CANDIDATE_KINDS[n].bits == bits]
        for n in names:
            t = None if timings is None else timings.get(n)
            score = CandidateScore(n, sizes[n], 0.0, None if t is None else t.latency_ms)
            if limit_failure(score, limits) is None:
                return bits, f"widest width whose file meets {limits.describe()}"
    return order[-1], f"no width meets {limits.describe()}: the narrowest"
