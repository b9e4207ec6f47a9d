"""Typed registrations for tests: a shipped board profile with the figures a test varies."""

from __future__ import annotations

from dataclasses import replace
from functools import cache

from bitfleet.profiles import load_profile
from bitfleet.registration import DataSummary, Registration, StepTimes

_profile = cache(load_profile)


def registration(
    device: str,
    *,
    speed: float = 1.0,
    n: int = 640,
    hist: list[int] | None = None,
    overhead: float = 1.4,
    link_mbps: float = 100.0,
    measured: bool = True,
    board: str = "x86-server",
) -> Registration:
    """A device of kind `board` with `speed`, QAT `overhead` and link; `measured` gives it step
    times (5 ms per float step at speed 1), as a real board measures them."""
    profile = replace(
        _profile(board), relative_speed=speed, qat_overhead=overhead, link_mbps=link_mbps
    )
    hist = hist if hist is not None else [n // 10] * 10
    steps = StepTimes(0.005 / speed, 0.005 / speed * overhead) if measured else None
    summary = {
        "board": profile.to_dict(),
        "step_times": None if steps is None else {"t_fp": steps.t_fp, "t_qat": steps.t_qat},
        "qat_overhead": overhead,
    }
    return Registration(
        device_id=device,
        board=profile,
        step_times=steps,
        qat_overhead=overhead,
        data=DataSummary(n, tuple(hist)),
        profile=summary,
    )
