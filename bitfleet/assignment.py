"""What one device is told to train: the typed assignment, and the one place that knows which
options each local method takes.

The coordinator decides an `Assignment` per device, stores it, sends it in the `assign` message
and with every task; the agent reads it back and trains with `Assignment.method()`. The
coordinator builds the same method when it needs to know what a device ran, and the exporter
when it rebuilds a checkpoint's model, so every role reads an assignment one way
(docs/quantizer.md, docs/allocation.md).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

from .protocol import ProtocolError
from .quant.methods import LocalMethod, make_method

BitMap = dict[str, int]

_WITH_BITS = frozenset({"qat", "apqn", "mpq"})
"""Methods whose training takes a bit-width (`mpq`'s is its budget)."""
_WITH_STEP = frozenset({"qat", "mqat"})
"""Methods with a QAT step mode (frozen, learned, dynamic)."""


@dataclass(frozen=True)
class Assignment:
    """A device's local method ("strategy") and its bits.

    `bits` is the training width (QAT, APQN) or the FedMPQ budget; `bit_set` MQAT's widths;
    `per_layer_bits` FedMPQ's widths per layer; `step` the QAT step mode (None: the method's
    default, frozen); `lasso` FedMPQ's group-Lasso strength; `deploy_bits` the width the device's
    final model is exported at (decided once, with the assignment; None where the job never
    exports per device). `act_bits` is the activation width (None: float activations, as
    before) and `act_bit_set` MQAT's activation widths, drawn per round; both travel only
    when set, so an older peer, which ignores unknown fields, reads the same assignment.
    """

    strategy: str
    bits: int
    bit_set: tuple[int, ...] | None = None
    per_layer_bits: BitMap | None = None
    step: str | None = None
    lasso: float | None = None
    deploy_bits: int | None = None
    act_bits: int | None = None
    act_bit_set: tuple[int, ...] | None = None

    def method_options(self) -> dict[str, object]:
        """The keyword options `make_method(self.strategy, ...)` takes for this assignment."""
        options: dict[str, object] = {}
        if self.strategy in _WITH_BITS:
            options["bits"] = int(self.bits)
        if self.strategy in _WITH_STEP and self.step:
            options["step"] = self.step
        if self.strategy == "mqat" and self.bit_set:
            options["bit_set"] = tuple(self.bit_set)
        if self.strategy == "mpq":
            if self.per_layer_bits:
                options["layer_bits"] = dict(self.per_layer_bits)
            if self.lasso is not None:
                options["lasso"] = float(self.lasso)
        if self.act_bits is not None:
            options["act_bits"] = int(self.act_bits)
        if self.strategy == "mqat" and self.act_bit_set:
            options["act_bit_set"] = tuple(self.act_bit_set)
        return options

    def method(self) -> LocalMethod:
        """The `LocalMethod` that trains (and deploys) this assignment."""
        return make_method(self.strategy, **self.method_options())

    def with_layer_bits(self, layer_bits: Mapping[str, int]) -> Assignment:
        """The same assignment with FedMPQ's revised per-layer widths."""
        return replace(self, per_layer_bits={k: int(v) for k, v in layer_bits.items()})

    def final_bits(self) -> int | BitMap | None:
        """What the device's model is exported at: its per-layer widths, else `deploy_bits`."""
        return dict(self.per_layer_bits) if self.per_layer_bits else self.deploy_bits

    def describe(self) -> str:
        """A short human label: "qat 2-bit", "mqat {2,4,8}", "mpq budget 4-bit", "ptq"; with
        activation widths "qat W2A2", "mqat {2,4,8} A{2,4,8}", "mpq budget 4-bit A4", "ptq A8"."""
        acts = ""
        if self.strategy == "mqat" and self.act_bit_set:
            acts = "A{" + ",".join(str(b) for b in self.act_bit_set) + "}"
        elif self.act_bits is not None:
            acts = f"A{self.act_bits}"
        if self.strategy in ("qat", "apqn"):
            if acts:
                return f"{self.strategy} W{self.bits}{acts}"
            return f"{self.strategy} {self.bits}-bit"
        if self.strategy == "mqat" and self.bit_set:
            label = "mqat {" + ",".join(str(b) for b in self.bit_set) + "}"
        elif self.strategy == "mpq":
            label = f"mpq budget {self.bits}-bit"
        else:
            label = self.strategy
        return f"{label} {acts}" if acts else label

    def to_message(self) -> dict[str, Any]:
        """The assignment's fields of an `assign` message body (and of a task's assignment)."""
        body: dict[str, Any] = {
            "strategy": self.strategy,
            "bits": self.bits,
            "bit_set": None if self.bit_set is None else list(self.bit_set),
            "per_layer_bits": None if self.per_layer_bits is None else dict(self.per_layer_bits),
        }
        if self.step is not None:
            body["step"] = self.step
        if self.lasso is not None:
            body["lasso"] = self.lasso
        if self.deploy_bits is not None:
            body["deploy_bits"] = self.deploy_bits
        if self.act_bits is not None:
            body["act_bits"] = self.act_bits
        if self.act_bit_set is not None:
            body["act_bit_set"] = list(self.act_bit_set)
        return body

    @classmethod
    def from_message(cls, body: Mapping[str, Any]) -> Assignment:
        """Read an already schema-checked `assign` body; fields this side does not know are
        ignored, so a newer coordinator can add some. A wrong type is a ProtocolError."""
        try:
            bit_set = body.get("bit_set")
            layers = body.get("per_layer_bits")
            lasso = body.get("lasso")
            deploy = body.get("deploy_bits")
            step = body.get("step")
            act_bits = body.get("act_bits")
            act_bit_set = body.get("act_bit_set")
            return cls(
                strategy=str(body["strategy"]),
                bits=int(body["bits"]),
                bit_set=tuple(int(b) for b in bit_set) if bit_set else None,
                per_layer_bits={str(k): int(v) for k, v in layers.items()} if layers else None,
                step=str(step) if step else None,
                lasso=None if lasso is None else float(lasso),
                deploy_bits=None if deploy is None else int(deploy),
                act_bits=None if act_bits is None else int(act_bits),
                act_bit_set=tuple(int(b) for b in act_bit_set) if act_bit_set else None,
            )
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise ProtocolError("bad_assign", f"assignment is malformed: {exc}") from None
