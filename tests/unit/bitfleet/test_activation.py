"""Per-tensor activation fake-quant, calibrated on a few batches."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from bitfleet.models import create_model
from bitfleet.quant import (
    ActivationQuantizer,
    act_quantizers,
    activation_range,
    affine_qparams,
    calibrate_activations,
    fake_quant_activation,
    quantize_model,
)


@settings(max_examples=40, deadline=None)
@given(st.integers(2, 8), st.booleans(), st.integers(0, 2**31 - 1), st.floats(-3.0, 3.0))
def test_levels_per_tensor_and_range(bits: int, signed: bool, seed: int, shift: float) -> None:
    x = torch.randn(4, 3, 5, 5, generator=torch.Generator().manual_seed(seed)) + shift
    q = ActivationQuantizer(bits, signed=signed)
    q.calibrating = True
    q(x)
    q.calibrating = False
    y = q(x)
    assert y.unique().numel() <= 2**bits
    scale, _, _, _ = q.qparams()
    # Inside the calibrated range the error is at most half a step.
    assert float((y - x).abs().max()) <= scale / 2 + 1e-5


def test_uncalibrated_use_is_an_error_and_bits_are_checked() -> None:
    with pytest.raises(RuntimeError, match="calibrat"):
        ActivationQuantizer(8)(torch.zeros(2))
    with pytest.raises(ValueError, match="2..8"):
        ActivationQuantizer(1)


def test_model_with_activation_quant_calibrates_and_stays_close() -> None:
    torch.manual_seed(0)
    model = create_model("lenet5").eval()
    x = torch.rand(16, 1, 28, 28)
    with torch.no_grad():
        ref = model(x)
    quantize_model(model, 8, act_bits=8)
    calibrate_activations(model, [x[:8], x[8:]])
    with torch.no_grad():
        out = model(x)
    assert (out.argmax(1) == ref.argmax(1)).float().mean() >= 0.9
    assert float((out - ref).abs().max()) < 0.1 * float(ref.abs().max())


def test_ranges_stay_out_of_the_state_dict() -> None:
    model = create_model("lenet5")
    keys = set(model.state_dict())
    quantize_model(model, 4, act_bits=2)
    calibrate_activations(model, [torch.rand(8, 1, 28, 28)])
    assert set(model.state_dict()) == keys
    assert all(q.calibrated for q in act_quantizers(model).values())


def test_calibrators_mse_beats_minmax_and_percentile_clips() -> None:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(50_000, generator=gen) ** 3  # heavy tails: a few huge values
    x = torch.relu(x)

    def error(method: str) -> float:
        lo, hi = activation_range(x, 2, method)
        scale, zp = affine_qparams(lo, hi, 2)
        return float(((fake_quant_activation(x, scale, zp, 0, 3) - x) ** 2).mean())

    assert error("mse") < 0.5 * error("minmax")
    lo, hi = activation_range(x, 2, "percentile")
    assert lo <= 1e-6 and hi < float(x.max())
    assert float((x > hi).float().mean()) <= 2e-4
    assert activation_range(x, 2, "minmax") == (float(x.min()), float(x.max()))
    with pytest.raises(ValueError, match="known"):
        activation_range(x, 2, "entropy-ish")


def test_grid_is_computed_once_and_follows_the_width() -> None:
    q = ActivationQuantizer(2, calibrator="mse")
    q.calibrating = True
    q(torch.rand(4, 100))
    q.calibrating = False
    two = q.qparams()
    assert q.qparams() is two  # cached: no recomputation (nor host sync) per step
    q.bits = 4
    assert q.qparams()[3] == 15 and q.qparams(2) == two
    q.calibrating = True  # a new calibration starts afresh
    assert not q.calibrated


def test_fake_quant_rounds_half_to_even_by_division() -> None:
    """ONNX QuantizeLinear computes round_half_even(x / s): so does the fake quantizer."""
    scale = 0.1
    x = torch.tensor([0.5, 1.5, 2.5, -0.5]) * torch.tensor(scale)
    got = fake_quant_activation(x, scale, 3, 0, 255) / scale
    expect = torch.round(x / torch.tensor(scale, dtype=torch.float32))
    torch.testing.assert_close(got, expect)
    x = torch.linspace(-1, 1, 101, requires_grad=True)
    fake_quant_activation(x, 0.01, 50, 0, 63).sum().backward()  # clipped STE
    q = (x.detach() / 0.01).round() + 50
    assert torch.equal(x.grad, ((q >= 0) & (q <= 63)).float())
