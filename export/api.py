"""`export_model`: a deployed quantization-aware model to a checked, self-describing ONNX file.

The file takes [0, 1] pixels (normalisation is in the graph), holds every quantized weight as
the quantizer's integers, and says in its metadata what it holds. An export never makes a
model slower than float: with 8-bit activations, layers whose integer kernels lose on this
machine are measured and left in float, and the metadata lists them.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
from torch import nn

from bitfleet.quant import quant_layers
from bitfleet.runtime_facts import OPSET_BASE, OPSET_INT2

from .fold import ActGrid, activation_grids, prepare_for_export
from .qdq import (
    STORAGES,
    ExportPlan,
    activation_tensors,
    compact_names,
    float_graph,
    quantize_graph,
)
from .runtime import SESSION_CONFIG_KEY, latency_ms, session, tensor_ranges

GREEDY_MAX_LAYERS = 12
"""Up to this many layers, each is tried in float; beyond, only the first and the last."""
GAIN_NEEDED = 0.97
"""A layer stays float only when that makes the model at least 3% faster."""
INTEGER_KERNELS = "uint8 per-tensor"
"""`bitfleet.activations` of a file whose layers run on onnxruntime's integer kernels."""


def label_bits(grids: Mapping[str, ActGrid]) -> str:
    return ",".join(str(b) for b in sorted({g.bits for g in grids.values()}))


def activations_label(grids: Mapping[str, ActGrid], integer_kernels: bool) -> str:
    """`bitfleet.activations`: "uint8 per-tensor" (integer kernels), "2-bit per-tensor (Q/DQ)"
    (the model's own grids as Q/DQ pairs around float compute), or "float"."""
    if integer_kernels:
        return INTEGER_KERNELS
    if grids:
        return f"{label_bits(grids)}-bit per-tensor (Q/DQ)"
    return "float"


@dataclass
class ExportResult:
    path: Path
    bits: dict[str, int]
    storage: str
    activations: str
    float_layers: list[str] = field(default_factory=list)
    lat_b32_ms: dict[str, float] = field(default_factory=dict)

    @property
    def bytes(self) -> int:
        return self.path.stat().st_size


def _latency(model: onnx.ModelProto, shape: tuple[int, int, int]) -> float:
    return latency_ms(session(model), 32, shape, runs=15, warmup=3)


def _choose_float_layers(
    base: onnx.ModelProto,
    build: callable,  # type: ignore[valid-type]
    names: Sequence[str],
    shape: tuple[int, int, int],
) -> tuple[set[str], dict[str, float]]:
    """Keep in float the layers whose integer kernels make the whole model slower, measured."""
    fp32 = _latency(base, shape)
    chosen: set[str] = set()
    best = _latency(build(chosen), shape)
    trials = list(names) if len(names) <= GREEDY_MAX_LAYERS else [names[0], names[-1]]
    for name in trials:
        lat = _latency(build(chosen | {name}), shape)
        if lat < best * GAIN_NEEDED:
            chosen, best = chosen | {name}, lat
    if best > fp32:  # integer kernels lose overall: weights stay quantized, compute in float
        chosen, best = set(names), _latency(build(set(names)), shape)
    return chosen, {"fp32": fp32, "quantized": best}


def export_model(
    model: nn.Module,
    path: str | Path,
    input_shape: tuple[int, int, int],
    *,
    storage: str = "int8",
    activations: bool = True,
    calib: np.ndarray | None = None,
    float_layers: str | set[str] = "auto",
    metadata: Mapping[str, object] | None = None,
    max_opset: int = OPSET_INT2,
) -> ExportResult:
    """Write `model` (deployed at its bits by a method's `deploy`) as quantized ONNX.

    `storage`: "int8" (int8 initializers; with `activations`, integer kernels) or "packed"
    (INT4 / INT2 initializers, dequantized to float at run time). `calib`: [0, 1] pixels
    (N, C, H, W) for the activation ranges, needed with `activations`. `max_opset`: the newest
    opset the target's onnxruntime loads; below 25, 2-bit weights are stored in INT4.

    A model deployed with activation bits carries its own activation grids, and the file
    computes with exactly those (whatever `activations` and `storage` say): at 8 bits, int8
    storage, `activations` and `calib`, through integer kernels where they are faster (the
    uint8 pairs take the model's grids); otherwise as Q/DQ pairs around float compute
    (below 8 bits: Clip to the 2^b levels, then uint8 Q/DQ).
    """
    if max_opset < OPSET_BASE:
        raise ValueError(f"max_opset {max_opset}: every file needs opset {OPSET_BASE} (ort 1.20)")
    if storage not in STORAGES:
        raise ValueError(f"storage must be one of {STORAGES}, got {storage!r}")
    grids = activation_grids(model)
    activations = activations and storage == "int8"
    if grids:
        no_calib = calib is None or len(calib) == 0
        uint8 = all(g.bits == 8 and not g.signed for g in grids.values())
        activations = activations and uint8 and not no_calib
    if activations and (calib is None or len(calib) == 0):
        raise ValueError("8-bit activations need calibration samples (calib)")
    bits = {n: m.bits for n, m in quant_layers(model).items()}
    plain, layers = prepare_for_export(model, input_shape)
    base = float_graph(plain, input_shape)
    names = list(layers)

    def build(floats: set[str], acts: bool = activations) -> onnx.ModelProto:
        m = onnx.ModelProto()
        m.CopyFrom(base)
        plan = ExportPlan(layers, storage, acts, set(floats), max_opset, act_grids=grids)
        return quantize_graph(m, plan, ranges)

    ranges = None
    timing: dict[str, float] = {}
    chosen: set[str] = set()
    if activations:
        wanted, tied = activation_tensors(base, ExportPlan(layers, storage, True))
        ranges = tensor_ranges(base, wanted | set(tied.values()), calib)
        if float_layers == "auto":
            chosen, timing = _choose_float_layers(base, build, names, input_shape)
        else:
            chosen = set(float_layers)
    if activations and names and chosen == set(names):
        # Integer kernels lose everywhere: store the weights as integers anyway and let
        # onnxruntime dequantize them once at load (session config below); float compute.
        activations = False
    proto = build(chosen, activations)
    compact_names(proto)
    props = {
        "bitfleet.input": "pixels: NCHW float32 in [0, 1], dynamic batch; normalisation in graph",
        "bitfleet.bits_per_layer": json.dumps(bits),
        "bitfleet.storage": storage,
        "bitfleet.activations": activations_label(grids, activations),
        "bitfleet.float_layers": json.dumps(sorted(chosen)),
        SESSION_CONFIG_KEY: json.dumps({} if activations else {"session.disable_quant_qdq": "1"}),
        "bitfleet.float_layers_reason": (
            "integer kernels measured slower than float on the exporting machine" if chosen else ""
        ),
        **(
            {
                "bitfleet.activation_bits": json.dumps({n: g.bits for n, g in grids.items()}),
                "bitfleet.activation_calibrator": ",".join(
                    sorted({g.calibrator for g in grids.values()})
                ),
            }
            if grids
            else {}
        ),
        **{
            f"bitfleet.{k}": v if isinstance(v, str) else json.dumps(v)
            for k, v in (metadata or {}).items()
        },
    }
    onnx.helper.set_model_props(proto, props)
    onnx.checker.check_model(proto)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(proto.SerializeToString())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return ExportResult(
        path=path,
        bits=bits,
        storage=storage,
        activations="8" if activations else (f"{label_bits(grids)}-qdq" if grids else "float"),
        float_layers=sorted(chosen),
        lat_b32_ms=timing,
    )
