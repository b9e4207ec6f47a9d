"""onnxruntime sessions as every role opens them: the exporter, the coordinator scoring deploy
candidates, the agent timing them on its board (docs/export.md#deploy-candidates).

One way to open a file matters because a file states the session settings it wants in its
metadata (weight-only files ask onnxruntime to fold their DequantizeLinear nodes once at load):
a candidate timed or scored without them would be measured as another model than the one run.
"""

from __future__ import annotations

import json
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

SESSION_CONFIG_KEY = "bitfleet.ort_session_config"
"""Metadata key of the onnxruntime session settings a file wants (JSON object)."""
ACTIVATIONS_KEY = "bitfleet.activations"
"""Metadata key saying how a file's activations run: "uint8 per-tensor" on integer kernels,
"<b>-bit per-tensor (Q/DQ)" as Q/DQ pairs computed in float, "float" without."""


def session(model: Any, threads: int = 2) -> Any:
    """A CPU session with full graph optimisation and the settings the file asks for.

    `model` is an `onnx.ModelProto`, the file's bytes or its path; `threads` 0 lets
    onnxruntime use every core.
    """
    import onnx
    import onnxruntime as ort

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


def run_batches(sess: Any, x: np.ndarray, batch: int = 500) -> np.ndarray:
    """The session's logits for `x`, run `batch` samples at a time."""
    name = sess.get_inputs()[0].name
    return np.concatenate(
        [sess.run(None, {name: x[i : i + batch]})[0] for i in range(0, len(x), batch)]
    )


def latency_ms(
    sess: Any, batch: int, shape: tuple[int, ...], runs: int = 50, warmup: int = 5
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


@dataclass(frozen=True)
class FileTiming:
    """One file on this machine: batch-1 latency (median after warm-up), the memory its
    session added to the process, and whether it computes on integer kernels."""

    latency_ms: float
    memory_bytes: int
    integer_kernels: bool


BLOCK_SECONDS = 0.02
"""Each timed block runs at least this long: a 30 us model gets hundreds of runs per median,
so that the scheduler's noise does not decide between two files of the same speed."""


def time_file(blob: bytes, threads: int = 0, runs: int = 20, warmup: int = 5) -> FileTiming:
    """Open `blob` as a board runs it and time it at batch 1: the least of three medians, each
    of at least `runs` runs and `BLOCK_SECONDS`, after warm-up, so that a moment of other load
    does not decide a choice.

    Memory is the process's resident size after loading and running, less before: what the
    session and its buffers cost (peak inside onnxruntime's arena is not visible from here).
    """
    import onnx
    import psutil

    proto = onnx.load_model_from_string(blob)
    props = {p.key: p.value for p in proto.metadata_props}
    proc = psutil.Process()
    before = proc.memory_info().rss
    sess = session(proto, threads)
    dims = sess.get_inputs()[0].shape[1:]
    shape = tuple(int(d) if isinstance(d, int) else 1 for d in dims)
    first = latency_ms(sess, 1, shape, runs=3, warmup=warmup)
    n = min(2000, max(runs, int(BLOCK_SECONDS * 1e3 / max(first, 1e-3))))
    ms = min(latency_ms(sess, 1, shape, runs=n, warmup=0) for _ in range(3))
    grown = max(0, proc.memory_info().rss - before)
    del sess
    # Only uint8 activations run on integer kernels; "float" and the Q/DQ emulation of
    # narrower trained activations ("2-bit per-tensor (Q/DQ)") compute in float.
    return FileTiming(ms, grown, props.get(ACTIVATIONS_KEY, "float") == "uint8 per-tensor")


def ort_int8_qdq(
    fp32: str | Path, out: str | Path, feeds: list[dict[str, np.ndarray]], method: str = "MinMax"
) -> Path:
    """onnxruntime's own static int8 file of `fp32` (QDQ, uint8 activations, int8 per-channel
    weights), calibrated on `feeds` with `method` (a `CalibrationMethod` name): the reference
    the exporter is benchmarked against, and the int8 anchor of the board model.

    `quant_pre_process` first: a graph whose Conv biases pass through Identity nodes (the
    exporter's folded BatchNorms) would otherwise keep float biases and miss integer kernels.
    """
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.feeds = iter(feeds)

        def get_next(self) -> dict | None:
            return next(self.feeds, None)

    out = Path(out)
    pre = out.with_name(out.stem + ".pre.onnx")
    quant_pre_process(str(fp32), str(pre))
    quantize_static(
        str(pre),
        str(out),
        Reader(),
        quant_format=QuantFormat.QDQ,
        per_channel=True,
        activation_type=QuantType.QUInt8,
        weight_type=QuantType.QInt8,
        calibrate_method=getattr(CalibrationMethod, method),
    )
    return out
