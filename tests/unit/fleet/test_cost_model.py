"""The simulator's cost model: timed once per host, cached, re-timed only when asked or when
the cache lacks or garbles a figure."""

from __future__ import annotations

from pathlib import Path

import pytest

from fleet.simulate import cost_model


@pytest.fixture
def calls(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> list[list[str]]:
    monkeypatch.setenv("BITFLEET_CACHE_DIR", str(tmp_path))
    seen: list[list[str]] = []

    def fake(model: str, dataset: str, strategies: list[str], batch: int) -> dict[str, float]:
        seen.append(sorted(strategies))
        return {s: 0.001 * (len(seen) + (s != "fp")) for s in {*strategies, "fp"}}

    monkeypatch.setattr(cost_model, "calibrate", fake)
    return seen


def test_figures_are_timed_once_and_then_read(calls: list[list[str]]) -> None:
    a = cost_model.host_step_seconds("lenet5", "fashion-mnist", {"ptq", "qat"}, 64)
    assert calls == [["fp", "qat"]] and a["ptq"] == a["fp"]
    b = cost_model.host_step_seconds("lenet5", "fashion-mnist", {"ptq", "qat"}, 64)
    assert b == a and len(calls) == 1
    # A new method is timed beside fp, but fp keeps its first figure: runs stay comparable.
    c = cost_model.host_step_seconds("lenet5", "fashion-mnist", {"qat", "mqat"}, 64)
    assert calls[-1] == ["mqat"] and c["fp"] == a["fp"] and c["qat"] == a["qat"]
    d = cost_model.host_step_seconds("lenet5", "fashion-mnist", {"qat"}, 32)  # another batch
    assert len(calls) == 3 and d["fp"] != a["fp"]


def test_recalibrate_and_a_corrupt_cache_time_again(tmp_path: Path, calls: list) -> None:
    first = cost_model.host_step_seconds("lenet5", "fashion-mnist", {"qat"}, 64)
    again = cost_model.host_step_seconds("lenet5", "fashion-mnist", {"qat"}, 64, recalibrate=True)
    assert len(calls) == 2 and again["fp"] != first["fp"]
    (tmp_path / cost_model.CACHE_FILE).write_text("{not json")
    cost_model.host_step_seconds("lenet5", "fashion-mnist", {"qat"}, 64)
    assert len(calls) == 3
