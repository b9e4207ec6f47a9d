"""Where the virtual boards' local rounds run: one after another on the simulator's main thread
(`SequentialCompute`), or side by side in worker processes (`ProcessCompute`, the default).

Both run the agent's own `LocalTraining` (edge_agent/local_training.py), the value the agent
hands its compute runner; only the place differs (docs/simulation.md#compute). LeNet-5's step is
too small for torch's threads to share: one step on two threads took 5.7 ms here, on one 6.4 ms,
and two single-threaded processes side by side 5.2 and 5.8 ms each, so a worker per core trains
almost twice as many boards per second.
"""

from __future__ import annotations

import os
import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from typing import Any

RUNNERS = ("processes", "sequential")


class SequentialCompute:
    """The virtual boards' training, run one piece at a time on the thread that serves it.

    The boards share this host: ten of them training at once on two cores run slower in all
    than one after the other. And the threads matter: every thread that runs torch ops keeps
    its own OpenMP team, and with a dozen teams on two cores libgomp stops spinning, so each
    kernel call pays for a wake-up (LeNet-5's step: 7.1 ms beside ten idle teams, 4.8 ms
    alone). The simulator therefore serves this queue from its main thread, with torch's two
    threads, and runs the agents and the coordinator with one thread each.
    """

    def __init__(self) -> None:
        self._jobs: queue.Queue[tuple[Callable[[], Any], threading.Event, list[Any]]] = (
            queue.Queue()
        )
        self._closed = threading.Event()

    def __call__(self, work: Callable[[], Any]) -> Any:
        """Run `work` on the serving thread and return its result (or raise its error)."""
        done, box = threading.Event(), []
        self._jobs.put((work, done, box))
        while not done.wait(0.2):
            if self._closed.is_set():
                raise RuntimeError("the simulation stopped before this board's training ran")
        if isinstance(box[0], BaseException):
            raise box[0]
        return box[0]

    def serve(self, until: Callable[[], bool]) -> None:
        """Run queued work until `until()` is true."""
        while not until():
            try:
                work, done, box = self._jobs.get(timeout=0.1)
            except queue.Empty:
                continue
            try:
                box.append(work())
            except Exception as exc:  # noqa: BLE001 - handed to the board that asked
                box.append(exc)
            finally:
                done.set()

    def close(self) -> None:
        """Stop taking work; boards still waiting get an error instead of hanging."""
        self._closed.set()


def _in_worker(work: Callable[[], Any]) -> tuple[int, Any]:
    return os.getpid(), work()


def _one_thread() -> None:
    import torch

    torch.set_num_threads(1)


class ProcessCompute:
    """The boards' local rounds in `workers` processes of one torch thread each (default: one
    per core). Agents call it from their threads and wait for their own round's result; the
    work and its result cross as pickled values (tensors through shared memory)."""

    def __init__(self, workers: int | None = None) -> None:
        self.workers = max(1, workers or os.cpu_count() or 1)
        # spawn, not fork: the simulator has threads (agents, the coordinator, the bus) by now.
        self._pool = ProcessPoolExecutor(
            self.workers, mp_context=get_context("spawn"), initializer=_one_thread
        )
        self._closed = threading.Event()
        self.workers_seen: set[int] = set()
        """Worker pids that ran work: the proof that rounds left this process."""

    def __call__(self, work: Callable[[], Any]) -> Any:
        if self._closed.is_set():
            raise RuntimeError("the simulation stopped before this board's training ran")
        pid, result = self._pool.submit(_in_worker, work).result()
        self.workers_seen.add(pid)
        return result

    def serve(self, until: Callable[[], bool]) -> None:
        """Nothing to serve here (the workers do the work): wait until `until()` is true."""
        while not until():
            time.sleep(0.1)

    def close(self) -> None:
        self._closed.set()
        self._pool.shutdown(wait=False, cancel_futures=True)


def make_compute(runner: str) -> SequentialCompute | ProcessCompute:
    """The compute runner named `runner` (one of `RUNNERS`)."""
    if runner == "processes":
        return ProcessCompute()
    if runner == "sequential":
        return SequentialCompute()
    raise ValueError(f"unknown runner {runner!r}; known: {', '.join(RUNNERS)}")
