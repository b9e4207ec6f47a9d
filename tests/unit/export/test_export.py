"""Quantized ONNX export: round trips in onnxruntime, packed integers, metadata, bad requests."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from bitfleet.cli.main import main
from bitfleet.models import create_model
from bitfleet.models.normalize import Normalize
from bitfleet.profiles import ProfileError
from bitfleet.quant import PTQ, QAT, quant_layers, quantize_to_int
from export.api import export_model
from export.checkpoint_model import load_for_export
from export.runtime import run_batches, session
from tests.tiny_fmnist import make_tiny_fmnist

SHAPE = (1, 12, 12)


class Tiny(nn.Module):
    """Conv + BatchNorm + ReLU + pool + Linear: every pattern the exporter rewrites."""

    def __init__(self) -> None:
        super().__init__()
        self.normalize = Normalize((0.5,), (0.25,))
        self.conv = nn.Conv2d(1, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.relu = nn.ReLU()
        self.pool = nn.MaxPool2d(2)
        self.fc = nn.Linear(8 * 6 * 6, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(self.relu(self.bn(self.conv(self.normalize(x)))))
        return self.fc(torch.flatten(x, 1))


def tiny(bits: int) -> nn.Module:
    torch.manual_seed(0)
    model = Tiny()
    with torch.no_grad():  # a trained-looking BatchNorm, so folding is not a no-op
        model.bn.weight.uniform_(0.5, 2.0)
        model.bn.bias.uniform_(-0.5, 0.5)
        model.bn.running_mean.uniform_(-0.2, 0.2)
        model.bn.running_var.uniform_(0.5, 2.0)
    model.eval()
    method = PTQ(scale_method="mse")
    method.prepare(model)
    return method.deploy(model, bits)


def pixels(n: int = 64) -> np.ndarray:
    return np.random.default_rng(1).random((n, *SHAPE), dtype=np.float32)


def torch_logits(model: nn.Module, x: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(torch.from_numpy(x)).numpy()


@pytest.mark.parametrize("bits", [8, 4, 2])
@pytest.mark.parametrize("storage", ["int8", "packed"])
def test_weight_only_round_trip_matches_pytorch(bits: int, storage: str, tmp_path: Path) -> None:
    model = tiny(bits)
    result = export_model(model, tmp_path / "m.onnx", SHAPE, storage=storage, activations=False)
    x = pixels()
    out = run_batches(session(str(result.path)), x)
    np.testing.assert_allclose(out, torch_logits(model, x), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("bits", [8, 4])
def test_integer_kernels_stay_close_to_pytorch(bits: int, tmp_path: Path) -> None:
    model = tiny(bits)
    x = pixels(256)
    result = export_model(
        model, tmp_path / "m.onnx", SHAPE, activations=True, calib=x, float_layers=set()
    )
    out = run_batches(session(str(result.path)), x)
    ref = torch_logits(model, x)
    assert (out.argmax(1) == ref.argmax(1)).mean() >= 0.95
    assert np.abs(out - ref).max() < 0.1 * np.abs(ref).max()
    ops = {n.op_type for n in onnx.load(result.path).graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops


@pytest.mark.parametrize("bits", [4, 2])
def test_packed_initializers_hold_exactly_the_pytorch_integers(bits: int, tmp_path: Path) -> None:
    model = tiny(bits)
    result = export_model(model, tmp_path / "m.onnx", SHAPE, storage="packed", activations=False)
    proto = onnx.load(result.path)
    inits = {t.name: t for t in proto.graph.initializer}
    expect_type = onnx.TensorProto.INT2 if bits == 2 else onnx.TensorProto.INT4
    for name, layer in quant_layers(model).items():
        stored = inits[f"{name}.wq"]
        assert stored.data_type == expect_type
        ints = quantize_to_int(layer.weight, layer.step(), bits).numpy()
        np.testing.assert_array_equal(onnx.numpy_helper.to_array(stored).astype(np.int8), ints)
        assert len(stored.raw_data) == -(-ints.size * (2 if bits == 2 else 4) // 8)  # packed


@pytest.mark.parametrize(
    ("max_opset", "container", "stamped"), [(21, "INT4", 21), (25, "INT2", 25)]
)
def test_two_bit_weights_fit_the_runtimes_opsets(
    max_opset: int, container: str, stamped: int, tmp_path: Path
) -> None:
    """onnxruntime before 1.23 refuses opset 25, where INT2 begins: its boards get the same
    integers in INT4, and a file stamped with an opset they load."""
    model = tiny(2)
    path = tmp_path / "m.onnx"
    export_model(model, path, SHAPE, storage="packed", activations=False, max_opset=max_opset)
    proto = onnx.load(path)
    assert {o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")} == {stamped}
    for name, layer in quant_layers(model).items():
        stored = {t.name: t for t in proto.graph.initializer}[f"{name}.wq"]
        assert stored.data_type == getattr(onnx.TensorProto, container)
        ints = quantize_to_int(layer.weight, layer.step(), 2).numpy()
        np.testing.assert_array_equal(onnx.numpy_helper.to_array(stored).astype(np.int8), ints)
    with pytest.raises(ValueError, match="opset 21"):
        export_model(model, path, SHAPE, storage="packed", activations=False, max_opset=20)


def test_weight_zero_points_have_the_scales_shape(tmp_path: Path) -> None:
    """onnxruntime 1.20-1.22's QGemm refuses a per-channel weight whose zero point is left to
    the scalar default: every weight's DequantizeLinear names one, shaped as its scale."""
    model = tiny(8)
    x = pixels(64)
    path = tmp_path / "m.onnx"
    export_model(model, path, SHAPE, activations=True, calib=x, float_layers=set())
    proto = onnx.load(path)
    inits = {t.name: t for t in proto.graph.initializer}
    weights = [
        n for n in proto.graph.node if n.op_type == "DequantizeLinear" and n.input[0] in inits
    ]
    assert {n.input[0] for n in weights} >= {"conv.wq", "fc.wq"}
    for node in weights:
        scale, zero = inits[node.input[1]], inits[node.input[2]]
        assert list(zero.dims) == list(scale.dims)
        assert not onnx.numpy_helper.to_array(zero).any()


def test_metadata_and_self_contained_input(tmp_path: Path) -> None:
    model = tiny(4)
    result = export_model(
        model,
        tmp_path / "m.onnx",
        SHAPE,
        storage="packed",
        activations=False,
        metadata={"strategy": "qat", "source_round": 7, "class_labels": list("abcde")},
    )
    proto = onnx.load(result.path)
    onnx.checker.check_model(proto)
    props = {p.key: p.value for p in proto.metadata_props}
    assert json.loads(props["bitfleet.bits_per_layer"]) == {"conv": 4, "fc": 4}
    assert props["bitfleet.storage"] == "packed"
    assert props["bitfleet.strategy"] == "qat" and props["bitfleet.source_round"] == "7"
    assert json.loads(props["bitfleet.class_labels"]) == list("abcde")
    assert "[0, 1]" in props["bitfleet.input"]
    dims = proto.graph.input[0].type.tensor_type.shape.dim
    assert dims[0].dim_param and [d.dim_value for d in dims[1:]] == list(SHAPE)
    assert {"Sub", "Div"} <= {n.op_type for n in proto.graph.node}  # normalisation inside


def test_bad_requests_fail_with_clear_messages(tmp_path: Path) -> None:
    ckpt = tmp_path / "lenet.safetensors"
    lenet = create_model("lenet5")
    save_file({k: v.contiguous() for k, v in lenet.state_dict().items()}, str(ckpt))
    for bits in (1, 9):
        with pytest.raises(ValueError, match="bits"):
            load_for_export(ckpt, "lenet5", "fashion-mnist", bits=bits)
    with pytest.raises(ProfileError, match="rpi9"):
        load_for_export(ckpt, "lenet5", "fashion-mnist", device="rpi9")
    with pytest.raises(ValueError, match="does not fit small_cnn"):
        load_for_export(ckpt, "small_cnn", "fashion-mnist", bits=4)
    with pytest.raises(ValueError, match="storage"):
        export_model(tiny(4), tmp_path / "x.onnx", SHAPE, storage="int3")


def test_device_profile_picks_bits_and_storage(tmp_path: Path) -> None:
    ckpt = tmp_path / "lenet.safetensors"
    save_file(
        {k: v.contiguous() for k, v in create_model("lenet5").state_dict().items()}, str(ckpt)
    )
    pi4 = load_for_export(ckpt, "lenet5", "fashion-mnist", device="rpi4")
    pi5 = load_for_export(ckpt, "lenet5", "fashion-mnist", device="rpi5")
    # Both at 8 bits (no limit binds); the Pi 4, without dot products, computes in float.
    assert (pi4.bits, pi4.storage, pi4.activations) == (8, "packed", False)
    assert (pi5.bits, pi5.storage, pi5.activations) == (8, "int8", True)


def test_cli_exports_and_verifies_a_checkpoint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("BITFLEET_DATA_DIR", str(make_tiny_fmnist(tmp_path / "data", 300, 200)))
    ckpt = tmp_path / "lenet.safetensors"
    save_file(
        {k: v.contiguous() for k, v in create_model("lenet5").state_dict().items()}, str(ckpt)
    )
    out = tmp_path / "m.onnx"
    code = main(["export", "--checkpoint", str(ckpt), "--device", "rpi4", "--out", str(out),
                 "--verify", "--verify-samples", "200"])  # fmt: skip
    printed = capsys.readouterr().out
    assert code == 0, printed
    assert "8-bit weights, packed storage" in printed and "top-1 agreement 1.0000" in printed
    assert out.stat().st_size > 0


@pytest.mark.parametrize(("bits", "act_bits"), [(2, 2), (4, 3)])
def test_cli_exports_a_checkpoint_trained_through_quantized_activations(
    bits: int,
    act_bits: int,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """`--act-bits`: the file quantizes the layer inputs on the model's own grids (calibrated on
    the validation images, as the coordinator's), and PyTorch and onnxruntime agree on it."""
    monkeypatch.setenv("BITFLEET_DATA_DIR", str(make_tiny_fmnist(tmp_path / "data", 300, 200)))
    ckpt = tmp_path / "lenet.safetensors"
    save_file(
        {k: v.contiguous() for k, v in create_model("lenet5").state_dict().items()}, str(ckpt)
    )
    out = tmp_path / "m.onnx"
    code = main(["export", "--checkpoint", str(ckpt), "--bits", str(bits), "--act-bits",
                 str(act_bits), "--strategy", "qat", "--out", str(out), "--verify",
                 "--verify-samples", "200"])  # fmt: skip
    printed = capsys.readouterr().out
    assert code == 0, printed
    assert f"{bits}-bit weights, int8 storage, {act_bits}-bit activations" in printed
    assert "top-1 agreement 1.0000" in printed
    kinds = {n.op_type for n in onnx.load(str(out)).graph.node}
    assert "QuantizeLinear" in kinds and "Clip" in kinds  # activations below 8 bits: Q/DQ


def tiny_wa(bits: int, act_bits: int, method=None) -> nn.Module:  # noqa: ANN001
    model = tiny(32)
    method = method or PTQ(scale_method="mse")
    return method.deploy(model, bits, act_bits=act_bits, calib=torch.from_numpy(pixels(256)))


@pytest.mark.parametrize(("bits", "act_bits"), [(8, 8), (4, 4), (2, 2), (2, 3)])
@pytest.mark.parametrize("storage", ["int8", "packed"])
def test_trained_activation_grids_export_with_identical_numbers(
    bits: int, act_bits: int, storage: str, tmp_path: Path
) -> None:
    model = tiny_wa(bits, act_bits)
    x = np.random.default_rng(7).random((300, *SHAPE), dtype=np.float32)
    result = export_model(model, tmp_path / "m.onnx", SHAPE, storage=storage, activations=False)
    out = run_batches(session(str(result.path)), x)
    ref = torch_logits(model, x)
    assert (out.argmax(1) == ref.argmax(1)).mean() == 1.0
    per_sample = np.abs(out - ref).max(axis=1)
    # Same grids, same rounding (half to even, by division): only a float accumulation-order
    # difference that lands an activation on a rounding boundary can move a level.
    assert np.mean(per_sample < 1e-4) >= 0.99
    proto = onnx.load(result.path)
    props = {p.key: p.value for p in proto.metadata_props}
    assert props["bitfleet.activations"] == f"{act_bits}-bit per-tensor (Q/DQ)"
    assert props["bitfleet.activation_calibrator"] == "mse"
    assert json.loads(props["bitfleet.activation_bits"]) == {"conv": act_bits, "fc": act_bits}
    ops = [n.op_type for n in proto.graph.node]
    assert ops.count("Clip") == (2 if act_bits < 8 else 0)
    assert ops.count("QuantizeLinear") == 2
    assert result.activations == f"{act_bits}-qdq"


def test_trained_activations_below_8_bits_use_exactly_their_levels(tmp_path: Path) -> None:
    model = tiny_wa(4, 2)
    path = tmp_path / "m.onnx"
    export_model(model, path, SHAPE, storage="packed", activations=False)
    proto = onnx.load(path)
    quantized = [n.output[0] for n in proto.graph.node if n.op_type == "QuantizeLinear"]
    proto.graph.output.extend([onnx.ValueInfoProto(name=t) for t in quantized])
    x = pixels(200)
    outs = session(proto).run(quantized, {"pixels": x})
    for q in outs:
        assert q.dtype == np.uint8 and len(np.unique(q)) <= 4 and q.max() <= 3


def test_eight_bit_trained_activations_take_integer_kernels(tmp_path: Path) -> None:
    from bitfleet.onnx_session import time_file

    model = tiny_wa(8, 8)
    x = pixels(256)
    path = tmp_path / "m.onnx"
    result = export_model(model, path, SHAPE, activations=True, calib=x, float_layers=set())
    out = run_batches(session(str(result.path)), x)
    ref = torch_logits(model, x)
    assert (out.argmax(1) == ref.argmax(1)).mean() >= 0.99
    props = {p.key: p.value for p in onnx.load(path).metadata_props}
    assert props["bitfleet.activations"] == "uint8 per-tensor" and result.activations == "8"
    assert time_file(path.read_bytes(), runs=3).integer_kernels
    export_model(tiny_wa(2, 2), path, SHAPE, activations=True, calib=x)
    assert not time_file(path.read_bytes(), runs=3).integer_kernels  # Q/DQ: float compute


def test_qat_with_activations_exports_what_it_trained(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = Tiny()
    gen = torch.Generator().manual_seed(3)
    xs = torch.rand(128, *SHAPE, generator=gen)
    ys = torch.randint(0, 5, (128,), generator=gen)
    from bitfleet.training import train

    method = QAT(bits=2, act_bits=3)
    train(model, xs, ys, method, epochs=2, batch_size=32, seed=0)
    method.deploy(model, 2, act_bits=3)  # the ranges calibrated at the round start
    x = pixels(300)
    result = export_model(model, tmp_path / "m.onnx", SHAPE, storage="packed")
    out = run_batches(session(str(result.path)), x)
    ref = torch_logits(model.eval(), x)
    assert (out.argmax(1) == ref.argmax(1)).mean() == 1.0
    assert np.mean(np.abs(out - ref).max(axis=1) < 1e-4) >= 0.99


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_activation_rounding_matches_quantizelinear_on_boundaries(bits: int) -> None:
    """Values one ulp either side of every half step: PyTorch's fake quantizer and onnxruntime's
    [Clip ->] QuantizeLinear -> DequantizeLinear pick the same level (division, half to even)."""
    from onnx import TensorProto, helper, numpy_helper

    from bitfleet.quant import fake_quant_activation

    scale, zp, qmax = float(np.float32(0.0123457)), 3, 2**bits - 1
    x = ((torch.arange(-20, 300).float() + 0.5) * scale).repeat_interleave(3)
    x = torch.nextafter(x, x + (torch.arange(len(x)) % 3 - 1).float())
    s32 = np.float32(scale)
    inits = [
        numpy_helper.from_array(np.array(-zp * s32, np.float32), "lo"),
        numpy_helper.from_array(np.array((qmax - zp) * s32, np.float32), "hi"),
        numpy_helper.from_array(np.array(s32, np.float32), "s"),
        numpy_helper.from_array(np.array(zp, np.uint8), "z"),
    ]
    nodes = [
        helper.make_node("Clip", ["x", "lo", "hi"], ["xc"]),
        helper.make_node("QuantizeLinear", ["xc", "s", "z"], ["q"]),
        helper.make_node("DequantizeLinear", ["q", "s", "z"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    model.ir_version = 10
    out = session(model).run(None, {"x": x.numpy()})[0]
    np.testing.assert_array_equal(fake_quant_activation(x, scale, zp, 0, qmax).numpy(), out)
