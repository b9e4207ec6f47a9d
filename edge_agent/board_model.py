"""How long a deploy candidate would take on the board a virtual agent stands for.

A virtual board (the demo's and the simulator's agents, which run on this host but stand for a
Pi or a Jetson) cannot time a candidate file on the board itself. It times the file on the host
and scales that time to its board by the ratio of the board's published ResNet-18 latency (ncnn's
`benchmark/README.md`, the profile's `resnet18_ms` / `resnet18_int8_ms`, which the profile file
cites) to the host's own ResNet-18 latency measured with the same runtime the candidate ran on
(onnxruntime, CPU, batch 1): the host anchor. The assumption is that a candidate costs the same
multiple of a ResNet-18 on the board as on the host; the board's figure is ncnn's, not
onnxruntime's, because it is the public measurement there is for every board in bitfleet.

The anchor costs a few seconds to measure, so it is measured once per host CPU, onnxruntime
version and thread count, and cached as JSON (`host_anchor`).
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import statistics
import tempfile
import threading
import time
import warnings
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from bitfleet.cache import cache_dir as bitfleet_cache_dir
from bitfleet.cache import cpu_name, file_lock, read_json, write_json
from bitfleet.profiles import DeviceProfile

__all__ = [
    "CACHE_FILE",
    "HostAnchor",
    "board_latency_ms",
    "host_anchor",
    "measure_host_anchor",
]

log = logging.getLogger(__name__)

CACHE_FILE = "host_anchor.json"
INPUT_SHAPE = (1, 3, 224, 224)
OPSET = 17
WARMUP = 5
RUNS = 20
CALIBRATION_INPUTS = 4

_lock = threading.Lock()  # one measurement at a time in a process: agents share the CPU


@dataclass(frozen=True)
class HostAnchor:
    """This host's ResNet-18 latencies in onnxruntime (ms, batch 1, median) and what they were
    measured on: `threads` (intra-op), `cpu` (model name) and `onnxruntime` (its version)."""

    resnet18_ms: float
    resnet18_int8_ms: float
    threads: int
    cpu: str
    onnxruntime: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> HostAnchor:
        """An anchor as `to_dict()` wrote it; a `ValueError` for anything else."""
        if not isinstance(data, Mapping) or set(data) != {*cls.__dataclass_fields__}:
            raise ValueError(f"expected a table of {', '.join(cls.__dataclass_fields__)}")
        for key in ("resnet18_ms", "resnet18_int8_ms"):
            v = data[key]
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 < v < math.inf:
                raise ValueError(f"{key}: expected a positive finite number, got {v!r}")
        threads = data["threads"]
        if type(threads) is not int or threads < 1:
            raise ValueError(f"threads: expected a positive integer, got {threads!r}")
        if not isinstance(data["cpu"], str) or not isinstance(data["onnxruntime"], str):
            raise ValueError("cpu and onnxruntime: expected strings")
        return cls(
            resnet18_ms=float(data["resnet18_ms"]),
            resnet18_int8_ms=float(data["resnet18_int8_ms"]),
            threads=threads,
            cpu=data["cpu"],
            onnxruntime=data["onnxruntime"],
        )


def board_latency_ms(
    host_ms: float, integer_kernels: bool, board: DeviceProfile, anchor: HostAnchor
) -> float:
    """A file's latency on `board`, from its latency `host_ms` measured on this host.

    One rule: `host_ms` times board / host ResNet-18 latency, where the board's figure is the
    one its profile cites from ncnn's benchmark table (`resnet18_ms`) and the host's is
    measured here in onnxruntime (`anchor`). A file that runs on integer kernels scales by the
    int8 figures (`resnet18_int8_ms` over the anchor's int8 latency) where the board has one,
    else by the fp32 ones.
    """
    if not 0 <= host_ms < math.inf:
        raise ValueError(f"host_ms must be a finite latency >= 0, got {host_ms!r}")
    if integer_kernels and board.resnet18_int8_ms is not None:
        return host_ms * board.resnet18_int8_ms / anchor.resnet18_int8_ms
    return host_ms * board.resnet18_ms / anchor.resnet18_ms


# ---------------------------------------------------------------------------------------------
# Measuring this host


def _threads(threads: int) -> int:
    if type(threads) is not int or threads < 1:
        raise ValueError(f"threads must be a positive integer, got {threads!r}")
    return min(threads, os.cpu_count() or 1)


def _export_resnet18(path: Path) -> None:
    import torch
    import torchvision

    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = torchvision.models.resnet18(weights=None).eval()
        x = torch.rand(*INPUT_SHAPE)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        # The TorchScript exporter: the dynamo one needs onnxscript, which bitfleet lacks.
        torch.onnx.export(
            model,
            (x,),
            str(path),
            dynamo=False,
            input_names=["input"],
            output_names=["logits"],
            opset_version=OPSET,
        )


def _quantize(fp32: Path, out: Path) -> None:
    """onnxruntime's static int8 QDQ file of `fp32`, calibrated on a few random inputs."""
    import numpy as np

    from bitfleet.onnx_session import ort_int8_qdq

    rng = np.random.default_rng(0)
    feeds = [
        {"input": rng.random(INPUT_SHAPE, dtype=np.float32)} for _ in range(CALIBRATION_INPUTS)
    ]
    ort_int8_qdq(fp32, out, feeds)


def _median_ms(path: Path, threads: int) -> float:
    """Median ms of one batch-1 run of the file in onnxruntime's CPU provider: `WARMUP` runs,
    then `RUNS` timed ones. One session at a time: two sessions' spinning thread pools would
    share the cores and slow each other down."""
    import numpy as np
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.log_severity_level = 3
    sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    feed = {sess.get_inputs()[0].name: np.random.default_rng(1).random(INPUT_SHAPE, "float32")}
    times = []
    for i in range(WARMUP + RUNS):
        t0 = time.perf_counter()
        sess.run(None, feed)
        if i >= WARMUP:
            times.append(time.perf_counter() - t0)
    del sess  # its threads go before the next file's start
    return statistics.median(times) * 1e3


@contextlib.contextmanager
def _quiet_root_logger() -> Iterator[None]:
    """onnxruntime.quantization warns through the root logger (one line per Conv)."""
    root = logging.getLogger()
    before = root.level
    root.setLevel(max(before, logging.ERROR))
    try:
        yield
    finally:
        root.setLevel(before)


def measure_host_anchor(threads: int = 4) -> HostAnchor:
    """Measure this host's anchor: torchvision's ResNet-18 (random weights, eval, 1x3x224x224)
    exported to ONNX and its onnxruntime `quantize_static` int8 file (QDQ, QUInt8 activations,
    QInt8 per-channel weights), each timed in onnxruntime's CPU provider on
    min(`threads`, CPUs) intra-op threads. A few seconds; files go to a temporary folder."""
    import onnxruntime as ort

    n = _threads(threads)
    with tempfile.TemporaryDirectory(prefix="bitfleet-anchor-") as tmp:
        fp32, int8 = Path(tmp) / "resnet18.onnx", Path(tmp) / "resnet18_int8.onnx"
        _export_resnet18(fp32)
        with _quiet_root_logger():
            _quantize(fp32, int8)
        # The least disturbed of three medians: the anchor is cached, so a busy moment while
        # it is measured would skew every later board figure on this host.
        fp32_ms = min(_median_ms(fp32, n) for _ in range(3))
        int8_ms = min(_median_ms(int8, n) for _ in range(3))
    return HostAnchor(
        resnet18_ms=fp32_ms,
        resnet18_int8_ms=int8_ms,
        threads=n,
        cpu=cpu_name(),
        onnxruntime=ort.__version__,
    )


# ---------------------------------------------------------------------------------------------
# The cache


def _read_cached(path: Path, cpu: str, runtime: str, threads: int) -> HostAnchor | None:
    """The cached anchor if it is readable and was measured on this CPU, runtime and thread
    count; None (measure anew) otherwise."""
    raw = read_json(path)
    if raw is None:
        return None
    try:
        anchor = HostAnchor.from_dict(raw)
    except (TypeError, ValueError) as exc:
        log.warning("host anchor cache %s unreadable (%s): measuring anew", path, exc)
        return None
    if (anchor.cpu, anchor.onnxruntime, anchor.threads) != (cpu, runtime, threads):
        log.info("host anchor cache %s is for another host or runtime: measuring anew", path)
        return None
    return anchor


def host_anchor(cache_dir: Path | None = None, *, threads: int = 4) -> HostAnchor:
    """This host's anchor, measured once per (CPU model, onnxruntime version, threads).

    Cached as `host_anchor.json` in `cache_dir`, else $BITFLEET_CACHE_DIR, else
    $XDG_CACHE_HOME/bitfleet, else ~/.cache/bitfleet. A corrupt cache file, or one measured on
    another CPU, runtime or thread count, is measured anew and replaced.
    """
    import onnxruntime as ort

    n = _threads(threads)
    path = bitfleet_cache_dir(cache_dir) / CACHE_FILE
    cpu, runtime = cpu_name(), ort.__version__
    with _lock, file_lock(path.with_name(f".{path.name}.lock")):
        anchor = _read_cached(path, cpu, runtime, n)
        if anchor is None:
            t0 = time.perf_counter()
            anchor = measure_host_anchor(threads=n)
            log.info(
                "host anchor: ResNet-18 %.2f ms, int8 %.2f ms on %d threads (%.1f s to measure)",
                anchor.resnet18_ms,
                anchor.resnet18_int8_ms,
                anchor.threads,
                time.perf_counter() - t0,
            )
            write_json(path, anchor.to_dict())
        return anchor
