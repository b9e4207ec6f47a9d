"""Properties of the quantizer (docs/quantizer.md), checked with hypothesis."""

from __future__ import annotations

import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from torch import nn

from bitfleet.models import create_model
from bitfleet.quant import (
    FLOAT_BITS,
    SCALE_METHODS,
    fake_quant_weight,
    fake_quant_weight_learned,
    qrange,
    quant_layers,
    quantize_model,
    quantize_to_int,
    rescale_step,
    set_bits,
    weight_scale,
)

bits_st = st.integers(min_value=2, max_value=8)
method_st = st.sampled_from(sorted(SCALE_METHODS))
FAST = settings(max_examples=60, deadline=None)


@st.composite
def weights(draw: st.DrawFn) -> torch.Tensor:
    """Random conv or linear weights, with a heavy-tailed option so clipping matters."""
    seed = draw(st.integers(0, 2**31 - 1))
    out_ch = draw(st.integers(1, 12))
    shape = draw(st.sampled_from([(out_ch, 7), (out_ch, 3, 3, 3), (out_ch, 1, 5, 5), (out_ch, 40)]))
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(shape, generator=gen)
    if draw(st.booleans()):
        w = w**3  # heavy tails
    return w * draw(st.floats(1e-3, 10.0))


def _per_channel_values(q: torch.Tensor) -> list[torch.Tensor]:
    return [row.unique() for row in q.reshape(q.shape[0], -1)]


@FAST
@given(weights(), bits_st, method_st)
def test_at_most_two_to_the_b_levels_per_channel(w: torch.Tensor, bits: int, method: str) -> None:
    q = fake_quant_weight(w, weight_scale(w, bits, method), bits)
    assert all(v.numel() <= 2**bits for v in _per_channel_values(q))


@FAST
@given(weights(), bits_st, method_st)
def test_quantization_is_idempotent(w: torch.Tensor, bits: int, method: str) -> None:
    scale = weight_scale(w, bits, method)
    once = fake_quant_weight(w, scale, bits)
    assert torch.equal(fake_quant_weight(once, scale, bits), once)


@FAST
@given(weights(), bits_st)
def test_max_abs_scale_is_stable_under_requantization(w: torch.Tensor, bits: int) -> None:
    """Re-calibrating on already quantized weights gives the same grid (max-abs is exact)."""
    once = fake_quant_weight(w, weight_scale(w, bits, "max"), bits)
    again = fake_quant_weight(once, weight_scale(once, bits, "max"), bits)
    torch.testing.assert_close(again, once, rtol=1e-6, atol=0)


@FAST
@given(weights(), bits_st, method_st)
def test_values_lie_on_the_symmetric_signed_grid(w: torch.Tensor, bits: int, method: str) -> None:
    qmin, qmax = qrange(bits)
    assert (qmin, qmax) == (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1)
    scale = weight_scale(w, bits, method)
    ints = fake_quant_weight(w, scale, bits) / scale.reshape((-1,) + (1,) * (w.dim() - 1))
    assert torch.allclose(ints, ints.round(), atol=1e-3)
    assert ints.min() >= qmin - 1e-3 and ints.max() <= qmax + 1e-3
    q = quantize_to_int(w, scale, bits)
    assert q.dtype == torch.int8 and int(q.min()) >= qmin and int(q.max()) <= qmax


@FAST
@given(weights(), bits_st)
def test_max_abs_scale_never_clips_and_mse_never_loses_to_it(w: torch.Tensor, bits: int) -> None:
    s_max = weight_scale(w, bits, "max")
    q_max = fake_quant_weight(w, s_max, bits)
    flat = w.reshape(w.shape[0], -1)
    top = flat.abs().amax(1)
    torch.testing.assert_close(q_max.reshape(w.shape[0], -1).abs().amax(1), top, rtol=1e-5, atol=0)
    err = {}
    for method in ("max", "mse"):
        q = fake_quant_weight(w, weight_scale(w, bits, method), bits)
        err[method] = ((q - w) ** 2).reshape(w.shape[0], -1).sum(1)
    assert torch.all(err["mse"] <= err["max"] * (1 + 1e-5) + 1e-12)
    assert torch.all(weight_scale(w, bits, "percentile") <= s_max * (1 + 1e-6))


@FAST
@given(weights(), bits_st, st.integers(0, 2**31 - 1))
def test_straight_through_gradient_inside_the_range_zero_outside(
    w: torch.Tensor, bits: int, seed: int
) -> None:
    qmin, qmax = qrange(bits)
    scale = weight_scale(w, bits, "mse") * 0.7  # a tight grid, so some weights clip
    upstream = torch.randn(w.shape, generator=torch.Generator().manual_seed(seed))
    inside = (w / scale.reshape((-1,) + (1,) * (w.dim() - 1))).round()
    inside = (inside >= qmin) & (inside <= qmax)

    fixed = w.clone().requires_grad_()
    (fake_quant_weight(fixed, scale, bits) * upstream).sum().backward()
    torch.testing.assert_close(fixed.grad, upstream * inside)

    learned = w.clone().requires_grad_()
    (fake_quant_weight_learned(learned, scale.log(), bits) * upstream).sum().backward()
    torch.testing.assert_close(learned.grad, upstream * inside)


@FAST
@given(weights(), bits_st, st.integers(0, 2**31 - 1))
def test_learned_step_matches_torch_lsq_reference(w: torch.Tensor, bits: int, seed: int) -> None:
    """Our one-node LSQ gives torch's learnable fake-quant values and step gradient.

    torch multiplies by 1/s where we divide by s; at an exact rounding tie the two may round
    differently, so cases with a weight on a tie are not comparable and are skipped.
    """
    qmin, qmax = qrange(bits)
    scale = weight_scale(w, bits, "mse")
    t = w / scale.reshape((-1,) + (1,) * (w.dim() - 1))
    assume(bool(((t - t.floor() - 0.5).abs() > 1e-3).all()))
    upstream = torch.randn(w.shape, generator=torch.Generator().manual_seed(seed))
    log_step = scale.log().requires_grad_()
    ours = fake_quant_weight_learned(w, log_step, bits)
    (ours * upstream).sum().backward()
    ref_scale = scale.clone().requires_grad_()
    ref = torch._fake_quantize_learnable_per_channel_affine(
        w, ref_scale, torch.zeros_like(scale), 0, qmin, qmax, 1.0
    )
    (ref * upstream).sum().backward()
    torch.testing.assert_close(ours, ref)
    # d/d(log s) = s * d/ds; sums of terms up to s * 2^(b-1) * |g| cancel, so the float
    # rounding of either summation order scales with that bound, not with the result.
    bound = (upstream.abs().reshape(w.shape[0], -1).sum(1) * scale * 2 ** (bits - 1)).max()
    torch.testing.assert_close(
        log_step.grad, ref_scale.grad * scale, rtol=1e-4, atol=1e-6 * float(bound) + 1e-7
    )


@given(st.floats(1e-6, 10.0), bits_st, bits_st)
def test_step_rescaling_follows_eq_11(step: float, b: int, a: int) -> None:
    s_b = torch.tensor([step])
    s_a = rescale_step(s_b, b, a)
    torch.testing.assert_close(s_a, s_b * (2**b - 1) / (2**a - 1))
    # The grid's span is what Eq. 11 keeps, and going back recovers the original step.
    torch.testing.assert_close(s_a * (2**a - 1), s_b * (2**b - 1))
    torch.testing.assert_close(rescale_step(s_a, a, b), s_b)


def test_rescaled_step_is_used_for_bit_widths_without_their_own() -> None:
    model = quantize_model(nn.Sequential(nn.Linear(8, 4)), 4, learn_step=True)
    layer = quant_layers(model)["0"]
    torch.testing.assert_close(layer.step(2), rescale_step(layer.step(4), 4, 2))


@st.composite
def small_models(draw: st.DrawFn) -> tuple[nn.Module, torch.Tensor]:
    seed = draw(st.integers(0, 2**31 - 1))
    c1, c2, hidden = draw(st.integers(1, 6)), draw(st.integers(1, 6)), draw(st.integers(1, 16))
    bias = draw(st.booleans())
    # Layers initialise from torch's global generator: seed it from the example, and restore it
    # afterwards so that tests run later do not see a state left by whichever example ran last.
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = nn.Sequential(
            nn.Conv2d(c1, c2, 3, padding=1, bias=bias),
            nn.ReLU(),
            nn.Conv2d(c2, c2, 1, groups=c2),
            nn.Flatten(),
            nn.Linear(c2 * 16, hidden),
            nn.Tanh(),
            nn.Linear(hidden, 3),
        )
        return model, torch.randn(2, c1, 4, 4)


@settings(max_examples=40, deadline=None)
@given(small_models())
def test_module_swap_at_32_bits_leaves_outputs_unchanged(
    case: tuple[nn.Module, torch.Tensor],
) -> None:
    model, x = case
    before = model(x)
    quantize_model(model, FLOAT_BITS)
    assert len(quant_layers(model)) == 4
    assert torch.equal(model(x), before)


@pytest.mark.parametrize("name", ["lenet5", "small_cnn", "resnet20"])
def test_module_swap_keeps_state_dict_and_parameters(name: str) -> None:
    torch.manual_seed(0)
    model = create_model(name).eval()
    x = torch.rand(2, 1, 28, 28)
    keys = set(model.state_dict())
    params = [id(p) for p in model.parameters()]
    before = model(x)
    quantize_model(model, FLOAT_BITS)
    assert set(model.state_dict()) == keys
    assert [id(p) for p in model.parameters()] == params
    assert torch.equal(model(x), before)
    set_bits(model, 4)
    assert not torch.equal(model(x), before)


def test_per_layer_bit_map_and_its_errors() -> None:
    model = create_model("lenet5")
    quantize_model(model, {"features.0": 8, "classifier.4": 2})
    bits = {n: m.bits for n, m in quant_layers(model).items()}
    assert bits == {
        "features.0": 8,
        "features.3": FLOAT_BITS,
        "classifier.0": FLOAT_BITS,
        "classifier.2": FLOAT_BITS,
        "classifier.4": 2,
    }
    with pytest.raises(KeyError, match="features.9"):
        set_bits(model, {"features.9": 4})
    for bad in (1, 9, 16):
        with pytest.raises(ValueError, match="bits"):
            set_bits(model, bad)
    with pytest.raises(ValueError, match="unknown scale method"):
        weight_scale(torch.ones(2, 2), 4, "minmax")
    with pytest.raises(ValueError, match="no Conv2d or Linear"):
        quantize_model(nn.Sequential(nn.ReLU()))
