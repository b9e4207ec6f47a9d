"""From a quantization-aware model to what the ONNX graph holds: a float skeleton plus, per
layer, the integers and per-channel scales of docs/quantizer.md.

BatchNorm after a convolution is folded into it here. With per-output-channel weight scales the
fold only rescales each channel's step (s_c * gamma_c / sqrt(var_c + eps)), so the integers are
exactly the ones the quantizer produced in training, and integer kernels see one Conv, not
Conv + BatchNorm.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch import nn

from bitfleet.quant import FLOAT_BITS, dequantized_copy, quant_layers, quantize_to_int

log = logging.getLogger(__name__)


@dataclass
class LayerQuant:
    """One layer's weights as stored: `ints` (int8 values on the b-bit grid) times `scale`."""

    name: str
    bits: int
    ints: torch.Tensor
    scale: torch.Tensor
    in_channels: int
    kernel_elems: int


@dataclass(frozen=True)
class ActGrid:
    """The per-tensor grid a layer's input is fake-quantized on in PyTorch (the model's own
    `ActivationQuantizer`): q = clip(round(x / scale) + zero_point, qmin, qmax)."""

    bits: int
    scale: float
    zero_point: int
    qmin: int
    qmax: int
    calibrator: str

    @property
    def signed(self) -> bool:
        return self.qmin < 0

    def key(self) -> tuple[float, int, int, int]:
        return (self.scale, self.zero_point, self.qmin, self.qmax)


def activation_grids(model: nn.Module) -> dict[str, ActGrid]:
    """The input grid of every quantized layer whose activations a `deploy(..., act_bits)`
    quantizes, by layer name; empty for a model with float activations."""
    grids: dict[str, ActGrid] = {}
    for name, layer in quant_layers(model).items():
        q = layer.input_quant
        if layer.bits == FLOAT_BITS or q is None or q.bits is None:
            continue
        if not q.calibrated:
            raise ValueError(f"layer {name!r}: activation quantizer is not calibrated")
        scale, zero_point, qmin, qmax = q.qparams()
        grids[name] = ActGrid(q.bits, scale, zero_point, qmin, qmax, q.calibrator)
    return grids


@torch.no_grad()
def prepare_for_export(
    model: nn.Module, input_shape: tuple[int, int, int]
) -> tuple[nn.Module, dict[str, LayerQuant]]:
    """A float copy to trace (BatchNorm folded, weights = Q(w)) and the per-layer integers.
    `input_shape` (C, H, W) is what one probe pass through the copy needs to find the
    Conv -> BatchNorm pairs."""
    model = model.eval()
    layers: dict[str, LayerQuant] = {}
    for name, layer in quant_layers(model).items():
        if layer.bits == FLOAT_BITS:
            continue
        step = layer.step().detach().to(torch.float32)
        w = layer.weight
        layers[name] = LayerQuant(
            name=name,
            bits=layer.bits,
            ints=quantize_to_int(w, step, layer.bits),
            scale=step.clone(),
            in_channels=w.shape[1] * (layer.groups if isinstance(layer, nn.Conv2d) else 1),
            kernel_elems=int(w[0].numel()),
        )
    plain = dequantized_copy(model).eval()
    _fold_batchnorm(plain, layers, input_shape)
    return plain, layers


def _probe(plain: nn.Module, input_shape: tuple[int, int, int]) -> torch.Tensor:
    """Two inputs from a private generator: the caller's random stream stays untouched."""
    gen = torch.Generator().manual_seed(0)
    return torch.rand(2, *input_shape, generator=gen)


def _conv_bn_pairs(plain: nn.Module, x: torch.Tensor) -> list[tuple[str, str]]:
    """(conv, batchnorm) names where the BatchNorm's input is the convolution's output and no
    other module reads it, seen through per-instance forward hooks on one pass.

    Hooks, not torch.fx: `symbolic_trace` patches `nn.Module.__call__` process-wide while it
    traces, which breaks every other thread running a model at that moment (agents train in
    threads beside exports in the tests and the simulator)."""
    names = {id(m): n for n, m in plain.named_modules()}
    kept: list[torch.Tensor] = []  # keeps outputs alive so their ids are not reused
    produced: dict[int, str] = {}
    readers: dict[int, list[str]] = {}
    fed: list[tuple[int, str]] = []

    def hook(mod: nn.Module, args: tuple, out: object) -> None:
        name = names[id(mod)]
        for a in args:
            if isinstance(a, torch.Tensor):
                readers.setdefault(id(a), []).append(name)
        if isinstance(mod, nn.BatchNorm2d) and args and isinstance(args[0], torch.Tensor):
            fed.append((id(args[0]), name))
        if isinstance(mod, nn.Conv2d) and isinstance(out, torch.Tensor):
            kept.append(out)
            produced[id(out)] = name

    leaves = [m for m in plain.modules() if not list(m.children())]
    handles = [m.register_forward_hook(hook) for m in leaves]
    try:
        plain(x)
    finally:
        for h in handles:
            h.remove()
    return [(produced[tid], bn) for tid, bn in fed if tid in produced and readers.get(tid) == [bn]]


def _fold_batchnorm(
    plain: nn.Module, layers: dict[str, LayerQuant], input_shape: tuple[int, int, int]
) -> None:
    """Fold each pair, then check the copy still computes what it did: a convolution whose
    output a functional op also reads (invisible to hooks) is left unfolded."""
    x = _probe(plain, input_shape)
    try:
        pairs = _conv_bn_pairs(plain, x)
    except Exception as exc:  # a model that fails the probe keeps its BatchNorm; still correct
        log.warning("BatchNorm not folded (%s): the probe pass failed", exc)
        return
    before = plain(x)
    for conv_name, bn_name in pairs:
        conv = plain.get_submodule(conv_name)
        saved = (conv.weight.detach().clone(), conv.bias)
        bn = _fold_pair(plain, conv_name, bn_name)
        if not _same(plain(x), before):
            conv.weight.copy_(saved[0])
            conv.bias = saved[1]
            _set_submodule(plain, bn_name, bn)
            log.warning("BatchNorm %s not folded: %s has another reader", bn_name, conv_name)
            continue
        if conv_name in layers:
            layers[conv_name].scale = layers[conv_name].scale * _gain(bn)


def _gain(bn: nn.BatchNorm2d) -> torch.Tensor:
    return bn.weight / torch.sqrt(bn.running_var + bn.eps)


def _fold_pair(plain: nn.Module, conv_name: str, bn_name: str) -> nn.BatchNorm2d:
    """Fold BatchNorm `bn_name` into convolution `conv_name` in place; returns the BatchNorm."""
    conv, bn = plain.get_submodule(conv_name), plain.get_submodule(bn_name)
    gain = _gain(bn)
    bias = conv.bias if conv.bias is not None else torch.zeros_like(bn.running_mean)
    conv.weight.mul_(gain.reshape(-1, 1, 1, 1))
    conv.bias = nn.Parameter((bias - bn.running_mean) * gain + bn.bias)
    _set_submodule(plain, bn_name, nn.Identity())
    return bn


def _set_submodule(root: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, child, module)


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal up to float rounding: a fold reorders a few multiplications, nothing more."""
    return bool(torch.allclose(a, b, rtol=1e-3, atol=1e-4 * (float(b.abs().max()) + 1e-6)))
