"""The quantizer of docs/quantizer.md, as fused tensor ops.

Everything that quantizes weights in bitfleet (training, evaluation, export) goes through
these few functions, so the integers a board runs are the integers training saw.
"""

from __future__ import annotations

import functools

import torch

FLOAT_BITS = 32
"""A bit-width of 32 means "leave the tensor in float"; it is how the bit maps say "no quant"."""

SUPPORTED_BITS = tuple(range(2, 9))


def check_bits(bits: int) -> int:
    """Reject bit-widths the integer grid cannot represent, naming the bad value."""
    if isinstance(bits, bool) or not isinstance(bits, int):
        raise TypeError(f"bits must be an int, got {bits!r}")
    if bits != FLOAT_BITS and bits not in SUPPORTED_BITS:
        raise ValueError(f"bits must be one of 2..8 or 32 (float), got {bits}")
    return bits


def qrange(bits: int) -> tuple[int, int]:
    """Signed symmetric integer range of Eq. 3: [-2^(b-1), 2^(b-1) - 1]."""
    check_bits(bits)
    return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1


def rescale_step(step: torch.Tensor, from_bits: int, to_bits: int) -> torch.Tensor:
    """Paper 003 Eq. 11: s_a = (2^b - 1) / (2^a - 1) * s_b.

    It keeps the span of the grid, (2^b - 1) * s_b, fixed, so a step learned at one bit-width
    gives a usable step at any other without new data.
    """
    check_bits(from_bits)
    check_bits(to_bits)
    return step * ((2**from_bits - 1) / (2**to_bits - 1))


@functools.lru_cache(maxsize=256)
def _zero_points(channels: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Symmetric grids have zero points of 0; cached, as the per-step ops only read them."""
    return torch.zeros(channels, dtype=dtype, device=device)


def fake_quant_weight(w: torch.Tensor, scale: torch.Tensor, bits: int) -> torch.Tensor:
    """Q(w, b) per output channel (axis 0) with a fixed scale.

    The fused op's backward is the clipped straight-through estimator: gradient 1 inside the
    grid's range and 0 where the weight is clipped.
    """
    qmin, qmax = qrange(bits)
    zero = _zero_points(scale.numel(), torch.int32, scale.device)
    return torch.fake_quantize_per_channel_affine(w, scale.detach(), zero, 0, qmin, qmax)


class _LearnedStepQuant(torch.autograd.Function):
    """Q(w, b) with a learned log-step (LSQ): one autograd node, a handful of fused tensor ops.

    torch's `_fake_quantize_learnable_per_channel_affine` also differentiates the zero point,
    which symmetric weights never use, and costs two to three times as much per step; this
    node computes only the two gradients LSQ needs. The step enters as its log, so it stays
    positive and any optimiser moves it by relative amounts.
    """

    @staticmethod
    def forward(ctx, w, log_step, qmin, qmax):  # type: ignore[override]
        shape = (-1,) + (1,) * (w.dim() - 1)
        step = log_step.exp().reshape(shape)
        t = w / step
        q = torch.round(t)
        qc = torch.clamp(q, qmin, qmax)
        inside = qc == q
        # d(s * q)/ds per element: q - w/s where rounding is straight-through, q where clipped.
        ds = torch.where(inside, qc - t, qc)
        ctx.save_for_backward(inside, ds, step)
        return qc.mul_(step)

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        inside, ds, step = ctx.saved_tensors
        grad_w = grad * inside
        per_channel = (grad * ds).reshape(grad.shape[0], -1).sum(dim=1)
        grad_log_step = per_channel.mul_(step.reshape(-1))
        return grad_w, grad_log_step, None, None


def fake_quant_weight_learned(w: torch.Tensor, log_step: torch.Tensor, bits: int) -> torch.Tensor:
    """Q(w, b) per output channel with a learnable step given as its natural log (LSQ).

    The weight gradient is the clipped STE; the step gradient is LSQ's (Esser et al., 2020).
    """
    qmin, qmax = qrange(bits)
    return _LearnedStepQuant.apply(w, log_step, qmin, qmax)


def pseudo_quant_noise(w: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """APQN (paper 003 Eq. 8): w + U[-s/2, s/2], the noise a b-bit rounding would add."""
    shape = (-1,) + (1,) * (w.dim() - 1)
    noise = (torch.rand_like(w) - 0.5) * scale.detach().reshape(shape)
    return w + noise


def quantize_to_int(w: torch.Tensor, scale: torch.Tensor, bits: int) -> torch.Tensor:
    """The integers behind Q(w, b), for export: round(w / s) clipped to the b-bit range."""
    qmin, qmax = qrange(bits)
    shape = (-1,) + (1,) * (w.dim() - 1)
    q = torch.round(w.detach() / scale.detach().reshape(shape)).clamp_(qmin, qmax)
    return q.to(torch.int8)
