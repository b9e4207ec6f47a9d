"""Local training methods (docs/quantizer.md, paper 003): one small class per method.

A method decides how a device's copy of the model is trained and how it is turned into a
b-bit model afterwards. The training loop only calls these hooks, so every method runs
through the same loop on the board, in the simulator and in the benchmarks.
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from .activation import ActivationQuantizer, check_act_bits, check_act_calibrator
from .fake_quant import FLOAT_BITS, SUPPORTED_BITS, check_bits
from .modules import (
    BitMap,
    _resolve_bits,
    act_quantizers,
    calibrate_activations,
    freeze_steps,
    init_steps,
    quant_layers,
    quantize_model,
    set_act_bits,
    set_bits,
    set_mode,
    set_scale_method,
    unfreeze_steps,
)
from .mpq import group_lasso

CALIB_BATCH = 256
"""Deploy-time activation calibration runs `calib` this many images at a time."""

STEP_MODES = ("frozen", "learned", "dynamic")
"""How QAT gets its step: fixed per round, learned (LSQ), or recalibrated every step."""


def _check_step_mode(mode: str) -> str:
    if mode not in STEP_MODES:
        raise ValueError(f"unknown step mode {mode!r}; known: {list(STEP_MODES)}")
    return mode


@dataclass
class LocalMethod:
    """Train in float; quantize with calibrated per-channel scales when deployed (`fp`).

    `scale_method` is the calibrator used wherever no learned step exists. `act_bits` is the
    activation width (None: float activations, the default everywhere): methods that quantize
    in training (QAT, APQN, MPQ) fake-quantize every quantized layer's input at it, KURE
    regularises those inputs' kurtosis, and `fp`/`ptq` train in float and quantize the
    activations only when deployed. `act_calibrator` (`ACT_CALIBRATORS`: "mse", "minmax",
    "percentile") sets the activation ranges, on the first `act_calib_batches` batches of each
    local round and on the calibration data given to `deploy`.
    """

    scale_method: str = "mse"
    act_bits: int | None = None
    act_calibrator: str = "mse"
    act_calib_batches: int = 4
    name = "fp"
    quant_in_forward = False
    """Whether its training step runs the fake quantizer, and so costs a QAT step."""

    def training_act_bits(self) -> int | None:
        """The activation width training fake-quantizes at (None: float in training)."""
        return None

    def prepare(self, model: nn.Module) -> nn.Module:
        """Make the model quantization-aware once, before the first local step."""
        check_act_bits(self.act_bits)
        check_act_calibrator(self.act_calibrator)
        if not quant_layers(model):
            quantize_model(model, FLOAT_BITS, scale_method=self.scale_method)
        set_act_bits(model, self.training_act_bits(), calibrator=self.act_calibrator)
        for q in act_quantizers(model).values():
            q.auto_calibrate = True
        return model

    def begin_round(self, model: nn.Module, rng: random.Random) -> None:
        """Called once per federated round (or per epoch in centralised training)."""

    def calibrate(self, model: nn.Module, batches: Iterable[torch.Tensor]) -> None:
        """Calibrate the activation ranges training uses, on a few batches of the device's own
        data; the training loop calls it after `begin_round`, before the first step, and the
        ranges stay fixed for the round. A no-op when training keeps activations float."""
        if self.training_act_bits() is not None:
            calibrate_activations(model, batches)

    def before_step(self, model: nn.Module, rng: random.Random) -> None:
        """Called before every optimiser step."""

    def regularizer(self, model: nn.Module) -> torch.Tensor | None:
        """Extra loss term added to the task loss, or None."""
        return None

    def deploy(
        self,
        model: nn.Module,
        bits: BitMap,
        act_bits: int | None = None,
        calib: torch.Tensor | None = None,
    ) -> nn.Module:
        """Put the trained model in the state that is evaluated and exported at `bits`.

        `bits` is one width for every layer or a map {layer: bits} (FedMPQ's per-layer
        widths; layers it leaves out stay float), as `set_bits` takes it. Steps frozen or
        learned in training stay: they are the grid the weights were trained onto. Other
        bit-widths are calibrated from the weights by `scale_method`.

        `act_bits` quantizes the input of every quantized (non-float) layer, per tensor
        (None: float activations, as before). The ranges are calibrated by `act_calibrator`
        on `calib` (model inputs: [0, 1] pixels or uint8 images) after the weights are at
        `bits`; without `calib`, ranges calibrated in training are kept, and a model that has
        none (one loaded from a state dict) is an error.
        """
        set_mode(model, "quant")
        set_scale_method(model, self.scale_method)
        set_bits(model, bits)
        for q in act_quantizers(model).values():
            q.recorded = None
        if act_bits is None:
            set_act_bits(model, None)
            return model
        set_act_bits(model, act_bits, calibrator=self.act_calibrator, skip_float=True)
        active = [q for q in act_quantizers(model).values() if q.bits is not None]
        if calib is not None:
            if len(calib) == 0:
                raise ValueError("calib is empty: activation ranges need calibration images")
            calibrate_activations(
                model, [calib[i : i + CALIB_BATCH] for i in range(0, len(calib), CALIB_BATCH)]
            )
        elif not all(q.calibrated for q in active):
            raise ValueError(
                f"deploying with {act_bits}-bit activations needs calibration images (calib): "
                "the model has no calibrated activation ranges"
            )
        return model


@dataclass
class PTQ(LocalMethod):
    """Post-training quantization: float training, scales calibrated at deploy time.

    Locally identical to `fp`; it is a separate name because the coordinator assigns it and
    accounts for its calibration cost, and because `fp` devices never deploy below float.
    As a baseline it is calibrated the strongest fair way the quantizer offers: MSE weight
    steps per channel and, with `act_bits`, MSE activation ranges per tensor
    (`act_calibrator="mse"`, a grid search of the clipping range), on the `calib` images
    given to `deploy`.
    """

    name = "ptq"


@dataclass
class QAT(LocalMethod):
    """Quantization-aware training at a fixed bit-width, straight-through estimator.

    `step` is "frozen" (calibrated by `scale_method` at each round start, then fixed: the
    cheapest per step), "learned" (LSQ, initialised by `scale_method`) or "dynamic"
    (recalibrated every step: affordable with max-abs, slow with MSE).
    """

    bits: int = 4
    step: str = "frozen"
    name = "qat"
    quant_in_forward = True

    def training_act_bits(self) -> int | None:
        return self.act_bits

    def prepare(self, model: nn.Module) -> nn.Module:
        check_bits(self.bits)
        _check_step_mode(self.step)
        super().prepare(model)
        set_scale_method(model, self.scale_method)
        if self.step == "learned":
            init_steps(model, [self.bits], self.scale_method)
        set_bits(model, self.bits)
        return model

    def begin_round(self, model: nn.Module, rng: random.Random) -> None:
        if self.step == "frozen":
            unfreeze_steps(model)
            freeze_steps(model, [self.bits])


@dataclass
class MQAT(LocalMethod):
    """Multi-bit QAT (paper 003, Algorithm 2): a bit-width drawn from `bit_set` per round.

    Steps per bit-width are frozen per round or learned (then shared through FedAvg), as in
    QAT. `resample="step"` draws per optimiser step, for centralised training in one "round".

    `act_bit_set` draws the activation width too, from the same rng, right after the weight
    width and independently of it: a device deploys at the (weights, activations) pair its
    board's storage and kernels decide, which are set independently, so every pair of the
    product should be trained, and independent draws cover it uniformly (a joint draw would
    train only the diagonal). Drawing after the weight width keeps the weight draws of a
    seed what they were without activations. Without `act_bit_set`, `act_bits` is one fixed
    activation width. The range is calibrated at the round start, at the drawn width; with
    `resample="step"` the grids of every width in `act_bit_set` come from that calibration.
    """

    bit_set: Sequence[int] = field(default_factory=lambda: (2, 3, 4, 6, 8))
    resample: str = "round"
    step: str = "frozen"
    act_bit_set: Sequence[int] | None = None
    name = "mqat"
    quant_in_forward = True

    def training_act_bits(self) -> int | None:
        if self.act_bit_set:
            return check_act_bits(list(self.act_bit_set)[0])
        return self.act_bits

    def calibrate(self, model: nn.Module, batches: Iterable[torch.Tensor]) -> None:
        super().calibrate(model, batches)
        if self.act_bit_set:
            for q in act_quantizers(model).values():
                q.prepare_widths(self.act_bit_set)

    def prepare(self, model: nn.Module) -> nn.Module:
        if self.resample not in ("round", "step"):
            raise ValueError(f"resample must be 'round' or 'step', got {self.resample!r}")
        if not self.bit_set:
            raise ValueError("MQAT needs a non-empty bit_set")
        _check_step_mode(self.step)
        for a in self.act_bit_set or ():
            check_act_bits(a)
        super().prepare(model)
        set_scale_method(model, self.scale_method)
        if self.step == "learned":
            init_steps(model, self.bit_set, self.scale_method)
        return model

    def _draw(self, model: nn.Module, rng: random.Random) -> None:
        set_bits(model, rng.choice(list(self.bit_set)))
        if self.act_bit_set:
            a = check_act_bits(rng.choice(list(self.act_bit_set)))
            for q in act_quantizers(model).values():
                q.bits = a

    def begin_round(self, model: nn.Module, rng: random.Random) -> None:
        if self.step == "frozen":
            unfreeze_steps(model)
            freeze_steps(model, self.bit_set)
        if self.resample == "round":
            self._draw(model, rng)

    def before_step(self, model: nn.Module, rng: random.Random) -> None:
        if self.resample == "step":
            self._draw(model, rng)


@dataclass
class APQN(LocalMethod):
    """Additive pseudo-quantization noise U[-s/2, s/2] at `bits` (paper 003, Eq. 8).

    With `act_bits`, every quantized layer's input gets the same treatment in training:
    clip(x) + U[-s/2, s/2], s the per-tensor step of the range calibrated at the round start
    (the clipping is kept: it is the deterministic part of activation quantization, and an
    MSE range clips a visible tail). Evaluation and deploy see no noise.
    """

    bits: int = 4
    name = "apqn"
    quant_in_forward = True

    def training_act_bits(self) -> int | None:
        return self.act_bits

    def prepare(self, model: nn.Module) -> nn.Module:
        super().prepare(model)
        set_bits(model, check_bits(self.bits))
        set_mode(model, "noise")
        return model

    def begin_round(self, model: nn.Module, rng: random.Random) -> None:
        # The noise width is the step, calibrated once per round as QAT's frozen step is:
        # recalibrating it every step (an MSE search per layer) made APQN 6x slower than QAT.
        unfreeze_steps(model)
        freeze_steps(model, [self.bits])


def kurtosis(w: torch.Tensor) -> torch.Tensor:
    """E[((w - mu) / sigma)^4]: 1.8 for a uniform distribution, 3 for a Gaussian."""
    z = (w - w.mean()) / (w.std() + 1e-8)
    return (z**4).mean()


@dataclass
class KURE(LocalMethod):
    """Kurtosis regularisation towards a uniform weight distribution (paper 003, Eq. 5-6).

    With `act_bits` the activations get the same term: the kurtosis of each quantized layer's
    input batch (all its elements, the tensor per-tensor quantization sees) towards the same
    `target`, `strength * mean_l (kurtosis(x_l) - target)^2`, weighted as the weight term
    and added to it. Training stays float; the activations are quantized at deploy.
    """

    strength: float = 0.1
    target: float = 1.8
    name = "kure"

    def prepare(self, model: nn.Module) -> nn.Module:
        super().prepare(model)
        if self.act_bits is not None:
            for layer in quant_layers(model).values():
                if layer.input_quant is None:
                    layer.input_quant = ActivationQuantizer(None, calibrator=self.act_calibrator)
                layer.input_quant.record = True
        return model

    def regularizer(self, model: nn.Module) -> torch.Tensor | None:
        layers = list(quant_layers(model).values())
        terms = [(kurtosis(m.weight) - self.target) ** 2 for m in layers]
        reg = self.strength * torch.stack(terms).mean()
        if self.act_bits is None:
            return reg
        acts = []
        for m in layers:
            q = m.input_quant
            if q is not None and q.recorded is not None:
                acts.append((kurtosis(q.recorded) - self.target) ** 2)
                q.recorded = None
        return reg + self.strength * torch.stack(acts).mean() if acts else reg


@dataclass
class MPQ(LocalMethod):
    """FedMPQ's local training (paper 002): per-layer bit-widths and a bit-plane group Lasso.

    Trains through Q(w, b_l) at each layer's own width, `layer_bits` ({layer: bits}, from
    the server's pruning-growing; None means `bits` everywhere). Steps are frozen per round
    as in QAT's "frozen" mode: the Lasso empties planes of a fixed grid, so the grid must not
    follow the weights while they shrink, and the planes the client reports after the round
    (`plane_sparsity`) are read on that same grid. `lasso` weighs `group_lasso`, whose
    per-layer terms lie in [0, b - 1]; 0 turns it off (per-layer QAT).

    A layer already at the narrowest width (2 bits) has no lower width to be pruned to, so
    emptying its top plane buys nothing and only pulls its weights to zero: the Lasso leaves
    it out. A device with a 2-bit budget therefore trains as plain QAT at 2 bits; in a
    Fashion-MNIST run with the Lasso on every layer, its deployed models lost 0.03 accuracy.
    """

    layer_bits: Mapping[str, int] | None = None
    bits: int = 4
    lasso: float = 0.01
    name = "mpq"
    quant_in_forward = True

    def training_act_bits(self) -> int | None:
        return self.act_bits

    def bit_map(self) -> BitMap:
        """The widths this method trains at: `layer_bits`, or `bits` for every layer."""
        return self.bits if self.layer_bits is None else dict(self.layer_bits)

    def prepare(self, model: nn.Module) -> nn.Module:
        check_bits(self.bits)
        if not (math.isfinite(self.lasso) and self.lasso >= 0):
            raise ValueError(f"lasso must be a finite number >= 0, got {self.lasso}")
        super().prepare(model)
        set_scale_method(model, self.scale_method)
        set_bits(model, self.bit_map())
        return model

    def begin_round(self, model: nn.Module, rng: random.Random) -> None:
        unfreeze_steps(model)
        for layer in quant_layers(model).values():
            layer.freeze_steps([layer.bits])

    def regularizer(self, model: nn.Module) -> torch.Tensor | None:
        if not self.lasso:
            return None
        widths = _resolve_bits(quant_layers(model), self.bit_map())
        prunable = {n: b for n, b in widths.items() if min(SUPPORTED_BITS) < b < FLOAT_BITS}
        return self.lasso * group_lasso(model, prunable) if prunable else None


METHODS: dict[str, type[LocalMethod]] = {
    cls.name: cls for cls in (LocalMethod, PTQ, QAT, MQAT, APQN, KURE, MPQ)
}


QUANT_IN_FORWARD = frozenset(n for n, cls in METHODS.items() if cls.quant_in_forward)
"""Methods whose training step runs the fake quantizer."""


def make_method(name: str, **options: object) -> LocalMethod:
    """Build a local method by name; an unknown name lists the known ones."""
    try:
        cls = METHODS[name]
    except KeyError:
        raise ValueError(f"unknown local method {name!r}; known: {sorted(METHODS)}") from None
    return cls(**options)  # type: ignore[arg-type]
