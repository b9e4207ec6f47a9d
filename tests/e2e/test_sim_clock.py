"""The simulator's board clock does not move with host load: step costs are calibrated once per
host and cached, and a run times nothing (docs/simulation.md#the-board-clock)."""

from __future__ import annotations

import json
import multiprocessing
import time
from pathlib import Path

import pytest

from fleet.simulate import cost_model
from fleet.simulate.experiment_run import run_experiment
from tests.tiny_experiment import tiny_experiment
from tests.tiny_fmnist import make_tiny_fmnist


def _busy(stop_at: float) -> None:
    x = 0
    while time.monotonic() < stop_at:
        x += 1


def _sim_seconds(path: Path, out: Path) -> dict[str, float]:
    results = run_experiment(path, out)
    return {m: r["sim_seconds"] for m, r in results["methods"].items()}


def test_simulated_seconds_are_the_same_with_two_busy_loops_beside(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("BITFLEET_CACHE_DIR", str(tmp_path / "cache"))
    data = make_tiny_fmnist(tmp_path / "fmnist", n_train=200, n_test=50)
    path = tmp_path / "clock.toml"
    methods = {"all_qat": "qat", "all_ptq": "ptq"}
    path.write_text(tiny_experiment(data, per_board=1, rounds=2, local_epochs=0.5, methods=methods))
    first = _sim_seconds(path, tmp_path / "first")  # calibrates this host, once
    cached = json.loads((tmp_path / "cache" / cost_model.CACHE_FILE).read_text())
    assert len(cached) == 1 and len(next(iter(cached.values()))) == 2  # fp and qat

    def no_timing(*args: object, **kwargs: object) -> dict[str, float]:
        raise AssertionError("a run timed the host: the cost model should come from the cache")

    monkeypatch.setattr(cost_model, "calibrate", no_timing)
    idle = _sim_seconds(path, tmp_path / "idle")
    stop_at = time.monotonic() + 120
    loops = [multiprocessing.Process(target=_busy, args=(stop_at,)) for _ in range(2)]
    for p in loops:
        p.start()
    try:
        busy = _sim_seconds(path, tmp_path / "busy")
    finally:
        for p in loops:
            p.terminate()
            p.join()
    assert idle == first
    for method, seconds in idle.items():
        assert busy[method] == pytest.approx(seconds, rel=0.02), (method, busy, idle)
    assert idle["all_qat"] > idle["all_ptq"]  # the clock still prices QAT's cost
