"""onnxruntime helpers shared by the exporter, `--verify` and `bitfleet bench export`."""

from __future__ import annotations

import json
import statistics
import time

import numpy as np
import onnx
import onnxruntime as ort

SESSION_CONFIG_KEY = "bitfleet.ort_session_config"
"""Metadata key of the onnxruntime session settings a file wants (JSON object)."""


def session(model: onnx.ModelProto | bytes | str, threads: int = 2) -> ort.InferenceSession:
    """A CPU session with full graph optimisation and the settings the file asks for.

    Weight-only files ask for `session.disable_quant_qdq = 1`: onnxruntime then folds their
    DequantizeLinear nodes into float weights once at load instead of on every run.
    """
    if isinstance(model, onnx.ModelProto):
        proto = model
    elif isinstance(model, bytes):
        proto = onnx.load_model_from_string(model)
    else:
        proto = onnx.load(model)
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.log_severity_level = 3
    props = {p.key: p.value for p in proto.metadata_props}
    for key, value in json.loads(props.get(SESSION_CONFIG_KEY, "{}")).items():
        opts.add_session_config_entry(key, str(value))
    return ort.InferenceSession(proto.SerializeToString(), opts, providers=["CPUExecutionProvider"])


def run_batches(sess: ort.InferenceSession, x: np.ndarray, batch: int = 500) -> np.ndarray:
    name = sess.get_inputs()[0].name
    return np.concatenate(
        [sess.run(None, {name: x[i : i + batch]})[0] for i in range(0, len(x), batch)]
    )


def latency_ms(
    sess: ort.InferenceSession, batch: int, shape: tuple[int, ...], runs: int = 50, warmup: int = 5
) -> float:
    """Median wall time of one inference at `batch` (random input), after warm-up."""
    name = sess.get_inputs()[0].name
    x = np.random.default_rng(0).random((batch, *shape), dtype=np.float32)
    for _ in range(warmup):
        sess.run(None, {name: x})
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        sess.run(None, {name: x})
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


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
