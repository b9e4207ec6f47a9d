"""Per-tensor activation fake-quant, calibrated on a few batches."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from bitfleet.models import create_model
from bitfleet.quant import ActivationQuantizer, calibrate_activations, quantize_model


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
