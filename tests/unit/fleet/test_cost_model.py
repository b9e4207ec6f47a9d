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


def test_a_method_timed_later_keeps_its_ratio_to_fp_not_the_hosts_load(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """fp timed on a quiet host, kure later on a host twice as busy: kure's figure is its ratio
    to the fp steps timed beside it, times the quiet fp, so the load does not reach the clock."""
    monkeypatch.setenv("BITFLEET_CACHE_DIR", str(tmp_path))
    load = [1.0]

    def fake(model: str, dataset: str, strategies: list[str], batch: int) -> dict[str, float]:
        own = {"fp": 0.003, "qat": 0.0033, "kure": 0.006}
        return {s: own[s] * load[0] for s in {*strategies, "fp"}}

    monkeypatch.setattr(cost_model, "calibrate", fake)
    quiet = cost_model.host_step_seconds("lenet5", "fashion-mnist", {"qat"}, 64)
    load[0] = 2.5
    busy = cost_model.host_step_seconds("lenet5", "fashion-mnist", {"qat", "kure"}, 64)
    assert busy["fp"] == quiet["fp"] == pytest.approx(0.003)
    assert busy["kure"] == pytest.approx(0.006)  # not 0.015
