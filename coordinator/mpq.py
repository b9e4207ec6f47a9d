"""FedMPQ's server side (paper 002): per-layer bit-widths fitted to each device's budget.

After aggregation the global per-layer widths are adjusted to each client's budget before
the model goes out: pruning takes bits from the layers with the most parameters (and the
emptiest top bit planes, reported by the clients' `plane_sparsity`), growing gives bits to
the smallest layers, "layers ordered by size". The budget is an average bit-width weighted
by parameter count (`bitfleet.quant.mpq.budget_bits`): what the weights occupy on the board.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

from bitfleet.quant import FLOAT_BITS, SUPPORTED_BITS, check_bits


def _check_allowed(allowed: Sequence[int]) -> list[int]:
    widths = sorted({check_bits(b) for b in allowed})
    if not widths or FLOAT_BITS in widths:
        raise ValueError(f"allowed must name integer widths in 2..8, got {list(allowed)}")
    return widths


def _check_inputs(
    sparsity: Mapping[str, Sequence[float]],
    sizes: Mapping[str, int],
    budget: float,
    widths: list[int],
    start: Mapping[str, int] | None,
) -> None:
    if not sizes:
        raise ValueError("sizes must name at least one layer")
    bad = {
        n: s for n, s in sizes.items() if isinstance(s, bool) or not isinstance(s, int) or s <= 0
    }
    if bad:
        raise ValueError(f"layer sizes must be positive ints, got {bad}")
    if not (math.isfinite(budget) and widths[0] <= budget <= widths[-1]):
        raise ValueError(
            f"budget {budget} is outside [{widths[0]}, {widths[-1]}], the range of the "
            f"allowed widths {widths}: no assignment can meet it"
        )
    unknown = sorted(set(sparsity) - set(sizes))
    if unknown:
        raise ValueError(f"sparsity names layers not in sizes: {unknown}")
    for name, shares in sparsity.items():
        if not all(0.0 <= z <= 1.0 for z in shares):
            raise ValueError(f"sparsity of {name!r} must be shares in [0, 1], got {list(shares)}")
    if start is not None:
        if set(start) != set(sizes):
            raise ValueError(f"start must name exactly the layers in sizes: {sorted(sizes)}")
        off = {n: b for n, b in start.items() if b not in widths}
        if off:
            raise ValueError(f"start widths {off} are not among the allowed {widths}")


def _zero_share(shares: Sequence[float], bits: int, lower: int) -> float:
    """Share of weights a drop from `bits` to `lower` leaves untouched, at most.

    It removes magnitude planes lower - 1 .. bits - 2 (0 = LSB); `shares` lists a layer's
    planes MSB first at the width it trained at, and a plane above those is empty on that
    grid. A weight is untouched only when every removed plane is zero for it, hence the min.
    """
    top = len(shares) - 1
    return min(shares[top - p] if p <= top else 1.0 for p in range(lower - 1, bits - 1))


def _suffix_reach(units: list[int], widths: list[int]) -> list[int]:
    """reach[k]: bit t set iff layers k.. can make up exactly t units of bits (a bitset)."""
    reach = [1]
    for u in reversed(units):
        acc = 0
        for b in widths:
            acc |= reach[-1] << (u * b)
        reach.append(acc)
    return reach[::-1]


def prune_grow(
    sparsity: Mapping[str, Sequence[float]],
    sizes: Mapping[str, int],
    budget: float,
    allowed: Sequence[int] = SUPPORTED_BITS,
    start: Mapping[str, int] | None = None,
) -> dict[str, int]:
    """Per-layer widths from `allowed` whose parameter-weighted average meets `budget`.

    "Meets" precisely: with weights n_l the averages sum(n_l b_l) / sum(n_l) that integer
    widths can reach are a finite set, and the budget itself may not be among them. The
    result's average is the largest reachable one <= `budget`: `budget` exactly whenever it
    is reachable (always for a budget equal to an allowed width: the uniform model), else the
    closest from below, never above. A budget outside [min(allowed), max(allowed)] raises
    ValueError.

    `sparsity` is {layer: share of zeros per magnitude bit plane, MSB first}
    (`plane_sparsity`, layers without a report count as dense); `sizes` the weight counts
    (`layer_sizes`); `start` the widths to adjust, e.g. the aggregated global assignment
    (default: every layer at the widest allowed width <= budget).

    Greedy, in the paper's spirit, then made exact:
    1. prune, while the total is above the target: one allowed step down on the layer with
       the highest n_l * (1 + z), z the share of weights the drop leaves untouched: the
       largest saving first, and an emptied top plane may double a layer's priority;
    2. grow, while a step up still fits: the smallest layer first (cheapest bits);
    3. settle: layers in decreasing size keep their greedy width when the remaining layers
       can still make up the target exactly, else take the nearest width that allows it.
       Step 3 lands on the target exactly (a subset-sum reachability check over the weight
       counts divided by their gcd: exact and fast in integers) and, where the greedy
       already reached the target, changes nothing; its corrections fall on the small
       layers, where a bit costs least.
    Ties go to the larger layer, then to the name (and in step 3 to the lower width), so the
    result is deterministic.
    """
    widths = _check_allowed(allowed)
    _check_inputs(sparsity, sizes, budget, widths, start)
    order = sorted(sizes, key=lambda n: (-sizes[n], n))
    unit = math.gcd(*sizes.values())
    units = {n: sizes[n] // unit for n in order}
    reach = _suffix_reach([units[n] for n in order], widths)
    # The relative slack absorbs float rounding in a budget computed as an average.
    limit = math.floor(budget * sum(units.values()) * (1 + 1e-12))
    target = (reach[0] & ((2 << limit) - 1)).bit_length() - 1

    def neighbour(name: str, by: int) -> int:
        return widths[widths.index(bits[name]) + by]

    def prune_priority(name: str) -> tuple[float, int]:
        shares = sparsity.get(name)
        z = _zero_share(shares, bits[name], neighbour(name, -1)) if shares else 0.0
        return units[name] * (1.0 + z), units[name]

    floor_width = max(b for b in widths if b <= budget)
    bits = dict(start) if start is not None else {n: floor_width for n in sizes}
    total = sum(units[n] * bits[n] for n in order)
    while total > target:
        name = max((n for n in order if bits[n] > widths[0]), key=prune_priority)
        lower = neighbour(name, -1)
        total -= units[name] * (bits[name] - lower)
        bits[name] = lower
    for name in sorted(sizes, key=lambda n: (sizes[n], n)):
        while (
            bits[name] < widths[-1]
            and total + units[name] * (neighbour(name, 1) - bits[name]) <= target
        ):
            higher = neighbour(name, 1)
            total += units[name] * (higher - bits[name])
            bits[name] = higher

    remaining = target
    for k, name in enumerate(order):
        u = units[name]
        for b in sorted(widths, key=lambda b: (abs(b - bits[name]), b)):
            if remaining >= u * b and (reach[k + 1] >> (remaining - u * b)) & 1:
                bits[name] = b
                remaining -= u * b
                break
    return {n: bits[n] for n in sizes}
