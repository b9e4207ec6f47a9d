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
def prepare_for_export(model: nn.Module) -> tuple[nn.Module, dict[str, LayerQuant]]:
    """A float copy to trace (BatchNorm folded, weights = Q(w)) and the per-layer integers."""
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
    plain = dequantized_copy(model)
    _fold_batchnorm(plain, layers)
    return plain, layers


def _fold_batchnorm(plain: nn.Module, layers: dict[str, LayerQuant]) -> None:
    try:
        traced = torch.fx.symbolic_trace(plain)
    except Exception as exc:  # an untraceable model keeps its BatchNorm; still correct, slower
        log.warning("BatchNorm not folded (%s): model is not traceable by torch.fx", exc)
        return
    modules = dict(plain.named_modules())
    for node in traced.graph.nodes:
        if node.op != "call_module" or not isinstance(modules.get(node.target), nn.BatchNorm2d):
            continue
        src = node.args[0]
        if not (
            isinstance(src, torch.fx.Node)
            and src.op == "call_module"
            and isinstance(modules.get(src.target), nn.Conv2d)
            and len(src.users) == 1
        ):
            continue
        conv, bn = modules[src.target], modules[node.target]
        gain = bn.weight / torch.sqrt(bn.running_var + bn.eps)
        bias = conv.bias if conv.bias is not None else torch.zeros_like(bn.running_mean)
        conv.weight.mul_(gain.reshape(-1, 1, 1, 1))
        conv.bias = nn.Parameter((bias - bn.running_mean) * gain + bn.bias)
        if src.target in layers:
            layers[src.target].scale = layers[src.target].scale * gain
        parent, _, child = node.target.rpartition(".")
        setattr(plain.get_submodule(parent) if parent else plain, child, nn.Identity())
