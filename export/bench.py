"""`bitfleet bench export`: our quantized ONNX files against float and onnxruntime's quantizer.

Two models (LeNet-5 trained briefly on Fashion-MNIST; a random CIFAR-style ResNet-18 for size
and speed), six variants of ours and onnxruntime's `quantize_static` (QDQ, per channel,
MinMax and Percentile) on the same fp32 file. Latencies of all variants of a model are taken
interleaved, one run of each in turn, so their ratios hold on a noisy machine.
"""

from __future__ import annotations

import copy
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import torch
from torch import nn

from bitfleet.data import load_dataset
from bitfleet.machine import describe_machine, machine_line
from bitfleet.models import create_model
from bitfleet.onnx_session import ort_int8_qdq
from bitfleet.progress import Progress
from bitfleet.quant import PTQ, LocalMethod
from bitfleet.training import train

from .api import export_model
from .fold import prepare_for_export
from .qdq import float_graph
from .runtime import run_batches, session

VARIANTS = {
    # name: (bits, storage, 8-bit activations)
    "int8_qdq": (8, "int8", True),
    "int8_weight_only": (8, "int8", False),
    "int4_int8storage": (4, "int8", True),
    "int4_packed": (4, "packed", False),
    "int2_packed": (2, "packed", False),
}
PEERS = {"ort_quantize_static_minmax": "MinMax", "ort_quantize_static_percentile": "Percentile"}


@dataclass(frozen=True)
class ExportBenchConfig:
    lenet_epochs: float
    calib: int
    runs: int
    warmup: int = 5
    eval_samples: int | None = None
    seed: int = 0


QUICK = ExportBenchConfig(lenet_epochs=2, calib=128, runs=50)
FULL = ExportBenchConfig(lenet_epochs=8, calib=512, runs=100)


def _ort_peer(fp32_path: Path, out: Path, calib: np.ndarray, method: str) -> Path:
    feeds = [{"pixels": calib[i : i + 32]} for i in range(0, len(calib), 32)]
    return ort_int8_qdq(fp32_path, out, feeds, method)


def _interleaved_latency(
    sessions: dict[str, object], batch: int, shape: tuple[int, ...], runs: int, warmup: int
) -> dict[str, float]:
    x = np.random.default_rng(0).random((batch, *shape), dtype=np.float32)
    times: dict[str, list[float]] = {k: [] for k in sessions}
    names = list(sessions)
    for i in range(warmup + runs):
        k = i % len(names)
        for name in names[k:] + names[:k]:
            sess = sessions[name]
            inp = sess.get_inputs()[0].name  # type: ignore[attr-defined]
            t0 = time.perf_counter()
            sess.run(None, {inp: x})  # type: ignore[attr-defined]
            if i >= warmup:
                times[name].append(time.perf_counter() - t0)
    return {k: statistics.median(v) * 1e3 for k, v in times.items()}


def _bench_model(
    name: str,
    model: nn.Module,
    shape: tuple[int, int, int],
    calib: np.ndarray,
    test: tuple[np.ndarray, np.ndarray] | None,
    cfg: ExportBenchConfig,
    tmp: Path,
    progress: Progress,
) -> dict[str, dict]:
    """Export every variant, run the peers, and measure them all side by side."""
    files: dict[str, Path] = {}
    refs: dict[str, nn.Module] = {}
    notes: dict[str, list[str]] = {}
    fp = copy.deepcopy(model)
    LocalMethod().prepare(fp)
    plain, _ = prepare_for_export(fp, shape)
    files["fp32"] = tmp / f"{name}-fp32.onnx"
    onnx.save(float_graph(plain, shape), files["fp32"])
    refs["fp32"] = fp
    for variant, (bits, storage, acts) in VARIANTS.items():
        q = copy.deepcopy(model)
        method = PTQ(scale_method="mse")
        method.prepare(q)
        method.deploy(q, bits)
        result = export_model(
            q, tmp / f"{name}-{variant}.onnx", shape, storage=storage, activations=acts, calib=calib
        )
        files[variant], refs[variant] = result.path, q
        notes[variant] = result.float_layers
        progress.done(f"{name} {variant}", f"float layers: {result.float_layers or 'none'}")
    for peer, method in PEERS.items():
        files[peer] = _ort_peer(files["fp32"], tmp / f"{name}-{peer}.onnx", calib, method)
        refs[peer] = fp
        progress.done(f"{name} {peer}", "quantize_static done")

    sessions = {k: session(str(p)) for k, p in files.items()}
    lat1 = _interleaved_latency(sessions, 1, shape, cfg.runs, cfg.warmup)
    lat32 = _interleaved_latency(sessions, 32, shape, cfg.runs, cfg.warmup)
    progress.done(f"{name} latency", f"{cfg.runs} interleaved runs at batch 1 and 32")
    eval_x = test[0] if test is not None else calib
    out: dict[str, dict] = {}
    for variant, path in files.items():
        logits = run_batches(sessions[variant], eval_x)
        with torch.no_grad():
            ref = refs[variant].eval()(torch.from_numpy(eval_x)).numpy()
        out[variant] = {
            "bytes": path.stat().st_size,
            "lat_b1_ms": lat1[variant],
            "lat_b32_ms": lat32[variant],
            "acc": float((logits.argmax(1) == test[1]).mean()) if test is not None else None,
            "agree": float((logits.argmax(1) == ref.argmax(1)).mean()),
            "float_layers": notes.get(variant, []),
        }
    return out


def run_export_bench(
    cfg: ExportBenchConfig, data_dir: str | Path | None = None, progress: Progress | None = None
) -> dict[str, object]:
    progress = progress or Progress(enabled=False)
    start = time.perf_counter()
    torch.manual_seed(cfg.seed)
    data = load_dataset("fashion-mnist", data_dir=data_dir)
    spec = data.spec
    lenet = create_model("lenet5", mean=spec.mean, std=spec.std)
    train(lenet, data.train_x, data.train_y, LocalMethod(), epochs=cfg.lenet_epochs, seed=cfg.seed)
    progress.done("LeNet-5 trained", f"{cfg.lenet_epochs} epochs")
    rng = np.random.default_rng(cfg.seed)
    pick = rng.choice(len(data.train_x), cfg.calib, replace=False)
    calib = data.train_x[pick].float().div(255).numpy()
    n = cfg.eval_samples or len(data.test_x)
    test = (data.test_x[:n].float().div(255).numpy(), data.test_y[:n].numpy())
    torch.manual_seed(cfg.seed)
    resnet = create_model("resnet18", num_classes=10, in_channels=3, image_size=32).eval()
    resnet_calib = rng.random((cfg.calib, 3, 32, 32), dtype=np.float32)
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        results = {
            "lenet5_fmnist": _bench_model(
                "lenet5_fmnist", lenet.eval(), (1, 28, 28), calib, test, cfg, tmp, progress
            ),
            "resnet18_cifar": _bench_model(
                "resnet18_cifar", resnet, (3, 32, 32), resnet_calib, None, cfg, tmp, progress
            ),
        }
    return {
        **results,
        "seconds": time.perf_counter() - start,
        "setting": {
            "threads": 2,
            "latency": f"median of {cfg.runs} runs after {cfg.warmup} warm-up, all variants of "
            "a model interleaved",
            "weights": "PTQ, MSE scales, per output channel; int8_qdq/int4_int8storage add "
            "uint8 per-tensor activations",
            "peers": "onnxruntime quantize_static, QDQ, per channel, QUInt8 activations, QInt8 "
            "weights, after quant_pre_process",
        },
        "machine": describe_machine(),
    }


def format_table(result: dict[str, object]) -> str:
    lines = [f"machine: {machine_line(result['machine'])}", ""]  # type: ignore[arg-type]
    for model in ("lenet5_fmnist", "resnet18_cifar"):
        rows = result[model]
        fp = rows["fp32"]  # type: ignore[index]
        lines += [
            f"{model}",
            "| variant | bytes | x fp32 | b1 ms | b32 ms | x fp32 | acc | agree | float layers |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for variant, r in rows.items():  # type: ignore[attr-defined]
            acc = f"{r['acc']:.4f}" if r["acc"] is not None else "-"
            lines.append(
                f"| {variant} | {r['bytes']} | {r['bytes'] / fp['bytes']:.3f} | "
                f"{r['lat_b1_ms']:.3f} | {r['lat_b32_ms']:.3f} | "
                f"{r['lat_b32_ms'] / fp['lat_b32_ms']:.3f} | {acc} | {r['agree']:.4f} | "
                f"{len(r.get('float_layers', []))} |"
            )
        lines.append("")
    lines.append(f"total: {result['seconds']:.0f} s")
    return "\n".join(lines)
