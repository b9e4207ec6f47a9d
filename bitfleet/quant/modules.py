"""Quantization-aware Conv2d/Linear and the module swap that makes any model use them.

The swapped modules share their float Parameters with the original layers, so state dicts,
optimisers and FedAvg see the same float master weights (docs/quantizer.md); quantization is
a property of the forward pass at the module's current bit-width.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from copy import deepcopy

import torch
import torch.nn.functional as F
from torch import nn

from .activation import ActivationQuantizer, check_act_bits, check_act_calibrator
from .fake_quant import (
    FLOAT_BITS,
    check_bits,
    fake_quant_weight,
    fake_quant_weight_learned,
    pseudo_quant_noise,
    rescale_step,
)
from .scales import SCALE_METHODS, weight_scale

BitMap = int | Mapping[str, int]


def _check_scale_method(name: str) -> str:
    if name not in SCALE_METHODS:
        raise ValueError(f"unknown scale method {name!r}; known: {sorted(SCALE_METHODS)}")
    return name


class QuantWeightMixin:
    """What QuantConv2d and QuantLinear share: bit-width, scale method, learned steps.

    `mode` is "quant" (Q(w, b) with STE) or "noise" (APQN's w + U[-s/2, s/2]).

    A step comes from one of three places, first match wins:
    - learned (LSQ): `log_steps`, keyed by bit-width, trained with the weights and shared
      through FedAvg; the log keeps them positive and lets any optimiser move them by
      relative amounts. A bit-width without its own borrows the nearest one through Eq. 11;
    - frozen: calibrated once (at the start of a round) and fixed while the local steps run,
      paper 003's "estimated before the start of training and kept fixed", at no cost per step;
    - calibrated: by `scale_method` from the current weights, recomputed when they change.
    """

    weight: nn.Parameter
    bits: int
    scale_method: str
    mode: str
    log_steps: nn.ParameterDict
    input_quant: ActivationQuantizer | None

    def _init_quant(self, bits: int, scale_method: str) -> None:
        self.bits = check_bits(bits)
        self.scale_method = _check_scale_method(scale_method)
        self.mode = "quant"
        self.log_steps = nn.ParameterDict()
        self.input_quant = None
        self.frozen_steps: dict[int, torch.Tensor] = {}
        self._scale_cache: tuple[tuple, torch.Tensor] | None = None

    def init_steps(self, bit_set: Iterable[int], method: str | None = None) -> None:
        """Create (or reset) learned steps for each bit-width, initialised by `method`."""
        for b in bit_set:
            if check_bits(b) == FLOAT_BITS:
                continue
            s = weight_scale(self.weight, b, method or self.scale_method)
            self.log_steps[str(b)] = nn.Parameter(s.log())

    def freeze_steps(self, bit_set: Iterable[int]) -> None:
        """Calibrate steps for `bit_set` now and keep them until `unfreeze_steps`."""
        for b in bit_set:
            if check_bits(b) != FLOAT_BITS:
                self.frozen_steps[b] = weight_scale(self.weight, b, self.scale_method)

    def unfreeze_steps(self) -> None:
        self.frozen_steps.clear()

    def _learned_source(self, bits: int) -> int | None:
        """The learned bit-width whose step serves `bits`: itself, else the nearest one."""
        if not len(self.log_steps):
            return None
        return min((int(k) for k in self.log_steps), key=lambda k: (abs(k - bits), -k))

    def step(self, bits: int | None = None) -> torch.Tensor:
        """The per-channel step used at `bits`: learned, frozen, or calibrated (see class)."""
        bits = self.bits if bits is None else check_bits(bits)
        if bits == FLOAT_BITS:
            raise ValueError("no quantization step at 32 bits (float)")
        src = self._learned_source(bits)
        if src is not None:
            return rescale_step(self.log_steps[str(src)].exp(), src, bits)
        if bits in self.frozen_steps:
            return self.frozen_steps[bits]
        # Calibrated step: recomputed only when the weights change (the optimiser's in-place
        # update bumps the tensor version), so evaluation does one MSE search, not one a batch.
        tag = (self.weight._version, self.weight.data_ptr(), bits, self.scale_method)
        if self._scale_cache is None or self._scale_cache[0] != tag:
            self._scale_cache = (tag, weight_scale(self.weight, bits, self.scale_method))
        return self._scale_cache[1]

    def quantized_weight(self) -> torch.Tensor:
        if self.bits == FLOAT_BITS:
            return self.weight
        if self.mode == "noise":
            return pseudo_quant_noise(self.weight, self.step()) if self.training else self.weight
        src = self._learned_source(self.bits)
        if src == self.bits:
            return fake_quant_weight_learned(self.weight, self.log_steps[str(src)], self.bits)
        return fake_quant_weight(self.weight, self.step(), self.bits)

    def _quant_input(self, x: torch.Tensor) -> torch.Tensor:
        return x if self.input_quant is None else self.input_quant(x)

    def extra_repr(self) -> str:  # noqa: D102 - shown by print(model)
        base = super().extra_repr()  # type: ignore[misc]
        return f"{base}, bits={self.bits}, scale={self.scale_method}, mode={self.mode}"


class QuantConv2d(QuantWeightMixin, nn.Conv2d):
    """nn.Conv2d whose weight passes through Q(w, b) (and whose input optionally through A)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(self._quant_input(x), self.quantized_weight(), self.bias)


class QuantLinear(QuantWeightMixin, nn.Linear):
    """nn.Linear whose weight passes through Q(w, b) (and whose input optionally through A)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(self._quant_input(x), self.quantized_weight(), self.bias)


QuantModule = QuantConv2d | QuantLinear


def _same_shape(layer: nn.Conv2d | nn.Linear, conv: type, linear: type) -> nn.Module:
    """An empty (meta) layer of class `conv` or `linear` configured exactly like `layer`."""
    if isinstance(layer, nn.Conv2d):
        return conv(
            layer.in_channels,
            layer.out_channels,
            layer.kernel_size,
            stride=layer.stride,
            padding=layer.padding,
            dilation=layer.dilation,
            groups=layer.groups,
            bias=layer.bias is not None,
            padding_mode=layer.padding_mode,
            device="meta",
        )
    return linear(layer.in_features, layer.out_features, bias=layer.bias is not None, device="meta")


def _swap(layer: nn.Module, bits: int, scale_method: str) -> QuantModule:
    q: QuantModule = _same_shape(layer, QuantConv2d, QuantLinear)  # type: ignore[assignment]
    q.weight = layer.weight
    q.bias = layer.bias
    q.train(layer.training)
    q._init_quant(bits, scale_method)
    return q


def quant_layers(model: nn.Module) -> dict[str, QuantModule]:
    """The model's quantization-aware layers by qualified name, in definition order."""
    return {n: m for n, m in model.named_modules() if isinstance(m, QuantConv2d | QuantLinear)}


def _resolve_bits(names: Iterable[str], bits: BitMap) -> dict[str, int]:
    names = list(names)
    if not isinstance(bits, Mapping):
        return {n: check_bits(bits) for n in names}
    unknown = sorted(set(bits) - set(names))
    if unknown:
        raise KeyError(f"bit map names layers the model does not have: {unknown}; layers: {names}")
    return {n: check_bits(bits.get(n, FLOAT_BITS)) for n in names}


def quantize_model(
    model: nn.Module,
    bits: BitMap = 8,
    *,
    scale_method: str = "max",
    learn_step: bool = False,
    act_bits: int | None = None,
) -> nn.Module:
    """Make `model` quantization-aware in place by swapping every Conv2d/Linear.

    `bits` is one bit-width for all layers or a map from layer name to bits (layers it does
    not name stay float, 32). With `learn_step` each layer gets an LSQ step for its bits,
    initialised by `scale_method`. `act_bits` adds per-tensor input fake-quant, which needs
    `calibrate_activations` before use. Returns the same model for chaining.
    """
    targets = [
        (n, m)
        for n, m in model.named_modules()
        if isinstance(m, nn.Conv2d | nn.Linear) and not isinstance(m, QuantConv2d | QuantLinear)
    ]
    if not targets and not quant_layers(model):
        raise ValueError("model has no Conv2d or Linear layer to quantize")
    per_layer = _resolve_bits([n for n, _ in targets], bits)
    for name, layer in targets:
        q = _swap(layer, per_layer[name], scale_method)
        if learn_step and q.bits != FLOAT_BITS:
            q.init_steps([q.bits])
        if act_bits is not None:
            q.input_quant = ActivationQuantizer(act_bits)
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, q)
    return model


def set_bits(model: nn.Module, bits: BitMap) -> None:
    """Move a quantization-aware model to other bit-widths (MQAT, evaluation per bit-width)."""
    layers = quant_layers(model)
    if not layers:
        raise ValueError("model is not quantization-aware; call quantize_model first")
    for name, b in _resolve_bits(layers, bits).items():
        layers[name].bits = b


def freeze_steps(model: nn.Module, bit_set: Iterable[int]) -> None:
    """Fix every layer's calibrated step for each bit-width in `bit_set` (QAT's frozen mode)."""
    bit_set = list(bit_set)
    for layer in quant_layers(model).values():
        layer.freeze_steps(bit_set)


def unfreeze_steps(model: nn.Module) -> None:
    """Return to steps calibrated from the current weights (before deploying)."""
    for layer in quant_layers(model).values():
        layer.unfreeze_steps()


def set_scale_method(model: nn.Module, method: str) -> None:
    """Choose the calibrator for layers without learned steps (PTQ's max-abs vs MSE)."""
    _check_scale_method(method)
    for layer in quant_layers(model).values():
        layer.scale_method = method


def set_mode(model: nn.Module, mode: str) -> None:
    """Switch every layer (and its input quantizer) between "quant" (Q(w, b)) and "noise"
    (APQN)."""
    if mode not in ("quant", "noise"):
        raise ValueError(f"mode must be 'quant' or 'noise', got {mode!r}")
    for layer in quant_layers(model).values():
        layer.mode = mode
        if layer.input_quant is not None:
            layer.input_quant.mode = mode


def act_quantizers(model: nn.Module) -> dict[str, ActivationQuantizer]:
    """Each quantized layer's input quantizer, by the layer's name (layers without one left out)."""
    return {n: m.input_quant for n, m in quant_layers(model).items() if m.input_quant is not None}


def set_act_bits(
    model: nn.Module,
    act_bits: int | None,
    *,
    calibrator: str | None = None,
    skip_float: bool = False,
) -> None:
    """Quantize the input of every quantized layer at `act_bits` (None: float activations).

    Layers without an input quantizer get one (uncalibrated) when `act_bits` is set; with None
    no quantizer is created, so a model that never asked for activations is untouched.
    `calibrator` (a name of `ACT_CALIBRATORS`) replaces the quantizers' calibrator; a change
    forgets their calibration. `skip_float` leaves the input of 32-bit (float) layers float.
    A new width keeps the calibrated range: its grid is computed from the same observation.
    """
    check_act_bits(act_bits)
    if calibrator is not None:
        check_act_calibrator(calibrator)
    for layer in quant_layers(model).values():
        bits = None if skip_float and layer.bits == FLOAT_BITS else act_bits
        q = layer.input_quant
        if q is None:
            if bits is None:
                continue
            q = layer.input_quant = ActivationQuantizer(bits, calibrator=calibrator or "minmax")
            q.mode = layer.mode
        q.bits = bits
        if calibrator is not None and q.calibrator != calibrator:
            q.calibrator = calibrator
            q.reset()


def init_steps(model: nn.Module, bit_set: Iterable[int], method: str = "mse") -> None:
    """Give every layer learned steps for each bit-width in `bit_set` (LSQ, MQAT)."""
    bit_set = list(bit_set)
    for layer in quant_layers(model).values():
        layer.init_steps(bit_set, method)


@torch.no_grad()
def calibrate_activations(model: nn.Module, batches: Iterable[torch.Tensor]) -> None:
    """Observe activation ranges on a few batches so input fake-quant can run.

    Each call starts a fresh calibration (the previous ranges are forgotten). Batches are model
    inputs: [0, 1] float pixels or uint8 images (scaled by 1/255, as training feeds them). The
    model runs in evaluation mode, so BatchNorm's running statistics do not move.
    """
    quantizers = [m for m in model.modules() if isinstance(m, ActivationQuantizer)]
    was_training = model.training
    model.eval()
    for q in quantizers:
        q.calibrating = True
    try:
        for x in batches:
            model(x if x.is_floating_point() else x.to(torch.float32).div_(255.0))
    finally:
        for q in quantizers:
            q.calibrating = False
        model.train(was_training)


@torch.no_grad()
def dequantized_copy(model: nn.Module) -> nn.Module:
    """A plain float copy whose Conv2d/Linear weights are Q(w, b) at each layer's bits.

    What an exporter or an evaluator without fake-quant ops needs: the same numbers the
    quantization-aware model computes, in ordinary modules.
    """
    copy = deepcopy(model).eval()
    for name, layer in quant_layers(copy).items():
        plain = _same_shape(layer, nn.Conv2d, nn.Linear)
        plain.weight = nn.Parameter(layer.quantized_weight().detach().clone())
        if layer.bias is not None:
            plain.bias = nn.Parameter(layer.bias.detach().clone())
        parent_name, _, child = name.rpartition(".")
        setattr(copy.get_submodule(parent_name) if parent_name else copy, child, plain.eval())
    return copy
