"""Per-tensor activation fake-quant, calibrated on a few batches (docs/quantizer.md#activations).

Unsigned (affine) by default because onnxruntime's integer kernels want uint8 activations
(docs/export.md); signed symmetric is there for boards that prefer it.

The range of a quantizer is calibrated, never trained: it is observed on a few batches (at the
start of each local round on the device's own data, or at deploy on calibration data) and then
frozen, so a training step costs one cheap fake-quant per layer and no host sync. Nothing of
it is in `state_dict()`: the tensors that travel (and are averaged by FedAvg) are the same
whatever the method or the activation width.

The calibrators form a small registry of interchangeable methods, modelled on onnxruntime's
(`MinMax`, `Percentile`, and a quantization-MSE search like the weights' in `scales.py`).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

ACT_SAMPLE = 1 << 15
"""Values kept per calibration (a strided subsample of every batch) for the MSE and
percentile calibrators: enough for a 1% clipping grid, and bounded for ResNet-sized maps, so
a round-start calibration costs a few milliseconds per layer."""
ACT_MSE_GRID = 100
"""Candidate clipping ratios of the observed range, as in the weights' MSE search."""
ACT_PERCENTILE = 99.99

ActRangeFn = Callable[[torch.Tensor, float, float, int, bool], tuple[float, float]]


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


def act_qrange(bits: int, signed: bool = False) -> tuple[int, int]:
    """Integer range of a `bits`-bit activation grid: 0..2^b - 1, or symmetric when signed."""
    if signed:
        return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    return 0, 2**bits - 1


class _ActFakeQuant(torch.autograd.Function):
    """clip(round(x / s), lo, hi) * s with the clipped straight-through estimator.

    Four vectorised in-place ops forward and one fused `hardtanh_backward` backward: about a
    quarter of the time of torch's fused per-tensor fake-quant op on CPU (whose kernel rounds
    element by element), which made a W2A2 LeNet-5 step 1.23x a float step instead of ~1.1x.
    The gradient passes where round(x / s) lies in [lo, hi], i.e. x / s in (lo - 1/2,
    hi + 1/2): the clipped STE.
    """

    @staticmethod
    def forward(ctx, x, scale, lo, hi):  # type: ignore[override]
        ctx.save_for_backward(x)
        ctx.bounds = ((lo - 0.5) * scale, (hi + 0.5) * scale)
        return _act_grid(x, scale, lo, hi)

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        (x,) = ctx.saved_tensors
        a, b = ctx.bounds
        return torch.ops.aten.hardtanh_backward(grad, x, a, b), None, None, None


def _act_grid(x: torch.Tensor, scale: float, lo: int, hi: int) -> torch.Tensor:
    return (x / scale).round_().clamp_(lo, hi).mul_(scale)


def fake_quant_activation(
    x: torch.Tensor, scale: float, zero_point: int, qmin: int, qmax: int
) -> torch.Tensor:
    """(clip(round(x / s) + z, qmin, qmax) - z) * s, as clip(round(x / s), qmin - z, qmax - z) * s
    (the same numbers: z is an integer).

    The division (not a multiplication by 1/s, as torch's fused fake-quant op does) is what ONNX
    QuantizeLinear computes, so a value on a rounding boundary lands on the same level in
    PyTorch and onnxruntime; rounding is half to even in both (`torch.round`). The backward
    is the clipped straight-through estimator.
    """
    lo, hi = qmin - zero_point, qmax - zero_point
    if x.requires_grad and torch.is_grad_enabled():
        return _ActFakeQuant.apply(x, scale, lo, hi)
    return _act_grid(x, scale, lo, hi)


def _minmax_range(values: torch.Tensor, lo: float, hi: float, bits: int, signed: bool):
    return lo, hi


def _percentile_range(values: torch.Tensor, lo: float, hi: float, bits: int, signed: bool):
    """Clip the (100 - p)% extreme values at each end (onnxruntime's Percentile calibrator)."""
    if values.numel() == 0:
        return lo, hi
    v = values.sort().values
    top = min(v.numel() - 1, int(round(ACT_PERCENTILE / 100.0 * (v.numel() - 1))))
    bottom = v.numel() - 1 - top
    return float(v[bottom]), float(v[top])


def _grid_error(values: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, bits: int, signed: bool):
    """Sum of squared fake-quant errors of `values` on each candidate grid [lo_k, hi_k]."""
    qmin, qmax = act_qrange(bits, signed)
    if signed:
        scale = (torch.maximum(lo.abs(), hi.abs()) / qmax).clamp_min(1e-12)
        zp = torch.zeros_like(scale)
    else:
        scale = ((hi - lo) / (qmax - qmin)).clamp_min(1e-12)
        zp = torch.round(qmin - lo / scale)
    s, z = scale[:, None], zp[:, None]
    q = torch.clamp(torch.round(values[None] / s) + z, qmin, qmax)
    return (((q - z) * s - values[None]) ** 2).sum(dim=1)


def _mse_range(values: torch.Tensor, lo: float, hi: float, bits: int, signed: bool):
    """The range r * [lo, hi], r in {0.01, ..., 1.00}, whose grid minimises the squared error.

    As the weights' MSE search (`scales.mse_scale`): clipping the tail buys a finer grid for
    the bulk, which matters most at 2-4 bits. Both ends shrink by the same ratio, so a
    post-ReLU range keeps its 0 and a signed one its centre.
    """
    lo, hi = min(lo, 0.0), max(hi, 0.0)
    if values.numel() == 0 or hi - lo <= 0:
        return lo, hi
    v = values.to(torch.float32)
    ratios = torch.linspace(1.0 / ACT_MSE_GRID, 1.0, ACT_MSE_GRID, device=v.device)
    chunk = max(1, (1 << 23) // v.numel())
    errors = []
    for start in range(0, ACT_MSE_GRID, chunk):
        r = ratios[start : start + chunk]
        errors.append(_grid_error(v, r * lo, r * hi, bits, signed))
    best = float(ratios[int(torch.cat(errors).argmin())])
    return best * lo, best * hi


ACT_CALIBRATORS: dict[str, ActRangeFn] = {
    "minmax": _minmax_range,
    "mse": _mse_range,
    "percentile": _percentile_range,
}
"""Activation range calibrators by name: (sample, observed min, observed max, bits, signed)
-> the (lo, hi) the grid covers."""


def check_act_calibrator(name: str) -> str:
    if name not in ACT_CALIBRATORS:
        raise ValueError(
            f"unknown activation calibrator {name!r}; known: {sorted(ACT_CALIBRATORS)}"
        )
    return name


def activation_range(
    values: torch.Tensor, bits: int, method: str = "minmax", signed: bool = False
) -> tuple[float, float]:
    """The (lo, hi) that calibrator `method` gives a tensor of activations at `bits`."""
    flat = values.detach().flatten().to(torch.float32)
    return ACT_CALIBRATORS[check_act_calibrator(method)](
        flat, float(flat.min()), float(flat.max()), bits, signed
    )


def check_act_bits(bits: int | None) -> int | None:
    if bits is None:
        return None
    if isinstance(bits, bool) or not isinstance(bits, int) or not 2 <= bits <= 8:
        raise ValueError(f"activation bits must be in 2..8 (or None: float), got {bits!r}")
    return bits


class ActivationQuantizer(nn.Module):
    """Per-tensor fake-quant of a layer's input, on a frozen calibrated range.

    `calibrating = True` starts a fresh observation (running min/max, plus a subsample for the
    MSE and percentile calibrators); `calibrating = False` ends it. The grid at each width is
    then computed once, as Python numbers, and every forward is one fake-quant
    (`fake_quant_activation`: a few vectorised in-place ops, no host sync).

    `bits` None passes the input through (float activations). `mode` is "quant" or "noise"
    (APQN: clip(x) + U[-s/2, s/2], the range's clipping plus the rounding's noise, in training;
    the input passes unchanged in evaluation, as APQN's weights do). `record` keeps the last
    training input (`recorded`) for KURE's activation kurtosis.
    `auto_calibrate` lets an uncalibrated quantizer in training calibrate itself on its first
    batch (min/max of that batch through the calibrator), for loops that skip `calibrate`.
    """

    def __init__(
        self, bits: int | None = 8, signed: bool = False, calibrator: str = "minmax"
    ) -> None:
        super().__init__()
        self.bits = check_act_bits(bits)
        self.signed = signed
        self.calibrator = check_act_calibrator(calibrator)
        self.mode = "quant"
        self.record = False
        self.recorded: torch.Tensor | None = None
        self.auto_calibrate = False
        self._calibrating = False
        self._samples: list[torch.Tensor] = []
        self._sample: torch.Tensor | None = None
        self._grids: dict[tuple[int, str], tuple[float, int, int, int]] = {}
        # Observed range: buffers so they follow .to(device), non-persistent so that they are
        # not in state_dict() (the keys that travel must not depend on the method).
        self.register_buffer("lo", torch.tensor(float("inf")), persistent=False)
        self.register_buffer("hi", torch.tensor(float("-inf")), persistent=False)
        self._observed: tuple[float, float] | None = None

    @property
    def calibrating(self) -> bool:
        return self._calibrating

    @calibrating.setter
    def calibrating(self, value: bool) -> None:
        if value and not self._calibrating:
            self.reset()
        elif not value and self._calibrating:
            self._finish()
        self._calibrating = bool(value)

    def reset(self) -> None:
        """Forget the calibration (a new round, or new calibration data)."""
        self.lo.fill_(float("inf"))
        self.hi.fill_(float("-inf"))
        self._samples = []
        self._sample = None
        self._observed = None
        self._grids = {}

    def _finish(self) -> None:
        lo, hi = float(self.lo), float(self.hi)  # one sync per calibration, not per step
        self._observed = (lo, hi) if lo <= hi else None
        sample = torch.cat(self._samples) if self._samples else None
        if sample is not None and sample.numel() > ACT_SAMPLE:
            sample = sample[:: -(-sample.numel() // ACT_SAMPLE)]
        self._sample = sample
        self._samples = []
        self._grids = {}

    def _observe(self, x: torch.Tensor) -> None:
        x = x.detach()
        self.lo = torch.minimum(self.lo, x.min())
        self.hi = torch.maximum(self.hi, x.max())
        if self.calibrator != "minmax":
            flat = x.flatten()
            stride = max(1, flat.numel() // ACT_SAMPLE)
            self._samples.append(flat[::stride].to(torch.float32).clone())

    @property
    def calibrated(self) -> bool:
        return self._observed is not None

    def qparams(self, bits: int | None = None) -> tuple[float, int, int, int]:
        """(scale, zero_point, qmin, qmax) at `bits` (default: the current width), from the
        calibrated range by the calibrator; computed once per width and calibration."""
        bits = self.bits if bits is None else check_act_bits(bits)
        if bits is None:
            raise ValueError("float activations (bits None) have no grid")
        if self._observed is None:
            raise RuntimeError("activation quantizer used before calibration; run calibrate()")
        key = (bits, self.calibrator)
        if key not in self._grids:
            lo, hi = self._observed
            sample = self._sample if self._sample is not None else torch.tensor([lo, hi])
            lo, hi = ACT_CALIBRATORS[self.calibrator](sample, lo, hi, bits, self.signed)
            scale, zero_point = affine_qparams(lo, hi, bits, self.signed)
            qmin, qmax = act_qrange(bits, self.signed)
            self._grids[key] = (scale, zero_point, qmin, qmax)
        return self._grids[key]

    def prepare_widths(self, widths) -> None:  # noqa: ANN001 - any iterable of ints
        """Compute the grids of several widths now (MQAT drawing a width per step)."""
        for b in widths:
            self.qparams(b)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.record and self.training:
            self.recorded = x
        if self.bits is None:
            return x
        if self._calibrating:
            self._observe(x)
            return x
        if self._observed is None and self.auto_calibrate and self.training:
            self.calibrating = True
            self._observe(x)
            self.calibrating = False
        grid = self._grids.get((self.bits, self.calibrator))
        scale, zero_point, qmin, qmax = grid if grid is not None else self.qparams()
        if self.mode == "noise":
            if not self.training:
                return x
            lo, hi = (qmin - zero_point) * scale, (qmax - zero_point) * scale
            noise = (torch.rand_like(x) - 0.5) * scale
            return torch.clamp(x, lo, hi) + noise
        return fake_quant_activation(x, scale, zero_point, qmin, qmax)

    def extra_repr(self) -> str:
        return f"bits={self.bits}, signed={self.signed}, calibrator={self.calibrator}"
