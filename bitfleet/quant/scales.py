"""Weight scale calibrators: a registry of interchangeable methods, as in onnxruntime.

Each method maps a weight tensor and a bit-width to one step per output channel, so that
Q(w, b) = s * clip(round(w / s), qmin, qmax) covers the channel the way the method prefers.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from .fake_quant import qrange

ScaleFn = Callable[[torch.Tensor, int], torch.Tensor]

_EPS = 1e-12
MSE_GRID = 100
"""Candidate clipping ratios in the MSE search; 1% resolution is below any accuracy effect."""
PERCENTILE = 99.99


def _per_channel(w: torch.Tensor) -> torch.Tensor:
    return w.detach().reshape(w.shape[0], -1).to(torch.float32)


def max_abs_scale(w: torch.Tensor, bits: int) -> torch.Tensor:
    """Step that puts the channel's largest |w| on the top level: no clipping at all."""
    _, qmax = qrange(bits)
    return (_per_channel(w).abs().amax(dim=1) / qmax).clamp_min(_EPS)


def mse_scale(w: torch.Tensor, bits: int, grid: int = MSE_GRID) -> torch.Tensor:
    """Step whose clipping ratio (of max |w|) minimises the channel's squared rounding error.

    At low bit-widths clipping a few outliers buys a finer grid for the bulk of the weights;
    the search is a batched tensor computation over candidate ratios, chunked to bound memory.
    """
    qmin, qmax = qrange(bits)
    flat = _per_channel(w)
    base = flat.abs().amax(dim=1).clamp_min(_EPS) / qmax
    ratios = torch.linspace(1.0 / grid, 1.0, grid, device=flat.device)
    chunk = max(1, (1 << 24) // max(1, flat.numel()))
    best_err = torch.full_like(base, float("inf"))
    best = base.clone()
    for start in range(0, grid, chunk):
        cand = ratios[start : start + chunk, None] * base[None, :]  # [g, C]
        s = cand[:, :, None]
        err = ((torch.clamp(torch.round(flat[None] / s), qmin, qmax) * s - flat[None]) ** 2).sum(-1)
        err_min, idx = err.min(dim=0)
        better = err_min < best_err
        best_err = torch.where(better, err_min, best_err)
        best = torch.where(better, cand.gather(0, idx[None]).squeeze(0), best)
    return best


def percentile_scale(w: torch.Tensor, bits: int, percentile: float = PERCENTILE) -> torch.Tensor:
    """Step that clips the top (100 - p)% of |w| per channel, robust to a single outlier."""
    _, qmax = qrange(bits)
    clip = torch.quantile(_per_channel(w).abs(), percentile / 100.0, dim=1)
    return (clip / qmax).clamp_min(_EPS)


SCALE_METHODS: dict[str, ScaleFn] = {
    "max": max_abs_scale,
    "mse": mse_scale,
    "percentile": percentile_scale,
}


def weight_scale(w: torch.Tensor, bits: int, method: str = "max") -> torch.Tensor:
    """Per-output-channel step by the named method; an unknown name lists the known ones."""
    try:
        fn = SCALE_METHODS[method]
    except KeyError:
        known = ", ".join(sorted(SCALE_METHODS))
        raise ValueError(f"unknown scale method {method!r}; known: {known}") from None
    return fn(w, bits)
