"""Per-tensor activation fake-quant, calibrated on a few batches.

Unsigned 8-bit (affine) by default because onnxruntime's integer kernels want uint8
activations (docs/export.md); signed symmetric is there for boards that prefer it.
"""

from __future__ import annotations

import torch
from torch import nn


def affine_qparams(lo: float, hi: float, bits: int = 8, signed: bool = False) -> tuple[float, int]:
    """(scale, zero_point) of a per-tensor grid covering [lo, hi] with zero exactly on it.

    Shared by training-time fake-quant and the ONNX exporter, so both put activations on the
    same grid.
    """
    lo, hi = min(lo, 0.0), max(hi, 0.0)
    if signed:
        qmax = 2 ** (bits - 1) - 1
        return max(max(abs(lo), abs(hi)) / qmax, 1e-12), 0
    qmin, qmax = 0, 2**bits - 1
    scale = max((hi - lo) / (qmax - qmin), 1e-12)
    return scale, int(round(qmin - lo / scale))


class ActivationQuantizer(nn.Module):
    """Observes the running min/max while `calibrating`, fake-quantizes once calibrated."""

    def __init__(self, bits: int = 8, signed: bool = False) -> None:
        super().__init__()
        if not 2 <= bits <= 8:
            raise ValueError(f"activation bits must be in 2..8, got {bits}")
        self.bits = bits
        self.signed = signed
        self.calibrating = False
        self.register_buffer("lo", torch.tensor(float("inf")))
        self.register_buffer("hi", torch.tensor(float("-inf")))

    @property
    def calibrated(self) -> bool:
        return bool(torch.isfinite(self.lo)) and bool(torch.isfinite(self.hi))

    def qparams(self) -> tuple[float, int, int, int]:
        """(scale, zero_point, qmin, qmax) of the observed range, zero always representable."""
        if not self.calibrated:
            raise RuntimeError("activation quantizer used before calibration; run calibrate()")
        scale, zero_point = affine_qparams(float(self.lo), float(self.hi), self.bits, self.signed)
        if self.signed:
            qmin, qmax = -(2 ** (self.bits - 1)), 2 ** (self.bits - 1) - 1
        else:
            qmin, qmax = 0, 2**self.bits - 1
        return scale, zero_point, qmin, qmax

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.calibrating:
            self.lo = torch.minimum(self.lo, x.detach().min())
            self.hi = torch.maximum(self.hi, x.detach().max())
            return x
        scale, zero_point, qmin, qmax = self.qparams()
        return torch.fake_quantize_per_tensor_affine(x, scale, zero_point, qmin, qmax)
