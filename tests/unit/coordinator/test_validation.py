"""Validation of inbound updates (one reason per rule, each counted) and robust aggregation."""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch

from coordinator import aggregation
from coordinator.aggregation import (
    CheckedUpdate,
    CoordinateMedian,
    Layout,
    RunningMean,
    TrimmedMean,
    UpdateError,
    make_aggregator,
)
from coordinator.checkpoint import load_latest_checkpoint, save_checkpoint
from coordinator.config import JobConfigError, ValidationSection, job_config_from_dict
from coordinator.validation import NORMS_KEY, REASONS, Reference, UpdateValidator, delta_norm

State = dict[str, torch.Tensor]


def model_state(seed: int = 0) -> State:
    """A small state dict with a float weight, a bias and an integer buffer."""
    gen = torch.Generator().manual_seed(seed)
    return {
        "fc.weight": torch.randn(3, 4, generator=gen),
        "fc.bias": torch.randn(3, generator=gen),
        "bn.num_batches_tracked": torch.tensor(seed, dtype=torch.int64),
    }


def with_delta(base: State, norm: float, seed: int = 1) -> State:
    """`base` plus a random delta of exactly `norm` over its floating tensors."""
    gen = torch.Generator().manual_seed(seed)
    deltas = {
        k: torch.randn(t.shape, generator=gen) for k, t in base.items() if t.is_floating_point()
    }
    scale = norm / math.sqrt(sum(float((d**2).sum()) for d in deltas.values()))
    return {k: t + scale * deltas[k] if k in deltas else t.clone() for k, t in base.items()}


# --- one reason per rule ----------------------------------------------------------------------


def _set(key: str, value: torch.Tensor) -> Callable[[State], None]:
    return lambda s: s.__setitem__(key, value)


def _nan(s: State) -> None:
    s["fc.bias"][1] = float("nan")


def _inf(s: State) -> None:
    s["fc.weight"][0, 0] = float("-inf")


@pytest.mark.parametrize(
    ("mutate", "reason"),
    [
        (_set("backdoor.weight", torch.zeros(2)), "unknown_tensor"),
        (lambda s: s.pop("fc.bias"), "missing_tensor"),
        (_set("fc.weight", torch.zeros(4, 3)), "bad_shape"),
        (_set("bn.num_batches_tracked", torch.zeros(1, dtype=torch.int64)), "bad_shape"),
        (_set("fc.weight", torch.zeros(3, 4, dtype=torch.float64)), "bad_dtype"),
        (_set("bn.num_batches_tracked", torch.tensor(0, dtype=torch.int32)), "bad_dtype"),
        (_nan, "non_finite"),
        (_inf, "non_finite"),
    ],
)
def test_each_structural_reason(mutate: Callable[[State], None], reason: str) -> None:
    validator = UpdateValidator(mode="reject")
    update = model_state(1)
    mutate(update)
    verdict = validator.check(update, model_state(0))
    assert (verdict.accepted, verdict.reason, verdict.state) == (False, reason, None)
    assert verdict.detail  # says which tensor
    with pytest.raises(ValueError, match=reason):
        validator.observe(verdict)  # a refused update never enters the window


def test_every_reason_is_listed() -> None:
    assert set(REASONS) == {
        "unknown_tensor",
        "missing_tensor",
        "bad_shape",
        "bad_dtype",
        "non_finite",
        "norm_outlier",
    }


def test_a_good_update_passes_as_sent() -> None:
    glob, update = model_state(0), model_state(1)
    off = UpdateValidator(mode="off").check(update, glob)
    assert off.accepted and off.state is update and off.norm is None
    judged = UpdateValidator(mode="clip").check(update, glob)
    assert judged.state is update and judged.scale == 1.0
    assert judged.norm == pytest.approx(
        math.sqrt(sum(float(((update[k] - glob[k]) ** 2).sum()) for k in ("fc.weight", "fc.bias")))
    )
    assert delta_norm(glob, glob) == 0.0


@pytest.mark.parametrize(
    ("index", "key"),
    [(0, "fc.weight"), (11, "fc.weight"), (12, "fc.bias"), (14, "fc.bias")],
)
def test_non_finite_names_the_tensor_at_either_side_of_a_boundary(index: int, key: str) -> None:
    """The finiteness check runs over one flat vector; the tensor named is the one hit."""
    update = model_state(1)
    layout = Layout(update)
    vector = layout.flatten(update)
    vector[index] = float("nan")
    bad = {**update, **layout.unflatten(vector)}
    with pytest.raises(UpdateError, match=f"tensor '{key}': contains NaN") as info:
        layout.check(bad)
    assert info.value.reason == "non_finite"


def test_structure_is_judged_before_values() -> None:
    """A misshapen tensor is reported even when an earlier one holds NaN: nothing is flattened
    (nor its values read) before every tensor fits."""
    update = model_state(1)
    _nan(update)
    update["fc.bias"] = torch.zeros(4)
    assert UpdateValidator().check(update, model_state(0)).reason == "bad_shape"


def test_half_precision_tensors_are_checked_measured_and_averaged() -> None:
    glob = {"w": torch.ones(4, dtype=torch.float16), "b": torch.zeros(2), "n": torch.tensor(3)}
    update = {"w": torch.full((4,), 2.0, dtype=torch.float16), "b": torch.ones(2), "n": glob["n"]}
    assert Layout(glob).dtype == torch.float32  # never measured in half precision
    verdict = UpdateValidator().check(update, glob)
    assert verdict.accepted and verdict.norm == pytest.approx(math.sqrt(4 + 2))
    rm = RunningMean(glob)
    rm.add(verdict.update, 1.0)
    rm.add(glob, 3.0)
    mean = rm.mean()
    assert (mean["w"].dtype, mean["b"].dtype) == (torch.float16, torch.float32)
    torch.testing.assert_close(mean["w"], torch.full((4,), 1.25, dtype=torch.float16))
    torch.testing.assert_close(mean["b"], torch.full((2,), 0.25))
    inf = {**update, "w": torch.tensor([1.0, float("inf"), 0.0, 0.0], dtype=torch.float16)}
    assert UpdateValidator().check(inf, glob).reason == "non_finite"


# --- the norm rule --------------------------------------------------------------------------


def _warm(validator: UpdateValidator, glob: State, norms: list[float]) -> None:
    """Accept updates of these norms as they are (held ones too) and remember them."""
    for i, n in enumerate(norms):
        verdict = validator.check(with_delta(glob, n, seed=i), glob)
        if verdict.pending:
            verdict = validator.decide(verdict, Reference(glob), None)
        assert verdict.accepted, verdict.detail
        validator.observe(verdict)


def test_clipping_scales_a_100x_update_to_the_threshold() -> None:
    glob = model_state(0)
    validator = UpdateValidator(mode="clip", factor=3.0, min_history=5)
    _warm(validator, glob, [0.8, 1.0, 1.0, 1.2, 1.1])
    assert validator.threshold() == pytest.approx(3.0)
    attack = with_delta(glob, 100.0, seed=42)
    verdict = validator.check(attack, glob)
    assert verdict.accepted and verdict.norm == pytest.approx(100.0)
    assert verdict.scale == pytest.approx(0.03) and "median" in verdict.detail
    clipped = verdict.state
    assert clipped is not None
    assert delta_norm(clipped, glob) == pytest.approx(3.0, rel=1e-5)
    for k in ("fc.weight", "fc.bias"):  # same direction, shorter
        torch.testing.assert_close(clipped[k] - glob[k], 0.03 * (attack[k] - glob[k]))
        assert clipped[k].dtype == glob[k].dtype
    assert torch.equal(clipped["bn.num_batches_tracked"], attack["bn.num_batches_tracked"])
    validator.observe(verdict)  # the window remembers the clipped norm, not the attacker's
    assert validator.threshold() == pytest.approx(3.0 * 1.0)  # low median of 6, with 3.0


def test_the_norm_window_survives_a_checkpoint(tmp_path: Path) -> None:
    """A restarted coordinator must clip the next outlier as the uninterrupted one would."""
    glob = model_state(0)
    before = UpdateValidator(mode="clip", factor=3.0, min_history=4, window=4)
    _warm(before, glob, [0.8, 1.0, 1.0, 1.2, 1.1])  # the window keeps the last 4
    save_checkpoint(tmp_path, 0, glob, before.state_dict())
    _, _, saved = load_latest_checkpoint(tmp_path)  # type: ignore[misc]
    after = UpdateValidator(mode="clip", factor=3.0, min_history=4, window=4)
    after.load_state_dict(saved)
    assert after.threshold() == before.threshold() == pytest.approx(3.0 * 1.0)
    attack = with_delta(glob, 100.0, seed=42)
    assert after.check(attack, glob).scale == pytest.approx(before.check(attack, glob).scale)
    fresh = UpdateValidator(mode="clip", min_history=4)
    fresh.load_state_dict(UpdateValidator().state_dict())  # nothing remembered yet
    assert fresh.threshold() is None
    fresh.load_state_dict({})  # a checkpoint from before the window was saved
    assert fresh.threshold() is None
    with pytest.raises(ValueError, match="finite"):
        fresh.load_state_dict({NORMS_KEY: torch.tensor([1.0, float("nan")])})
    with pytest.raises(ValueError, match="unexpected"):
        fresh.load_state_dict({"m.fc.weight": torch.zeros(1)})


def test_reject_mode_drops_the_100x_update_and_forgets_it() -> None:
    glob = model_state(0)
    validator = UpdateValidator(mode="reject", factor=3.0, min_history=5)
    _warm(validator, glob, [0.8, 1.0, 1.0, 1.2, 1.1])
    verdict = validator.check(with_delta(glob, 100.0, seed=42), glob)
    assert (verdict.reason, verdict.state) == ("norm_outlier", None)
    assert verdict.norm == pytest.approx(100.0)
    assert validator.check(with_delta(glob, 2.9), glob).accepted  # just under 3 x median
    assert validator.threshold() == pytest.approx(3.0)


def test_the_first_updates_are_judged_by_the_rounds_own_norms() -> None:
    """No history yet (round 0): updates come back pending, and the round's low median judges
    them once min_history norms are in, or with fewer at the round's end."""
    glob, ref = model_state(0), Reference(model_state(0))
    validator = UpdateValidator(mode="reject", factor=2.0, min_history=4, window=4)
    held = [validator.check(with_delta(glob, n, seed=i), ref) for i, n in enumerate([1.0, 50.0])]
    assert all(v.pending and v.accepted for v in held)
    norms = [v.norm or 0.0 for v in held]
    assert validator.threshold(norms) is None  # 2 of 4: wait for more
    assert validator.threshold(norms, final=True) == pytest.approx(2.0)  # the smaller judges
    held += [validator.check(with_delta(glob, n, seed=9), ref) for n in (0.9, 20.0)]
    limit = validator.threshold([v.norm or 0.0 for v in held])
    assert limit == pytest.approx(2.0)
    verdicts = [validator.decide(v, ref, limit) for v in held]
    assert [v.reason for v in verdicts] == [None, "norm_outlier", None, "norm_outlier"]
    with pytest.raises(ValueError, match="unjudged"):
        validator.observe(held[0])


def test_a_window_of_min_history_judges_on_arrival() -> None:
    glob = model_state(0)
    validator = UpdateValidator(mode="reject", factor=2.0, min_history=4, window=4)
    _warm(validator, glob, [1.0, 50.0, 0.1, 20.0])  # accepted while warming up
    assert validator.threshold() == pytest.approx(2.0 * 1.0)
    # The window slides: after four updates of norm 1 the old ones are forgotten.
    _warm(validator, glob, [1.0, 1.0, 1.0, 1.0])
    assert validator.threshold() == pytest.approx(2.0)
    assert validator.check(with_delta(glob, 5.0), glob).reason == "norm_outlier"


def test_check_has_no_side_effect_and_a_zero_median_judges_nothing() -> None:
    glob = model_state(0)
    validator = UpdateValidator(mode="reject", factor=2.0, min_history=2)
    for _ in range(3):
        validator.check(with_delta(glob, 1.0), glob)
    assert validator.threshold() is None  # checked, never observed
    _warm(validator, glob, [0.0, 0.0])  # every device sent the global model back
    assert validator.threshold() is None
    assert validator.check(with_delta(glob, 7.0), glob).accepted


def test_a_reference_built_once_judges_as_the_plain_state() -> None:
    glob = model_state(0)
    once, each = (UpdateValidator(mode="clip", factor=3.0, min_history=3) for _ in range(2))
    reference = Reference(glob)
    for i, n in enumerate([1.0, 1.2, 0.9, 50.0, 1.1]):
        update = with_delta(glob, n, seed=i)
        a, b = once.check(update, reference), each.check(update, glob)
        assert (a.reason, a.norm, a.scale, a.detail) == (b.reason, b.norm, b.scale, b.detail)
        if a.pending:  # warming up: accept as they are
            a, b = once.decide(a, reference, None), each.decide(b, reference, None)
        once.observe(a)
        each.observe(b)
    assert once.threshold() == each.threshold()


@pytest.mark.parametrize(
    ("kwargs", "what"),
    [
        ({"mode": "drop"}, "mode"),
        ({"factor": 0.5}, "factor"),
        ({"factor": float("nan")}, "factor"),
        ({"min_history": 0}, "min_history"),
        ({"min_history": 10, "window": 5}, "min_history"),
    ],
)
def test_validator_rejects_bad_settings(kwargs: dict, what: str) -> None:
    with pytest.raises(ValueError, match=what):
        UpdateValidator(**kwargs)


# --- robust aggregation ---------------------------------------------------------------------


def _stack(updates: list[State], key: str) -> np.ndarray:
    return np.stack([u[key].numpy().astype(np.float64) for u in updates])


def _np_trimmed(a: np.ndarray, trim: float) -> np.ndarray:
    cut = int(trim * a.shape[0])
    return np.sort(a, axis=0)[cut : a.shape[0] - cut].mean(axis=0)


@pytest.mark.parametrize("n", [1, 2, 5, 6, 11])
@pytest.mark.parametrize("block", [aggregation._BLOCK, 7])  # 7: many small coordinate blocks
def test_trimmed_mean_and_median_match_numpy(
    n: int, block: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(aggregation, "_BLOCK", block)
    updates = [model_state(seed) for seed in range(n)]
    trimmed, median = TrimmedMean(updates[0], trim=0.2), CoordinateMedian(updates[0])
    for i, u in enumerate(updates):
        trimmed.add(u, weight=1.0 + i)  # weights are checked, not used
        median.add(u, weight=1.0 + i)
    assert trimmed.count == median.count == n
    got_t, got_m = trimmed.mean(), median.mean()
    assert set(got_t) == set(got_m) == {"fc.weight", "fc.bias"}  # int buffers stay global
    for k in got_t:
        assert got_t[k].dtype == got_m[k].dtype == torch.float32
        np.testing.assert_allclose(got_t[k].numpy(), _np_trimmed(_stack(updates, k), 0.2), 1e-6)
        np.testing.assert_allclose(got_m[k].numpy(), np.median(_stack(updates, k), axis=0), 1e-6)


def test_robust_rules_survive_one_huge_outlier_where_the_mean_does_not() -> None:
    honest = [model_state(seed) for seed in range(5)]
    attack = {k: (t + 1e6 if t.is_floating_point() else t) for k, t in honest[0].items()}
    rules = {
        "mean": RunningMean(honest[0]),
        "trimmed_mean": TrimmedMean(honest[0], trim=0.2),  # 6 updates: one cut per side
        "median": CoordinateMedian(honest[0]),
    }
    for agg in rules.values():
        for u in [*honest, attack]:
            agg.add(u, 1.0)
    for k in ("fc.weight", "fc.bias"):
        lo, hi = _stack(honest, k).min(axis=0), _stack(honest, k).max(axis=0)
        assert (rules["mean"].mean()[k].numpy() > 1e5).all()
        for name in ("trimmed_mean", "median"):
            got = rules[name].mean()[k].numpy()
            assert ((got >= lo - 1e-6) & (got <= hi + 1e-6)).all(), name


def test_make_aggregator_and_bad_input() -> None:
    tmpl = model_state(0)
    assert isinstance(make_aggregator("mean", tmpl, trim=0.3), RunningMean)
    assert make_aggregator("trimmed_mean", tmpl, trim=0.3).trim == 0.3  # type: ignore[union-attr]
    assert isinstance(make_aggregator("median", tmpl, trim=0.3), CoordinateMedian)
    with pytest.raises(ValueError, match="unknown aggregation 'krum'"):
        make_aggregator("krum", tmpl)
    with pytest.raises(ValueError, match="trim"):
        TrimmedMean(tmpl, trim=0.5)
    agg = CoordinateMedian(tmpl)
    with pytest.raises(ValueError, match="undefined"):
        agg.mean()
    with pytest.raises(ValueError, match="weight"):
        agg.add(tmpl, 0)
    with pytest.raises(ValueError, match="NaN"):
        agg.add({**tmpl, "fc.bias": torch.full((3,), float("nan"))}, 1.0)
    assert agg.count == 0  # a refused update leaves nothing behind


@pytest.mark.parametrize("rule", ["mean", "trimmed_mean", "median"])
def test_a_checked_update_is_aggregated_without_a_second_check(
    rule: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The validator's checked vector (clipped, for an outlier) is what the aggregator folds."""
    glob = model_state(0)
    validator = UpdateValidator(mode="clip", factor=3.0, min_history=3)
    _warm(validator, glob, [1.0, 1.0, 1.0])
    updates = [with_delta(glob, n, seed=10 + i) for i, n in enumerate([0.5, 1.5, 100.0, 2.0])]
    verdicts = [validator.check(u, Reference(glob)) for u in updates]
    assert verdicts[2].scale == pytest.approx(0.03)
    checks = []
    monkeypatch.setattr(Layout, "check", lambda self, state: checks.append(state))
    fast = make_aggregator(rule, glob)
    for v in verdicts:
        assert isinstance(v.update, CheckedUpdate)
        fast.add(v.update, 10.0)
    assert checks == []
    monkeypatch.undo()
    plain = make_aggregator(rule, glob)
    for v in verdicts:
        assert v.state is not None
        plain.add(v.state, 10.0)  # as a state dict: checked again, same values
    for k, t in plain.mean().items():
        torch.testing.assert_close(fast.mean()[k], t, rtol=0, atol=0)


def test_an_aggregator_refuses_a_checked_update_of_another_model() -> None:
    other = Layout({"w": torch.zeros(15)})
    checked = other.check({"w": torch.ones(15)})
    for rule in ("mean", "median"):
        agg = make_aggregator(rule, model_state(0))
        with pytest.raises(ValueError, match="another model"):
            agg.add(checked, 1.0)
        assert agg.count == 0


# --- configuration --------------------------------------------------------------------------


def test_defaults_and_wiring() -> None:
    cfg = job_config_from_dict({})
    assert cfg.validation == ValidationSection(
        mode="reject", factor=10.0, min_history=5, window=100
    )
    assert (cfg.server.aggregation, cfg.server.trim) == ("mean", 0.2)
    cfg = job_config_from_dict(
        {"server": {"aggregation": "trimmed_mean", "trim": 0.1}, "validation": {"mode": "off"}}
    )
    agg = make_aggregator(cfg.server.aggregation, model_state(), trim=cfg.server.trim)
    assert isinstance(agg, TrimmedMean) and agg.trim == 0.1
    assert cfg.to_dict()["validation"]["mode"] == "off"


@pytest.mark.parametrize(
    ("tables", "where", "what"),
    [
        ({"validation": {"mode": "drop"}}, "validation.mode", "reject"),
        ({"validation": {"factor": 0.5}}, "validation.factor", ">= 1"),
        ({"validation": {"factor": "big"}}, "validation.factor", "number"),
        ({"validation": {"min_history": 0}}, "validation.min_history", ">= 1"),
        ({"validation": {"window": 0}}, "validation.window", ">= 1"),
        (
            {"validation": {"min_history": 20, "window": 10}},
            "validation.min_history",
            "<= validation.window",
        ),
        ({"validation": {"windw": 3}}, "validation.windw", "did you mean 'window'"),
        ({"server": {"aggregation": "krum"}}, "server.aggregation", "trimmed_mean"),
        ({"server": {"trim": 0.5}}, "server.trim", "< 0.5"),
        ({"server": {"trim": -0.1}}, "server.trim", ">= 0"),
    ],
)
def test_config_errors_name_the_key(tables: dict, where: str, what: str) -> None:
    with pytest.raises(JobConfigError) as info:
        job_config_from_dict(tables, source="job.toml")
    msg = str(info.value)
    assert "job.toml" in msg and where in msg and what in msg, msg
