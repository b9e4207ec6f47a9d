"""Runtime re-allocation: smoothed speeds, hysteresis, and deploy-aware SigAcc."""

from __future__ import annotations

from coordinator.allocation import deploy_loss_factor
from coordinator.reallocation import Hysteresis, SpeedTracker


def test_speed_is_smoothed_and_put_on_the_float_scale() -> None:
    speeds = SpeedTracker()
    speeds.observe("a", board_seconds=10.0, steps=100, qat_factor=1.0)
    assert speeds.t_fp["a"] == 0.1
    speeds.observe("a", board_seconds=40.0 * 1.4, steps=100, qat_factor=1.4)  # QAT, 4x slower
    assert abs(speeds.t_fp["a"] - 0.25) < 1e-12
    speeds.observe("a", board_seconds=0.0, steps=100, qat_factor=1.0)  # nothing measured
    assert abs(speeds.t_fp["a"] - 0.25) < 1e-12


def test_a_device_moves_only_after_the_other_side_held() -> None:
    h = Hysteresis(hold=2)
    h.settle({"a": "mqat", "b": "ptq"})
    assert h.decide({"a": "ptq", "b": "ptq"}) == []
    assert h.decide({"a": "mqat", "b": "ptq"}) == []  # one noisy round: the streak resets
    assert h.decide({"a": "ptq", "b": "ptq"}) == []
    assert h.decide({"a": "ptq", "b": "ptq"}) == ["a"]
    assert h.side["a"] == "ptq"
    assert h.decide({"a": "ptq", "b": "ptq", "c": "mqat"}) == []  # a newcomer just joins
    assert h.side["c"] == "mqat"


def test_deploy_loss_factor() -> None:
    eight = {"a": 8, "b": 8}
    assert deploy_loss_factor(eight, None, 0.02)[0] == 0.0
    low = {"a": 8, "b": 2}
    assert deploy_loss_factor(low, None, 0.02)[0] == 1.0  # unknown: the paper's rule
    assert deploy_loss_factor(low, {8: 0.0, 2: 0.05}, 0.02)[0] == 1.0
    factor, why = deploy_loss_factor({"a": 8, "b": 4}, {8: 0.001, 4: 0.005}, 0.02)
    assert abs(factor - 0.25) < 1e-12 and "4 bits" in why
    assert deploy_loss_factor(eight, {8: -0.003}, 0.02)[0] == 0.0
