"""onnxruntime helpers of the exporter: the shared session helpers (`bitfleet.onnx_session`)
and the calibration ranges only the exporter needs."""

from __future__ import annotations

import numpy as np
import onnx

from bitfleet.onnx_session import SESSION_CONFIG_KEY, latency_ms, run_batches, session

__all__ = ["SESSION_CONFIG_KEY", "latency_ms", "run_batches", "session", "tensor_ranges"]


def tensor_ranges(
    model: onnx.ModelProto, tensors: set[str], x: np.ndarray, batch: int = 100
) -> dict[str, tuple[float, float]]:
    """Observed (min, max) of intermediate tensors on calibration inputs `x`."""
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    known = {o.name for o in probe.graph.output}
    for t in sorted(tensors - known):
        probe.graph.output.append(onnx.helper.make_empty_tensor_value_info(t))
    sess = session(probe)
    names = [o.name for o in sess.get_outputs()]
    lo = dict.fromkeys(tensors, np.inf)
    hi = dict.fromkeys(tensors, -np.inf)
    inp = sess.get_inputs()[0].name
    for i in range(0, len(x), batch):
        for name, value in zip(names, sess.run(None, {inp: x[i : i + batch]}), strict=True):
            if name in tensors:
                lo[name] = min(lo[name], float(value.min()))
                hi[name] = max(hi[name], float(value.max()))
    return {t: (lo[t], hi[t]) for t in tensors}
