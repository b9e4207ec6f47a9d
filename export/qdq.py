"""Writing quantized ONNX graphs: weights from the quantizer's integers, activations in QDQ.

torch's exporters cannot write b-bit fake-quant (docs/export.md), so the float graph is
exported and rewritten with the `onnx` package: every quantized weight becomes an integer
initializer (int8, or packed INT4 / INT2) behind a per-channel DequantizeLinear, and, where
the layer runs on integer kernels, its input and output activations pass through uint8
QuantizeLinear/DequantizeLinear pairs placed the way onnxruntime fuses them into
QLinearConv / QLinearMatMul (Relu absorbed by a zero point of 0, MaxPool and Flatten sharing
their input's grid).

A model deployed with activation bits (`deploy(..., act_bits)`) brings its own grids, one per
quantized layer's input (`fold.activation_grids`): those tensors are quantized on exactly the
PyTorch grid. At 8 bits on integer kernels the pairs above take the grid of the layer their
tensor feeds (through Relu, MaxPool, Flatten, which commute with a monotonic quantizer);
every other layer's input gets its own pair, `Clip` to the 2^b levels below 8 bits, then
QuantizeLinear/DequantizeLinear in uint8 (int8 when signed) with the trained scale and zero
point, so exactly 2^b levels are used and onnxruntime computes what PyTorch's fake-quant does
(QuantizeLinear divides by the scale and rounds half to even, as `fake_quant_activation`).
"""

from __future__ import annotations

import io
import warnings
from collections import defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper
from torch import nn

from bitfleet.quant import affine_qparams
from bitfleet.runtime_facts import OPSET_BASE, OPSET_INT2

from .fold import ActGrid, LayerQuant

STORAGES = ("int8", "packed")
_TIED = {"MaxPool", "Flatten", "Reshape", "Identity"}
"""Ops that move values without changing them: their output shares the input's grid."""
_POOLED = {"GlobalAveragePool", "AveragePool"}


@dataclass
class ExportPlan:
    """What to write: per-layer integers, how to store them, which layers run on int8 kernels."""

    layers: Mapping[str, LayerQuant]
    storage: str = "int8"
    activations: bool = True
    float_layers: set[str] = field(default_factory=set)
    max_opset: int = OPSET_INT2
    """The newest opset the target runtime loads (docs/export.md#runtimes)."""
    act_grids: Mapping[str, ActGrid] = field(default_factory=dict)
    """The model's own input grid per layer (trained or calibrated with `act_bits`)."""

    def integer_kernel(self, name: str) -> bool:
        return self.activations and self.storage == "int8" and name not in self.float_layers


def float_graph(plain: nn.Module, input_shape: tuple[int, int, int]) -> onnx.ModelProto:
    """The float model as ONNX with dynamic batch; initializers keep their parameter names."""
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            plain,
            (torch.rand(1, *input_shape),),
            buf,
            dynamo=False,
            input_names=["pixels"],
            output_names=["logits"],
            dynamic_axes={"pixels": {0: "batch"}, "logits": {0: "batch"}},
            opset_version=17,
        )
    model = onnx.load_from_string(buf.getvalue())
    _inline_identity_initializers(model)
    return onnx.version_converter.convert_version(model, OPSET_BASE)


def _inline_identity_initializers(model: onnx.ModelProto) -> None:
    """The exporter shares equal initializers through Identity nodes (e.g. the zero biases of
    folded BatchNorms); give each user its own initializer so each layer's bias can be
    quantized on its own grid."""
    g = model.graph
    inits = {t.name: t for t in g.initializer}
    for node in list(g.node):
        if node.op_type == "Identity" and node.input[0] in inits:
            copy = onnx.TensorProto()
            copy.CopyFrom(inits[node.input[0]])
            copy.name = node.output[0]
            g.initializer.append(copy)
            g.node.remove(node)


def _weight_layer(node: onnx.NodeProto, layers: Mapping[str, LayerQuant]) -> str | None:
    if node.op_type not in ("Conv", "Gemm") or len(node.input) < 2:
        return None
    name = node.input[1]
    if name.endswith(".weight") and name[: -len(".weight")] in layers:
        return name[: -len(".weight")]
    return None


def _container(bits: int, storage: str, max_opset: int) -> int:
    """The integer type that holds `bits`-bit weights: int8, or packed INT4 / INT2, where INT2
    waits for opset 25 (a 2-bit weight in INT4 is the same number, in twice the bytes)."""
    if storage != "packed" or bits > 4:
        return TensorProto.INT8
    return TensorProto.INT2 if bits <= 2 and max_opset >= OPSET_INT2 else TensorProto.INT4


def _int_tensor(name: str, ints: np.ndarray, dtype: int) -> onnx.TensorProto:
    """int8 initializer, or INT4 / INT2 packed into raw bytes (first element in the low bits,
    as the ONNX spec lays them out)."""
    if dtype == TensorProto.INT8:
        return numpy_helper.from_array(ints.astype(np.int8), name)
    width = 2 if dtype == TensorProto.INT2 else 4
    per_byte = 8 // width
    flat = (ints.astype(np.int16).ravel() & ((1 << width) - 1)).astype(np.uint8)
    flat = np.concatenate([flat, np.zeros(-len(flat) % per_byte, np.uint8)])
    groups = flat.reshape(-1, per_byte)
    packed = np.zeros(len(groups), np.uint8)
    for i in range(per_byte):
        packed |= groups[:, i] << (i * width)
    return helper.make_tensor(name, dtype, list(ints.shape), packed.tobytes(), raw=True)


def compact_names(model: onnx.ModelProto) -> None:
    """Short names for intermediate tensors and none for nodes: the exporter's long paths cost
    kilobytes, a noticeable share of a 2-bit LeNet file."""
    g = model.graph
    keep = {i.name for i in g.input} | {o.name for o in g.output} | {t.name for t in g.initializer}
    rename: dict[str, str] = {}
    for node in g.node:
        node.name = ""
        node.doc_string = ""
        for i, out in enumerate(node.output):
            if out not in keep:
                rename.setdefault(out, f"t{len(rename)}")
                node.output[i] = rename[out]
    for node in g.node:
        for i, name in enumerate(node.input):
            node.input[i] = rename.get(name, name)
    del g.value_info[:]
    model.doc_string = ""
    model.producer_name = "bitfleet"


class _Graph:
    """Small editing helpers over a ModelProto's graph."""

    def __init__(self, model: onnx.ModelProto) -> None:
        self.model = model
        self.g = model.graph
        self.inits = {t.name: t for t in self.g.initializer}
        self.new_nodes: list[tuple[str, onnx.NodeProto]] = []  # (insert before consumer of)

    def consumers(self) -> dict[str, list[onnx.NodeProto]]:
        out: dict[str, list[onnx.NodeProto]] = defaultdict(list)
        for node in self.g.node:
            for name in node.input:
                out[name].append(node)
        return out

    def producers(self) -> dict[str, onnx.NodeProto]:
        return {o: n for n in self.g.node for o in n.output}

    def replace_initializer(self, name: str, tensors: Iterable[onnx.TensorProto]) -> None:
        self.g.initializer.remove(self.inits.pop(name))
        for t in tensors:
            self.g.initializer.append(t)
            self.inits[t.name] = t

    def dequantized(
        self, name: str, ints: onnx.TensorProto, scale: np.ndarray, scale_name: str
    ) -> onnx.NodeProto:
        """Replace float initializer `name` by integers and per-channel scales; return the
        DequantizeLinear node that recreates `name` from them.

        The zero point (0: the quantizer is symmetric) is written out, shaped as the scale:
        onnxruntime 1.20-1.22's QGemm refuses a per-channel weight whose zero point is left to
        the default scalar ("zero point and scale of input b should have same shape size").
        """
        zp_name = f"{ints.name}.z"
        if ints.data_type == TensorProto.INT32:  # a bias
            zero = numpy_helper.from_array(np.zeros(scale.shape, np.int32), zp_name)
        else:
            zero = _int_tensor(zp_name, np.zeros(scale.shape, np.int8), ints.data_type)
        scales = numpy_helper.from_array(scale, scale_name)
        self.replace_initializer(name, [ints, scales, zero])
        return helper.make_node(
            "DequantizeLinear", [ints.name, scale_name, zp_name], [name], name=f"{name}.dq", axis=0
        )

    def add_initializer(self, t: onnx.TensorProto) -> None:
        self.g.initializer.append(t)
        self.inits[t.name] = t


def quantize_graph(
    model: onnx.ModelProto,
    plan: ExportPlan,
    act_ranges: Mapping[str, tuple[float, float]] | None = None,
) -> onnx.ModelProto:
    """Rewrite a float graph (from `float_graph`) into its quantized form, in place.

    `act_ranges` (tensor -> observed min, max) is needed when any layer runs on integer
    kernels; `activation_tensors` says which tensors to observe.
    """
    g = _Graph(model)
    dq_nodes: list[onnx.NodeProto] = []
    needs_int2 = False
    weight_scales: dict[str, np.ndarray] = {}
    for node in list(g.g.node):
        layer_name = _weight_layer(node, plan.layers)
        if layer_name is None:
            continue
        if plan.activations and layer_name in plan.float_layers:
            continue  # kept float because integer kernels lose: no run-time DequantizeLinear
        layer = plan.layers[layer_name]
        wname = node.input[1]
        ints = layer.ints.numpy()
        scale = layer.scale.numpy().astype(np.float32)
        weight_scales[layer_name] = scale
        dtype = _container(layer.bits, plan.storage, plan.max_opset)
        needs_int2 |= dtype == TensorProto.INT2
        ints_tensor = _int_tensor(f"{layer_name}.wq", ints, dtype)
        dq_nodes.append(g.dequantized(wname, ints_tensor, scale, f"{layer_name}.ws"))

    act_tensors, tied = activation_tensors(model, plan)
    qparams: dict[str, tuple[float, int]] = {}
    model_grid = _grid_of_tensors(model, plan) if plan.act_grids else {}
    for t in act_tensors:
        src = tied.get(t, t)
        if src not in qparams:
            if src in model_grid:
                qparams[src] = model_grid[src].key()[:2]
            elif act_ranges is None or src not in act_ranges:
                raise ValueError(f"no calibrated range for activation {src!r}")
            else:
                qparams[src] = affine_qparams(*act_ranges[src], bits=8)
        qparams[t] = qparams[src]

    # Biases of integer-kernel layers become int32 on the grid s_x * s_w, as kernels expect.
    for node in g.g.node:
        layer_name = _weight_layer(node, plan.layers) if node.op_type in ("Conv", "Gemm") else None
        if node.op_type == "DequantizeLinear" or len(node.input) < 3 or layer_name is None:
            continue
        x = node.input[0]
        if not plan.integer_kernel(layer_name) or x not in qparams or node.input[2] not in g.inits:
            continue
        bias = numpy_helper.to_array(g.inits[node.input[2]]).astype(np.float64)
        bscale = (qparams[x][0] * weight_scales[layer_name].astype(np.float64)).astype(np.float32)
        bq = np.round(bias / bscale).astype(np.int32)
        bq_tensor = numpy_helper.from_array(bq, f"{layer_name}.bq")
        dq_nodes.append(g.dequantized(node.input[2], bq_tensor, bscale, f"{layer_name}.bs"))

    # Activation QDQ pairs: t -> Q -> DQ -> (every former consumer of t).
    qdq_nodes: list[onnx.NodeProto] = []
    consumers = g.consumers()
    for t in sorted(act_tensors):
        scale, zp = qparams[t]
        sname, zname = f"{t}.as", f"{t}.az"
        g.add_initializer(numpy_helper.from_array(np.array(scale, np.float32), sname))
        g.add_initializer(numpy_helper.from_array(np.array(zp, np.uint8), zname))
        qdq_nodes.append(helper.make_node("QuantizeLinear", [t, sname, zname], [f"{t}.q"]))
        qdq_nodes.append(
            helper.make_node("DequantizeLinear", [f"{t}.q", sname, zname], [f"{t}.dq"])
        )
        for c in consumers.get(t, []):
            for i, name in enumerate(c.input):
                if name == t:
                    c.input[i] = f"{t}.dq"

    emulated = _emulate_inputs(g, plan, qparams)

    # Constants first, then the original nodes with each QDQ pair right after its producer.
    producers = {o: i for i, n in enumerate(g.g.node) for o in n.output}
    ordered: list[onnx.NodeProto] = list(dq_nodes)
    by_pos: dict[int, list[onnx.NodeProto]] = defaultdict(list)
    graph_inputs = {i.name for i in g.g.input}
    head: list[onnx.NodeProto] = []
    for q in qdq_nodes:
        src = q.input[0] if q.op_type == "QuantizeLinear" else q.input[0][: -len(".q")]
        if src in graph_inputs:
            head.append(q)
        else:
            by_pos[producers[src]].append(q)
    ordered += head
    for i, n in enumerate(g.g.node):
        ordered.append(n)
        ordered.extend(by_pos.get(i, []))
    if emulated:
        available = {i.name for i in g.g.input} | set(g.inits)
        ordered = _toposort(ordered + emulated, available)
    del g.g.node[:]
    g.g.node.extend(ordered)
    if needs_int2:
        for op in model.opset_import:
            if op.domain in ("", "ai.onnx"):
                op.version = OPSET_INT2
    return model


def activation_tensors(model: onnx.ModelProto, plan: ExportPlan) -> tuple[set[str], dict[str, str]]:
    """Tensors that get a QDQ pair, and for tied ones (MaxPool, Flatten) their grid's source."""
    g = model.graph
    consumers: dict[str, list[onnx.NodeProto]] = defaultdict(list)
    for node in g.node:
        for name in node.input:
            consumers[name].append(node)
    outputs = {o.name for o in g.output}
    chosen: set[str] = set()

    def after_relu(t: str) -> str:
        users = consumers.get(t, [])
        if len(users) == 1 and users[0].op_type == "Relu":
            return users[0].output[0]
        return t

    for node in g.node:
        name = _weight_layer(node, plan.layers)
        if node.op_type == "Add" and plan.activations and plan.storage == "int8":
            inputs_q = all(i in chosen for i in node.input)
            if inputs_q:
                chosen.add(after_relu(node.output[0]))
            continue
        if name is None or not plan.integer_kernel(name):
            continue
        chosen.add(node.input[0])
        out = after_relu(node.output[0])
        if out not in outputs:
            chosen.add(out)
    # Pooling that averages needs its own grid, so onnxruntime runs QLinearGlobalAveragePool.
    for node in g.node:
        if node.op_type in _POOLED and node.input[0] in chosen and node.output[0] not in outputs:
            chosen.add(node.output[0])
    tied: dict[str, str] = {}
    changed = True
    while changed:  # grids flow through value-preserving ops between quantized tensors
        changed = False
        for node in g.node:
            if node.op_type in _TIED and node.input[0] in chosen:
                out = node.output[0]
                if out not in outputs and out not in tied:
                    tied[out] = tied.get(node.input[0], node.input[0])
                    chosen.add(out)
                    changed = True
    return chosen, tied


def _grid_of_tensors(model: onnx.ModelProto, plan: ExportPlan) -> dict[str, ActGrid]:
    """The model grid each tensor can carry exactly: a layer's input tensor takes its layer's
    grid, and a tensor that reaches exactly one grid layer's input only through ops that
    commute with a monotonic quantizer (MaxPool, Flatten, Reshape, Identity) takes that one
    (quantizing before a MaxPool and after it give the same numbers)."""
    g = model.graph
    consumers: dict[str, list[onnx.NodeProto]] = defaultdict(list)
    for node in g.node:
        for name in node.input:
            consumers[name].append(node)
    direct: dict[str, ActGrid] = {}
    for node in g.node:
        name = _weight_layer(node, plan.layers)
        if name in plan.act_grids and (plan.integer_kernel(name) or node.input[0] not in direct):
            direct[node.input[0]] = plan.act_grids[name]
    out = dict(direct)
    for t in {o for n in g.node for o in n.output} | {i.name for i in g.input}:
        if t in out:
            continue
        cur = t
        for _ in range(len(g.node)):
            users = consumers.get(cur, [])
            if len(users) != 1 or users[0].op_type not in _TIED:
                break
            cur = users[0].output[0]
            if cur in direct:
                out[t] = direct[cur]
                break
    return out


def _emulate_inputs(
    g: _Graph, plan: ExportPlan, qparams: Mapping[str, tuple[float, int]]
) -> list[onnx.NodeProto]:
    """[Clip ->] QuantizeLinear -> DequantizeLinear on the input of every grid layer that is
    not on integer kernels (on the edge into that layer only: another consumer of the tensor
    sees what it sees in PyTorch). An input already on the same grid is left as it is."""
    nodes: list[onnx.NodeProto] = []
    made: dict[tuple[str, tuple], str] = {}
    for node in list(g.g.node):
        name = _weight_layer(node, plan.layers)
        if name not in plan.act_grids or plan.integer_kernel(name):
            continue
        grid = plan.act_grids[name]
        t = node.input[0]
        src = t[: -len(".dq")] if t.endswith(".dq") else None
        if src is not None and qparams.get(src) == grid.key()[:2] and grid.bits == 8:
            continue  # already quantized on this very grid (a uint8 pair of integer kernels)
        key = (t, grid.key())
        if key not in made:
            base = f"{name}.ain"
            dtype = np.int8 if grid.signed else np.uint8
            scale = np.float32(grid.scale)
            g.add_initializer(numpy_helper.from_array(np.array(scale, np.float32), f"{base}.s"))
            g.add_initializer(
                numpy_helper.from_array(np.array(grid.zero_point, dtype), f"{base}.z")
            )
            x = t
            info = np.iinfo(dtype)
            if grid.qmin > info.min or grid.qmax < info.max:
                lo = np.float32((grid.qmin - grid.zero_point) * scale)
                hi = np.float32((grid.qmax - grid.zero_point) * scale)
                g.add_initializer(numpy_helper.from_array(np.array(lo, np.float32), f"{base}.lo"))
                g.add_initializer(numpy_helper.from_array(np.array(hi, np.float32), f"{base}.hi"))
                nodes.append(
                    helper.make_node("Clip", [t, f"{base}.lo", f"{base}.hi"], [f"{base}.c"])
                )
                x = f"{base}.c"
            nodes.append(
                helper.make_node("QuantizeLinear", [x, f"{base}.s", f"{base}.z"], [f"{base}.q"])
            )
            nodes.append(
                helper.make_node(
                    "DequantizeLinear", [f"{base}.q", f"{base}.s", f"{base}.z"], [f"{base}.dq"]
                )
            )
            made[key] = f"{base}.dq"
        node.input[0] = made[key]
    return nodes


def _toposort(nodes: list[onnx.NodeProto], available: set[str]) -> list[onnx.NodeProto]:
    """`nodes` in an order where every input is produced first, keeping the given order where
    it already is one."""
    available = set(available) | {""}
    out: list[onnx.NodeProto] = []
    pending = list(nodes)
    while pending:
        rest = []
        for n in pending:
            if all(i in available for i in n.input):
                out.append(n)
                available.update(n.output)
            else:
                rest.append(n)
        if len(rest) == len(pending):
            raise ValueError("graph has a cycle or an input nothing produces")
        pending = rest
    return out
