"""FedHQ allocation and its baselines: the properties docs/allocation.md states."""

from __future__ import annotations

import time

import numpy as np
import pytest

from coordinator.allocation import (
    AllocationInput,
    CostModel,
    FedHQAllocation,
    choose_assignment,
    coarse_decisions,
    device_cost,
    make_allocation_rule,
    plan_fine_candidates,
    speed_significance,
)
from coordinator.config import job_config_from_dict
from tests.fleet_values import registration


def _cfg(**allocation: object):
    return job_config_from_dict({"allocation": {"mode": "fedhq", **allocation}}).allocation


def _device(speed: float, n: int, hist: list[int], overhead: float = 1.4) -> dict:
    return {"speed": speed, "n": n, "hist": hist, "overhead": overhead}


def _fleet(devices: dict[str, dict]) -> AllocationInput:
    return AllocationInput(
        registrations={d: registration(d, **figures) for d, figures in devices.items()},
        local_epochs=1.0,
        batch_size=64,
        model_bytes=250_000,
    )


def _skewed(n: int) -> list[int]:
    return [n - 9] + [1] * 9


def _example_fleet() -> AllocationInput:
    return _fleet(
        {
            # The slowest board, little and one-sided data: it sets the all-PTQ round.
            "slow-small": _device(0.05, 3000, _skewed(3000)),
            # Fast with a big, representative data set: its QAT ends well inside that round.
            "fast-big": _device(1.0, 12000, [1200] * 10),
            "mid": _device(0.2, 3000, [300] * 10),
            "mid-skewed": _device(0.2, 3000, [2000, 1000] + [0] * 8),
        }
    )


def test_free_qat_with_important_data_gets_qat() -> None:
    alloc = FedHQAllocation(_cfg()).allocate(_example_fleet())
    x, y = alloc.significance["fast-big"]
    assert x == 0.0  # its QAT round ends before the all-PTQ round: it costs nothing
    assert y == pytest.approx(1.0)  # the largest, most representative data
    assert alloc.strategies["fast-big"] == "qat"
    assert alloc.rules["fast-big"] == "qat_side"


def test_slowest_device_with_small_skewed_data_gets_ptq() -> None:
    alloc = FedHQAllocation(_cfg()).allocate(_example_fleet())
    x, y = alloc.significance["slow-small"]
    assert x == 1.0  # it is the critical path under QAT
    assert y < 0.5
    assert alloc.strategies["slow-small"] == "ptq"
    assert alloc.rules["slow-small"] == "ptq_side"


def test_xi_one_sends_every_device_to_the_band() -> None:
    fleet = _example_fleet()
    band = FedHQAllocation(_cfg(xi=1.0)).allocate(fleet)
    assert set(band.rules.values()) <= {"unimportant", "ambiguous_fits", "ambiguous_slow"}
    every = FedHQAllocation(_cfg(xi=1.0, a=0.0)).allocate(fleet)
    assert all(rule.startswith("ambiguous") for rule in every.rules.values())
    assert sorted(every.ambiguous) == fleet.devices
    # The ambiguous rule itself: QAT exactly where the QAT round fits in the all-PTQ round.
    costs = {c.device: c for c in fleet.costs(8)}
    r_ptq = max(c.ptq_round for c in costs.values())
    for dev, strategy in every.strategies.items():
        assert (strategy == "qat") == (costs[dev].qat_round <= r_ptq)


def test_segmentation_follows_the_geometry() -> None:
    points = {"q": (0.1, 0.9), "p": (0.9, 0.1), "u": (0.1, 0.2), "af": (0.5, 0.6), "as": (0.6, 0.5)}
    fits = {"q": False, "p": True, "u": True, "af": True, "as": False}
    got = coarse_decisions(points, fits, xi=0.2, a=0.0625)
    assert {d: (v.side, v.rule) for d, v in got.items()} == {
        "q": ("qat", "qat_side"),
        "p": ("ptq", "ptq_side"),
        "u": ("ptq", "unimportant"),
        "af": ("qat", "ambiguous_fits"),
        "as": ("ptq", "ambiguous_slow"),
    }


def _synthetic(n: int, seed: int) -> AllocationInput:
    rng = np.random.default_rng(seed)
    devices = {}
    for i in range(n):
        hist = rng.multinomial(int(rng.integers(50, 5000)), rng.dirichlet([0.5] * 10))
        devices[f"d{i:04d}"] = _device(
            float(rng.choice([0.05, 0.075, 0.2, 0.22, 1.0])),
            int(hist.sum()),
            [int(c) for c in hist],
            overhead=float(rng.choice([1.15, 1.2, 1.25, 1.4, 1.5])),
        )
    return _fleet(devices)


def test_deterministic_for_a_seed() -> None:
    fleet = _synthetic(50, seed=3)
    for mode in ("fedhq", "random"):
        cfg = _cfg(mode=mode)
        first = make_allocation_rule(cfg, seed=7).allocate(fleet)
        again = make_allocation_rule(cfg, seed=7).allocate(fleet)
        assert first.strategies == again.strategies
        assert first.significance == again.significance
    other = make_allocation_rule(_cfg(mode="random"), seed=8).allocate(fleet)
    assert other.strategies != first.strategies  # the seed matters for the random baseline


def test_random_hybrid_draws_about_half_and_keeps_each_devices_draw() -> None:
    fleet = _synthetic(400, seed=1)
    alloc = make_allocation_rule(_cfg(mode="random", p_qat=0.5), seed=0).allocate(fleet)
    share = sum(s == "qat" for s in alloc.strategies.values()) / 400
    assert 0.4 < share < 0.6
    fewer = AllocationInput(
        {d: fleet.registrations[d] for d in fleet.devices[:50]}, 1.0, 64, 250_000
    )
    sub = make_allocation_rule(_cfg(mode="random", p_qat=0.5), seed=0).allocate(fewer)
    assert all(alloc.strategies[d] == s for d, s in sub.strategies.items())


def test_coarse_stage_is_fast_for_a_thousand_devices() -> None:
    fleet = _synthetic(1000, seed=0)
    rule = FedHQAllocation(_cfg())
    t0 = time.perf_counter()
    alloc = rule.allocate(fleet)
    assert time.perf_counter() - t0 < 1.0
    assert len(alloc.strategies) == 1000
    assert alloc.seconds < 1.0


def test_speed_significance_rules() -> None:
    fleet = _example_fleet()
    costs = fleet.costs(8)
    critical = speed_significance(costs, "critical")
    simple = speed_significance(costs, "simple")
    assert critical["slow-small"] == 1.0 and critical["fast-big"] == 0.0
    assert all(0.0 <= v <= 1.0 for v in [*critical.values(), *simple.values()])
    assert simple["fast-big"] > 0.0  # the ablation charges every device its own slowdown
    with pytest.raises(ValueError, match="speed rule"):
        speed_significance(costs, "fastest")


def test_device_cost_falls_back_to_the_profile_without_step_times() -> None:
    reg = registration("d", speed=0.1, n=640, overhead=1.5, link_mbps=40.0, measured=False)
    c = device_cost(reg, local_epochs=1, batch_size=64, model_bytes=10**6, calib_batches=0)
    assert c.steps == 10
    assert c.t_qat / c.t_fp == pytest.approx(1.5)
    assert c.comm_s == pytest.approx(2 * 8e6 / 40e6)


def test_fine_stage_model_picks_the_assignment_the_trials_favour() -> None:
    points = {"a": (0.1, 0.9), "b": (0.4, 0.5), "c": (0.8, 0.4)}
    ambiguous = ["a", "b", "c"]
    candidates = plan_fine_candidates(ambiguous, points, 4)
    assert candidates[0] == frozenset() and candidates[-1] == frozenset(ambiguous)
    assert candidates[1] == frozenset({"a"})  # the most QAT-leaning device first
    # Trials: accuracy grows with the QAT share; time grows once c (slow) trains QAT.
    model = CostModel.fit([0.0, 0.5, 1.0], [0.0, 0.05, 0.10], [10, 10, 20], [11, 11, 22])
    assert model.accuracy(1.0) == pytest.approx(0.10)
    assert model.time_scale == pytest.approx(1.1)
    seconds = {frozenset(): 10.0, frozenset("a"): 10.0, frozenset("ab"): 10.0}

    def predicted(qat: frozenset[str]) -> float:
        return seconds.get(qat, 20.0)

    cheap = choose_assignment(model, ambiguous, points, predicted, 10.0, 20.0, time_weight=1.0)
    assert cheap == frozenset({"a", "b"})  # all the gain that costs no time
    free = choose_assignment(model, ambiguous, points, predicted, 10.0, 20.0, time_weight=0.0)
    assert free == frozenset(ambiguous)


def test_allocation_config_is_checked() -> None:
    from coordinator.config import JobConfigError

    with pytest.raises(JobConfigError, match="allocation.speed_rule"):
        job_config_from_dict({"allocation": {"speed_rule": "fastest"}})
    with pytest.raises(JobConfigError, match="allocation.fine"):
        job_config_from_dict({"allocation": {"fine": "yes"}})
    with pytest.raises(JobConfigError, match="allocation.bit_set"):
        job_config_from_dict({"allocation": {"bit_set": [1, 9]}})


def test_an_assignment_builds_the_method_the_device_trains() -> None:
    from bitfleet.assignment import Assignment
    from bitfleet.protocol import ProtocolError
    from bitfleet.quant import MPQ, MQAT, PTQ, QAT

    def read(body: dict) -> Assignment:
        return Assignment.from_message(body)

    qat = read({"strategy": "qat", "bits": 2, "step": "learned"}).method()
    assert isinstance(qat, QAT) and qat.bits == 2 and qat.step == "learned"
    mqat = read({"strategy": "mqat", "bits": 2, "bit_set": [2, 4, 8]}).method()
    assert isinstance(mqat, MQAT) and tuple(mqat.bit_set) == (2, 4, 8)
    layers = {"conv1": 8, "fc1": 2}
    mpq = read({"strategy": "mpq", "bits": 2, "per_layer_bits": layers, "lasso": 0.5}).method()
    assert isinstance(mpq, MPQ) and dict(mpq.layer_bits) == layers and mpq.lasso == 0.5
    assert isinstance(read({"strategy": "ptq", "bits": 2, "future_field": 1}).method(), PTQ)
    assert read({"strategy": "mqat", "bits": 2, "bit_set": [2, 4]}).describe() == "mqat {2,4}"
    # The message round trip keeps every field, the deploy width included.
    full = Assignment("mpq", 4, per_layer_bits=layers, lasso=0.1, deploy_bits=4)
    assert read(full.to_message()) == full
    with pytest.raises(ValueError, match="unknown local method"):
        read({"strategy": "magic", "bits": 2}).method()
    with pytest.raises(ProtocolError, match="malformed"):
        read({"strategy": "qat", "bits": "two"})


def test_a_registration_allocation_cannot_use_is_dropped_with_a_reason(tmp_path) -> None:
    from bitfleet.data import load_dataset
    from bitfleet.protocol import Topics, encode_message
    from bitfleet.protocol.inprocess import InProcessBus
    from coordinator.server import Coordinator
    from tests.tiny_fmnist import make_tiny_fmnist

    folder = make_tiny_fmnist(tmp_path / "data", n_train=100, n_test=20)
    cfg = job_config_from_dict(
        {"job": {"state_dir": str(tmp_path / "state")}, "allocation": {"mode": "fedhq"}}
    )
    coordinator = Coordinator(
        cfg, None, transport_factory=InProcessBus().transport, data=load_dataset(
            "fashion-mnist", data_dir=folder), export=False,
    )  # fmt: skip
    topics = Topics(fleet=cfg.job.fleet)

    def register(device: str, hist: list[int], board: object) -> None:
        body = {
            "device_id": device,
            "profile": {"board": board},
            "data": {"n_samples": sum(hist), "label_hist": hist},
            "sent_at": 0.0,
        }
        coordinator.intake.on_message(topics.register(device), encode_message("register", body))

    good = registration("x", speed=0.1, link_mbps=40.0).board.to_dict()
    register("cifar100-board", [1] * 100, good)  # another data set's classes
    register("bad-board", [5] * 10, "rpi4")  # not a board table
    register("slow-board", [5] * 10, {**good, "relative_speed": 0})
    assert coordinator.dropped == {"bad_register": 3}
    assert coordinator.store.devices() == []
    register("good-board", [5] * 10, good)
    assert [d.id for d in coordinator.store.devices()] == ["good-board"]


def test_deploy_aware_fedhq_trains_in_float_where_the_fleet_deploys_at_8_bits() -> None:
    """The paper's rule gives the fast device with important data QAT whatever is deployed;
    the deploy-aware rule only where PTQ measurably loses at the fleet's deploy widths."""
    from dataclasses import replace

    fleet = _example_fleet()
    paper = FedHQAllocation(_cfg()).allocate(fleet)
    assert paper.strategies["fast-big"] == "qat" and paper.acc_factor is None
    eight = replace(fleet, deploy_widths=dict.fromkeys(fleet.devices, 8))
    aware = FedHQAllocation(_cfg(deploy_aware=True)).allocate(eight)
    assert set(aware.strategies.values()) == {"ptq"}
    assert aware.acc_factor is not None and aware.acc_factor[0] == 0.0
    low = replace(eight, deploy_widths={**eight.deploy_widths, "mid": 2})
    unknown = FedHQAllocation(_cfg(deploy_aware=True)).allocate(low)
    assert unknown.strategies == paper.strategies  # not measured yet: the paper's rule
    measured = replace(low, ptq_loss={8: 0.0, 2: 0.06})
    assert (
        FedHQAllocation(_cfg(deploy_aware=True)).allocate(measured).strategies["fast-big"] == "qat"
    )


def test_measured_speed_replaces_the_registered_one() -> None:
    fleet = _example_fleet()
    assert FedHQAllocation(_cfg()).allocate(fleet).strategies["fast-big"] == "qat"
    from dataclasses import replace

    # fast-big now measures 40x slower float steps: its QAT round is the critical path
    slowed = replace(fleet, measured_t_fp={"fast-big": 0.005 * 40})
    alloc = FedHQAllocation(_cfg()).allocate(slowed)
    assert alloc.significance["fast-big"][0] == 1.0
    assert alloc.strategies["fast-big"] == "ptq"
