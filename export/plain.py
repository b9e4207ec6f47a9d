"""A plain ONNX export: the float graph with weights already on their b-bit grid.

The end-of-job model until the quantized QDQ exporter (export issue) lands: it carries the
exact numbers of the quantized PyTorch model, takes [0, 1] pixels with normalisation inside,
and states its bits and provenance in the metadata, but stores weights as float32.
"""

from __future__ import annotations

import json
import os
import tempfile
import warnings
from collections.abc import Mapping
from pathlib import Path

import onnx
import torch
from torch import nn

from bitfleet.quant import dequantized_copy, quant_layers

OPSET = 17


def export_plain_onnx(
    model: nn.Module,
    path: str | Path,
    input_shape: tuple[int, int, int],
    metadata: Mapping[str, object] | None = None,
) -> Path:
    """Write `model` (quantization-aware or not) as ONNX at `path`, atomically; return the path.

    `input_shape` is (channels, height, width); the batch dimension is dynamic.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    bits = {name: layer.bits for name, layer in quant_layers(model).items()}
    plain = dequantized_copy(model) if bits else model.eval()
    dummy = torch.rand(1, *input_shape)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".onnx", dir=path.parent)
    os.close(fd)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            torch.onnx.export(
                plain,
                (dummy,),
                tmp,
                dynamo=False,
                input_names=["pixels"],
                output_names=["logits"],
                dynamic_axes={"pixels": {0: "batch"}, "logits": {0: "batch"}},
                opset_version=OPSET,
            )
        proto = onnx.load(tmp)
        props = {
            "bitfleet.input": "NCHW float32 pixels in [0, 1]; normalisation is in the graph",
            "bitfleet.bits_per_layer": json.dumps(bits),
            "bitfleet.storage": "float32",
            **{
                f"bitfleet.{k}": v if isinstance(v, str) else json.dumps(v)
                for k, v in (metadata or {}).items()
            },
        }
        onnx.helper.set_model_props(proto, props)
        onnx.checker.check_model(proto)
        onnx.save(proto, tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path
