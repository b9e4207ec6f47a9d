"""The deploy choice: candidates, owners' limits, the choosing rule and the planned width."""

from __future__ import annotations

import pytest

from bitfleet.deploy import (
    CandidateScore,
    CandidateTiming,
    DeployLimits,
    candidate_kinds,
    choose,
    planned_width,
)
from bitfleet.protocol import ProtocolError
from bitfleet.registration import Registration


def test_candidates_follow_the_deploy_widths_and_storage() -> None:
    assert candidate_kinds([8, 4, 2]) == ["fp32", "int8-qdq", "int8-weights", "int4", "int2"]
    assert candidate_kinds([8]) == ["fp32", "int8-qdq", "int8-weights"]
    assert candidate_kinds([4], mixed=True) == ["fp32", "int4", "mixed"]
    assert candidate_kinds([8, 2], storage="packed") == ["fp32", "int2"]


def _s(name: str, acc: float, size: int, ms: float | None) -> CandidateScore:
    return CandidateScore(name, size, acc, ms)


SCORES = [
    _s("fp32", 0.851, 248_000, 0.30),
    _s("int8-qdq", 0.850, 218_000, 0.20),
    _s("int8-weights", 0.852, 66_000, 0.31),
    _s("int4", 0.846, 35_000, 0.31),
    _s("int2", 0.80, 20_000, 0.31),
]


def test_most_accurate_within_the_tie_goes_to_the_faster() -> None:
    c = choose(SCORES, DeployLimits())
    assert c.chosen == "int8-qdq"  # 0.850 is within 0.002 of 0.852 and the fastest
    assert "fastest of 3 tied" in c.reason
    assert set(c.excluded) == {"int4", "int2"}  # no limit asks for fewer bits


def test_no_limit_never_gives_fewer_bits_even_when_tied_and_faster() -> None:
    scores = [_s("fp32", 0.8554, 249_000, 0.45), _s("int8-weights", 0.8553, 66_000, 0.44),
              _s("int4", 0.8547, 35_000, 0.20)]  # fmt: skip
    c = choose(scores, DeployLimits())
    assert c.chosen == "int8-weights"  # as fast as float (within 10%) and smaller
    assert "smallest of the equally fast" in c.reason


def test_a_size_limit_excludes_and_says_so() -> None:
    c = choose(SCORES, DeployLimits(max_model_bytes=40_000))
    assert c.chosen == "int4"
    assert set(c.excluded) == {"fp32", "int8-qdq", "int8-weights", "int2"}
    assert "exclude fp32, int8-qdq, int8-weights" in c.reason


def test_a_latency_limit_uses_the_boards_timings() -> None:
    c = choose(SCORES, DeployLimits(max_latency_ms=0.25))
    assert c.chosen == "int8-qdq"
    assert set(c.excluded) == {"fp32", "int8-weights", "int4", "int2"}


def test_ties_without_timings_go_to_the_smaller_file() -> None:
    untimed = [CandidateScore(s.name, s.bytes, s.accuracy) for s in SCORES]
    c = choose(untimed, DeployLimits(max_latency_ms=1.0))
    assert c.chosen == "int8-weights"
    assert "not checked" in c.reason


def test_no_candidate_meets_the_limits_gives_the_smallest() -> None:
    c = choose(SCORES, DeployLimits(max_model_bytes=1000))
    assert c.chosen == "int2"
    assert "no candidate meets" in c.reason


def test_the_chosen_is_never_beaten_by_more_than_the_tie() -> None:
    for limits in (DeployLimits(), DeployLimits(max_model_bytes=70_000)):
        c = choose(SCORES, limits)
        best = max(s.accuracy for s in SCORES if s.name not in c.excluded)
        assert c.score(c.chosen).accuracy >= best - 0.002


def test_planned_width_is_the_widest_the_limits_allow() -> None:
    sizes = {"fp32": 248_000, "int8-qdq": 218_000, "int8-weights": 66_000, "int4": 35_000,
             "int2": 20_000}  # fmt: skip
    assert planned_width(sizes, None, DeployLimits(), [8, 4, 2])[0] == 8
    assert planned_width(sizes, None, DeployLimits(max_model_bytes=70_000), [8, 4, 2])[0] == 8
    assert planned_width(sizes, None, DeployLimits(max_model_bytes=40_000), [8, 4, 2])[0] == 4
    assert planned_width(sizes, None, DeployLimits(max_model_bytes=25_000), [8, 4, 2])[0] == 2
    bits, why = planned_width(sizes, None, DeployLimits(max_model_bytes=10), [8, 4, 2])
    assert bits == 2 and "no width" in why
    slow = {n: CandidateTiming(n, 5.0, 0) for n in sizes}
    slow["int2"] = CandidateTiming("int2", 0.5, 0)
    assert planned_width(sizes, slow, DeployLimits(max_latency_ms=1.0), [8, 4, 2])[0] == 2


@pytest.mark.parametrize(
    "raw",
    [
        {"max_model_bytes": 0},
        {"max_model_bytes": -5},
        {"max_model_bytes": 1.5},
        {"max_latency_ms": float("inf")},
        {"max_latency_ms": "3"},
        {"max_model_kib": 4},
        [1, 2],
    ],
)
def test_bad_limits_are_refused_at_registration(raw: object) -> None:
    profile = {"board": None, "limits": raw}
    with pytest.raises((ValueError, ProtocolError)):
        DeployLimits.from_dict(raw)
    from bitfleet.profiles import load_profile

    profile["board"] = load_profile("rpi4").to_dict()
    data = {"n_samples": 10, "label_hist": [10] + [0] * 9}
    with pytest.raises(ProtocolError, match="limits"):
        Registration.from_stored("d1", profile, data)


def test_limits_travel_in_the_registration() -> None:
    from bitfleet.profiles import load_profile

    limits = DeployLimits(max_model_bytes=40 * 1024, max_latency_ms=2.0)
    profile = {"board": load_profile("rpi5").to_dict(), "limits": limits.to_dict()}
    data = {"n_samples": 10, "label_hist": [10] + [0] * 9}
    assert Registration.from_stored("d1", profile, data).limits == limits
    del profile["limits"]
    assert not Registration.from_stored("d1", profile, data).limits.any
