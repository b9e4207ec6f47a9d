"""From an assignment on the wire to the local method that trains it.

The coordinator sends each device a strategy, its bits, its MQAT bit set and its per-layer
bits (FedMPQ). The agent trains with the method built here, and the coordinator builds the
same method when it needs to know what a device ran, so both read an assignment one way.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from .methods import LocalMethod, make_method


def method_for_assignment(assignment: Mapping[str, Any]) -> LocalMethod:
    """The `LocalMethod` for an assign message's body (strategy, bits, bit_set, per_layer_bits).

    Options a strategy does not take are ignored, so a newer coordinator can add fields.
    """
    strategy = assignment["strategy"]
    options: dict[str, object] = {}
    if strategy in ("qat", "apqn"):
        options["bits"] = int(assignment["bits"])
    if strategy in ("qat", "mqat") and assignment.get("step"):
        options["step"] = str(assignment["step"])
    if strategy == "mqat" and assignment.get("bit_set"):
        options["bit_set"] = tuple(int(b) for b in assignment["bit_set"])
    elif strategy == "mpq":
        options["bits"] = int(assignment["bits"])
        if assignment.get("per_layer_bits"):
            options["layer_bits"] = {k: int(v) for k, v in assignment["per_layer_bits"].items()}
        if assignment.get("lasso") is not None:
            options["lasso"] = float(assignment["lasso"])
    return make_method(strategy, **options)


def describe_assignment(assignment: Mapping[str, Any]) -> str:
    """A short human label: "qat 2-bit", "mqat {2,4,8}", "mpq avg 4-bit", "ptq"."""
    strategy = assignment["strategy"]
    if strategy in ("qat", "apqn"):
        return f"{strategy} {assignment['bits']}-bit"
    if strategy == "mqat" and assignment.get("bit_set"):
        return "mqat {" + ",".join(str(b) for b in assignment["bit_set"]) + "}"
    if strategy == "mpq":
        return f"mpq budget {assignment['bits']}-bit"
    return str(strategy)
