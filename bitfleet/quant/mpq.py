"""FedMPQ's client side (paper 002): bit planes, their group Lasso, and the bit budget.

A layer at b bits holds integers q = clip(round(w / s), -2^(b-1), 2^(b-1) - 1)
(docs/quantizer.md, the one quantizer). FedMPQ looks at the binary representation of those integers:
when the most significant bit plane of a layer is (nearly) all zero, the layer can drop a bit
at little cost. Local training adds a group Lasso over the planes, `R_GL(B) = sum_i ||B_i||_2`,
which drives whole planes to zero; the server reads the planes' sparsity to decide which
layers lose bits (coordinator/mpq.py).

Planes are magnitude planes of |q|, MSB first: the sign is not a plane a layer can drop, so
a b-bit layer has b - 1 planes. The one integer outside the symmetric range, -2^(b-1), counts
as the largest magnitude 2^(b-1) - 1: it needs the MSB plane just as much (it does not fit
in b - 1 bits).
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
from torch import nn

from .fake_quant import FLOAT_BITS, check_bits, qrange, quantize_to_int
from .modules import BitMap, QuantModule, _resolve_bits, quant_layers


def _magnitudes(layer: QuantModule, bits: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(u, hard planes, slopes): u = |w| / s with its gradient, the planes of |q| as booleans
    [planes, *weight.shape] MSB first, and each plane's straight-through slope (see bit_planes).
    """
    if check_bits(bits) == FLOAT_BITS:
        raise ValueError("a float (32-bit) layer has no integer bit planes")
    w = layer.weight
    _, qmax = qrange(bits)
    # The step is a constant here: letting the Lasso grow it would empty the planes by
    # coarsening the grid instead of by moving weights.
    step = layer.step(bits).detach().reshape((-1,) + (1,) * (w.dim() - 1))
    mag = quantize_to_int(w, step.flatten(), bits).to(torch.int32).abs_().clamp_(max=qmax)
    positions = torch.arange(bits - 2, -1, -1, device=w.device, dtype=torch.int32)
    expand = (-1,) + (1,) * w.dim()
    hard = ((mag.unsqueeze(0) >> positions.reshape(expand)) & 1).bool()
    slopes = (2.0 ** positions.to(w.dtype) / qmax).reshape(expand)
    return w.abs() / step, hard, slopes


def bit_planes(layer: QuantModule, bits: int) -> torch.Tensor:
    """The layer's integer weights at `bits` as b - 1 magnitude bit planes, MSB first.

    Returns a float tensor [bits - 1, *weight.shape] of 0s and 1s (the planes of |q|, q from
    the layer's current step at `bits`: frozen, learned or calibrated). A bit is a step
    function of the weight, so its true gradient is zero; FedMPQ trains through it with a
    straight-through estimator. The relaxation used here: with u = |w| / s the continuous
    magnitude on the grid (u = sum_i 2^i B_i once rounded), plane i passes the gradient
    d B_i / d u = 2^i / qmax, each plane's share of the magnitude it encodes. This is the
    weight-space image of BSQ/FedMPQ updating the planes themselves: moving plane i by
    delta moves the weight by 2^i * s * delta, so the Lasso's pull on the MSB reaches the
    weight 2^(b-2) times harder than its pull on the LSB. The gradient of `sum_i ||B_i||`
    on w is therefore sign(w) times a positive amount wherever a bit is set, largest for
    weights holding an MSB in a sparse MSB plane: descent shrinks exactly the weights that
    keep that plane occupied, and leaves zero bits alone. Plain STE (slope 1 on every plane)
    pulls on every set bit alike, an L1-like shrinkage that empties the low planes too (small
    weights collapse to zero): in a LeNet-5 check it changed the LSB plane more for the same
    gain in MSB sparsity. The 1 / qmax makes the slope per unit of the channel's range, so one Lasso
    strength means the same at every bit-width. Clipped weights (|w| / s > qmax) keep their
    gradient: they hold the MSB too.
    """
    u, hard, slopes = _magnitudes(layer, bits)
    return hard.to(u.dtype) + slopes * (u - u.detach()).unsqueeze(0)


def group_lasso(model: nn.Module, layer_bits: BitMap) -> torch.Tensor:
    """Sum over layers of `sum_i ||B_i||_2 / sqrt(n)`, the group Lasso of FedMPQ per layer.

    `layer_bits` is one width for every quantized layer or a map {layer: bits} (layers it
    leaves out, or maps to 32, are float and contribute nothing). Dividing by sqrt(n), n the
    layer's weight count, turns each plane's norm into the square root of its occupancy, in
    [0, 1], so one strength suits a 150-weight convolution and a 48k-weight linear layer
    alike.

    The value and gradient are those of `bit_planes` through `||.||_2`, computed without
    materialising the float planes and their autograd copies (b - 1 tensors the size of the
    weight each, which an edge board cannot spare for ResNet-sized layers): the gradient of
    ||B_i|| is B_i / ||B_i||, so the whole term is its value plus the linear correction
    sum_j c_j (u_j - detach(u_j)), c_j = sum_i slope_i * B_ij / ||B_i||. An empty plane adds
    nothing (the subgradient 0 at the Lasso's minimum).
    """
    layers = quant_layers(model)
    terms = []
    for name, bits in _resolve_bits(layers, layer_bits).items():
        if bits == FLOAT_BITS:
            continue
        u, hard, slopes = _magnitudes(layers[name], bits)
        norms = hard.flatten(1).sum(dim=1).to(u.dtype).sqrt()
        per_plane = torch.where(norms > 0, slopes.flatten() / norms.clamp_min(1.0), 0.0)
        coeff = (hard.to(u.dtype) * per_plane.reshape(slopes.shape)).sum(dim=0)
        linear = (coeff * (u - u.detach())).sum()
        terms.append((norms.sum() + linear) / math.sqrt(u.numel()))
    if not terms:
        return torch.zeros(())
    return torch.stack(terms).sum()


@torch.no_grad()
def plane_sparsity(model: nn.Module, layer_bits: BitMap) -> dict[str, list[float]]:
    """Share of zeros in each magnitude plane of each quantized layer, MSB first.

    What a client reports after local training: a layer whose MSB plane is all (or nearly
    all) zero loses nothing when it drops a bit, so the server prunes it first. Float layers
    (32 bits, or left out of `layer_bits`) are not listed.
    """
    layers = quant_layers(model)
    out: dict[str, list[float]] = {}
    for name, bits in _resolve_bits(layers, layer_bits).items():
        if bits != FLOAT_BITS:
            _, hard, _ = _magnitudes(layers[name], bits)
            out[name] = (1.0 - hard.flatten(1).float().mean(dim=1)).tolist()
    return out


def layer_sizes(model: nn.Module) -> dict[str, int]:
    """Weight count of each Conv2d/Linear (quantized or not: the names are the same).

    Only weights count: biases stay float and are not part of a bit budget.
    """
    sizes = {
        name: m.weight.numel()
        for name, m in model.named_modules()
        if isinstance(m, nn.Conv2d | nn.Linear)
    }
    if not sizes:
        raise ValueError("model has no Conv2d or Linear layer")
    return sizes


def budget_bits(layer_bits: Mapping[str, int], sizes: Mapping[str, int]) -> float:
    """Average bit-width of a per-layer assignment, weighted by each layer's weight count.

    A board's budget comes from what its weights occupy in storage and memory, so the
    budget is in bits per weight: sum_l n_l b_l / sum_l n_l. An unweighted mean over layers
    would let a model keep its largest layer at 8 bits and "pay" for it with a tiny one.
    A layer left float counts as 32 bits. `layer_bits` must name exactly the layers in
    `sizes`.
    """
    missing = sorted(set(sizes) - set(layer_bits))
    extra = sorted(set(layer_bits) - set(sizes))
    if missing or extra:
        raise ValueError(
            f"layer_bits and sizes name different layers: missing {missing}, extra {extra}"
        )
    total = sum(sizes.values())
    if total <= 0:
        raise ValueError("sizes must hold at least one weight")
    return sum(sizes[n] * check_bits(b) for n, b in layer_bits.items()) / total
