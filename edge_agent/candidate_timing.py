"""Timing a deploy candidate on the board that would run it (docs/export.md#deploy-candidates).

A real board opens the file as it will run it (`bitfleet.onnx_session`, every core, batch 1)
and reports the median latency after warm-up and the memory the session took. A virtual board
(the demo's agents, the simulator's) runs on a host that is not its board: it times the file
here and scales the figure by its board model (`edge_agent.board_model`), whose figures are
cited measurements. Boards sharing one host take turns, so that six virtual boards timing at
once do not measure each other.
"""

from __future__ import annotations

import os

from bitfleet.cache import cache_dir, file_lock
from bitfleet.deploy import CandidateTiming
from bitfleet.onnx_session import time_file
from bitfleet.profiles import DeviceProfile

from .board_model import board_latency_ms, host_anchor


def time_candidate(blob: bytes, board: DeviceProfile, *, emulated: bool) -> CandidateTiming:
    """`blob` timed on this machine, as `board` would run it."""
    if not emulated:
        timing = time_file(blob, threads=0)
        return CandidateTiming("", timing.latency_ms, timing.memory_bytes, "measured")
    with file_lock(cache_dir() / "timing.lock"):
        anchor = host_anchor()
        timing = time_file(blob, threads=anchor.threads)
    ms = board_latency_ms(timing.latency_ms, timing.integer_kernels, board, anchor)
    source = (
        f"host {timing.latency_ms:.3f} ms x {board.name}/host ResNet-18 "
        f"({'int8' if timing.integer_kernels else 'fp32'}, ncnn; {os.cpu_count()} host cores)"
    )
    return CandidateTiming("", ms, timing.memory_bytes, source)
