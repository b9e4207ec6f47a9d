"""Runtime re-allocation, the "runtime" in FedHQ's title (docs/allocation.md#runtime).

Every update carries the board's measured training time. `SpeedTracker` keeps a smoothed
float-step time per device from them; before each round the allocation is decided again with
those speeds (and the PTQ loss the last evaluation measured), and `Hysteresis` moves a device
to the other side only when the new decision has held for `HOLD_ROUNDS` decisions in a row, so
a board near the boundary does not flap with every noisy round.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

SMOOTHING = 0.5
"""Weight of the newest measurement in the moving average: a board that slows 4x reads 2.5x
slower after one round and 3.25x after two, while one slow round alone moves it half way."""
HOLD_ROUNDS = 2
"""Consecutive decisions the other side must win before a device moves."""


@dataclass
class SpeedTracker:
    """Smoothed seconds of one float training step per device, from what the boards measured.

    A QAT round's time is divided by the device's QAT overhead, so that a device is compared
    on one scale whichever side it trained on.
    """

    alpha: float = SMOOTHING
    t_fp: dict[str, float] = field(default_factory=dict)

    def observe(self, device: str, board_seconds: float, steps: int, qat_factor: float) -> None:
        """One round's training time (`board_seconds` over `steps` steps, `qat_factor` the
        cost of its step relative to a float step: 1 for PTQ)."""
        if board_seconds <= 0 or steps <= 0 or qat_factor <= 0:
            return
        step = board_seconds / steps / qat_factor
        old = self.t_fp.get(device)
        self.t_fp[device] = step if old is None else self.alpha * step + (1 - self.alpha) * old

    def snapshot(self) -> dict[str, float]:
        return dict(self.t_fp)


@dataclass(frozen=True)
class Move:
    """A device re-allocated at runtime: from which round, between which sides, and why."""

    round: int
    device: str
    old: str
    new: str
    reason: str

    def to_dict(self) -> dict[str, object]:
        return dict(self.__dict__)


@dataclass
class Hysteresis:
    """Which side each device is on, and how long another side has been winning."""

    hold: int = HOLD_ROUNDS
    side: dict[str, str] = field(default_factory=dict)
    streak: dict[str, int] = field(default_factory=dict)

    def settle(self, sides: Mapping[str, str]) -> None:
        """The sides as decided at the start (or by the fine stage): no move pending."""
        self.side = dict(sides)
        self.streak = {}

    def decide(self, decided: Mapping[str, str]) -> list[str]:
        """Feed one round's fresh decisions; return the devices that move now."""
        moved = []
        for dev, new in decided.items():
            if dev not in self.side:
                self.side[dev] = new
                continue
            if new == self.side[dev]:
                self.streak.pop(dev, None)
                continue
            self.streak[dev] = self.streak.get(dev, 0) + 1
            if self.streak[dev] >= self.hold:
                self.side[dev] = new
                self.streak.pop(dev)
                moved.append(dev)
        return moved
