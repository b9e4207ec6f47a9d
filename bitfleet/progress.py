"""Progress for long work: a live line on a terminal, one summary line per phase anywhere."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from typing import TextIO


class Progress:
    """Reports phases of a long job on stderr so stdout stays clean for tables and JSON."""

    def __init__(self, stream: TextIO | None = None, enabled: bool = True) -> None:
        self.stream = stream or sys.stderr
        self.enabled = enabled
        self.live = enabled and self.stream.isatty()
        self.start = time.perf_counter()

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def step_callback(self, phase: str) -> Callable[[int, int, float], None]:
        """A training `on_step` hook that redraws one line about ten times a second."""
        last = [0.0]

        def on_step(step: int, total: int, loss: float) -> None:
            if not self.live:
                return
            now = time.perf_counter()
            if now - last[0] < 0.1 and step != total:
                return
            last[0] = now
            pct = 100.0 * step / total
            self.stream.write(f"\r  {phase}: {pct:5.1f}%  step {step}/{total}  loss {loss:.3f}")
            self.stream.flush()

        return on_step

    def done(self, phase: str, detail: str = "") -> None:
        """End a phase with one permanent line."""
        if not self.enabled:
            return
        clear = "\r\033[K" if self.live else ""
        tail = f": {detail}" if detail else ""
        self.stream.write(f"{clear}[{self.elapsed():6.1f}s] {phase}{tail}\n")
        self.stream.flush()
