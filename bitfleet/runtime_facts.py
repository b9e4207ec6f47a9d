"""What a board's runtime can run: its onnxruntime, the newest opset it loads, and the CPU
features that decide which of its kernels run (docs/export.md#runtimes).

Boards run the onnxruntime their image ships, often older than the newest, and a file stamped
with an opset the runtime does not know is refused at load (onnxruntime 1.22 loads up to
opset 22; INT2 weights need 25). So the agent probes what its runtime loads and says so at
registration, and the coordinator exports for it. On Arm, onnxruntime's int8 kernels use the
dot-product instructions (`asimddp`, `i8mm`) only where present; on x86, VNNI.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

OPSET_BASE = 21
"""What every exported file needs: onnxruntime 1.20, the oldest `pyproject.toml` admits."""
OPSET_INT2 = 25
"""The first opset with INT2 tensors; below it 2-bit weights travel in INT4 (same numbers)."""
KERNEL_FLAGS = ("asimddp", "i8mm", "avx512_vnni", "avx_vnni")
"""/proc/cpuinfo flags that switch onnxruntime's int8 kernels to dot-product instructions."""

PROBED_OPSETS = range(OPSET_BASE, 31)
"""The opsets `newest_loadable_opset` tries, newest first."""
_VERSION = re.compile(r"\d{1,4}(\.\d{1,4}){1,3}([.+-][0-9A-Za-z.]{1,32})?")


@dataclass(frozen=True)
class RuntimeFacts:
    """A board's onnxruntime version, the newest default-domain opset it loads, and which of
    `KERNEL_FLAGS` its CPU has."""

    onnxruntime: str
    max_opset: int
    cpu_features: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        return {
            "onnxruntime": self.onnxruntime,
            "max_opset": self.max_opset,
            "cpu_features": list(self.cpu_features),
        }

    @classmethod
    def from_dict(cls, raw: Any) -> RuntimeFacts:
        """Read what a board sent; ValueError naming the field for anything implausible."""
        if not isinstance(raw, Mapping):
            raise ValueError("runtime must be an object")
        version, opset = raw.get("onnxruntime"), raw.get("max_opset")
        features = raw.get("cpu_features", [])
        if not isinstance(version, str) or _VERSION.fullmatch(version) is None:
            raise ValueError(f"runtime.onnxruntime must be a version like 1.22.1, got {version!r}")
        if type(opset) is not int or opset not in PROBED_OPSETS:
            raise ValueError(
                f"runtime.max_opset must be in {PROBED_OPSETS.start}.."
                f"{PROBED_OPSETS.stop - 1}, got {opset!r}"
            )
        if not isinstance(features, list) or not all(f in KERNEL_FLAGS for f in features):
            raise ValueError(f"runtime.cpu_features must be a list from {list(KERNEL_FLAGS)}")
        return cls(version, opset, tuple(sorted(set(features))))


def probe_model(opset: int) -> Any:
    """A one-node model (Identity, any input shape) stamped with `opset`: a runtime that loads
    it knows that opset (the runtime states no such number itself)."""
    from onnx import TensorProto, helper

    value = helper.make_tensor_value_info("x", TensorProto.FLOAT, None)
    out = helper.make_tensor_value_info("y", TensorProto.FLOAT, None)
    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "probe", [value], [out])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 10  # what onnxruntime 1.20 reads; opsets do not need more
    return model


def newest_loadable_opset() -> int:
    """The newest opset this process's onnxruntime loads (`probe_model`); `OPSET_BASE - 1` if
    it loads none of them."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 4
    for opset in reversed(PROBED_OPSETS):
        try:
            ort.InferenceSession(
                probe_model(opset).SerializeToString(), options, providers=["CPUExecutionProvider"]
            )
        except Exception:  # noqa: BLE001 - "cannot load" is the answer, whatever the wording
            continue
        return opset
    return OPSET_BASE - 1


def probe_runtime() -> RuntimeFacts:
    """This machine's `RuntimeFacts`, as an agent registers them."""
    import onnxruntime as ort

    from .machine import cpu_flags

    flags = cpu_flags()
    return RuntimeFacts(
        ort.__version__, newest_loadable_opset(), tuple(f for f in KERNEL_FLAGS if f in flags)
    )
