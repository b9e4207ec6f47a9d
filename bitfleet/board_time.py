"""How long a round takes on a board: the two formulas every time estimate is built from.

The allocation predicts round times from them, the coordinator's simulated clock adds them up,
and a virtual board's clock counts its steps with them, so the planned and the measured round
agree on what a step and a transfer are (docs/simulation.md).
"""

from __future__ import annotations

import math


def steps_per_round(n_samples: int, batch_size: int, local_epochs: float) -> int:
    """Optimiser steps of one round: `local_epochs` passes over the device's batches, at
    least one step (a device with less than a batch still trains on what it has)."""
    return max(1, round(local_epochs * max(1, math.ceil(n_samples / batch_size))))


def transfer_seconds(payload_bytes: int, link_mbps: float) -> float:
    """Seconds to receive the model and send the update back over a `link_mbps` link."""
    return 2 * payload_bytes * 8 / (link_mbps * 1e6)
