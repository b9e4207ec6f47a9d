"""`bitfleet bench quant`: the quantization core measured on centralised Fashion-MNIST.

Float training, PTQ (max-abs and MSE scales), QAT at 4 and 2 bits, MQAT over {2,3,4,6,8},
and the cost of a QAT step against a float step, all in one run with one seed, so the
ratios are comparable on a noisy machine. QAT and MQAT start from the trained float model,
the usual QAT recipe; weights are quantized per output channel, as in paper 003. The `wa`
section adds activation quantization (paper 003, 5.2-5.3): PTQ (MSE weights and MSE
per-tensor activation ranges, calibrated on training images) against QAT fine-tuned at the
same (weights, activations) widths, and `qat_wa_step_ratio` the cost of a W2A2 QAT step.
"""

from __future__ import annotations

import copy
import random
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from ..data import ImageData, load_dataset
from ..machine import describe_machine, machine_line
from ..models import create_model_for
from ..progress import Progress
from ..quant import MQAT, PTQ, QAT, LocalMethod
from ..training import evaluate, make_optimizer, train, train_step

PTQ_BITS = (8, 6, 4, 3, 2)
QAT_BITS = (4, 2)
MQAT_SET = (2, 3, 4, 6, 8)
EVAL_BITS = (32, 8, 6, 4, 3, 2)
WA_PAIRS = ((2, 2), (2, 3), (4, 2))
"""(weight bits, activation bits) of the activation-quantization comparison."""
WA_CALIB = 256
"""Training images the activation ranges of a deployed model are calibrated on."""


@dataclass(frozen=True)
class QuantBenchConfig:
    fp_epochs: float
    qat_epochs: float
    mqat_epochs: float
    batch_size: int = 64
    lr: float = 1e-3
    seed: int = 0
    timing_warmup: int = 20
    timing_steps: int = 100
    qat_scale: str = "mse"
    qat_step: str = "frozen"
    """QAT's step: MSE-calibrated at the start, then fixed (see `QAT`); the ratio is its cost."""


QUICK = QuantBenchConfig(fp_epochs=8, qat_epochs=5, mqat_epochs=5)
FULL = QuantBenchConfig(fp_epochs=20, qat_epochs=8, mqat_epochs=10)


def _lenet(data: ImageData) -> nn.Module:
    return create_model_for("lenet5", data.spec)


def _accuracy_at(
    model: nn.Module,
    method: LocalMethod,
    bits: int,
    data: ImageData,
    act_bits: int | None = None,
) -> float:
    calib = None if act_bits is None else data.train_x[:WA_CALIB]
    deployed = method.deploy(copy.deepcopy(model), bits, act_bits=act_bits, calib=calib)
    return evaluate(deployed, data.test_x, data.test_y)


def step_times(
    data: ImageData, cfg: QuantBenchConfig, methods: dict[str, LocalMethod]
) -> dict[str, float]:
    """Median step time (seconds) of each method, measured interleaved on the same batches.

    Rotating through the methods step by step, and rotating which goes first, spreads any
    slowdown of the shared machine over all of them, so their ratios hold even when the
    absolute times drift.
    """
    torch.manual_seed(cfg.seed)
    rng = random.Random(cfg.seed)
    runs = []
    calib_gen = torch.Generator().manual_seed(cfg.seed + 1)
    for name, method in methods.items():
        model = method.prepare(_lenet(data))
        method.begin_round(model, rng)
        # Activation ranges are calibrated once at the round start, as `train` does; the
        # steps below then run on frozen ranges.
        calib = torch.randint(len(data.train_x), (cfg.batch_size,), generator=calib_gen)
        method.calibrate(model, [data.train_x[calib]])
        runs.append((name, model, make_optimizer(model, "adam", cfg.lr), method, []))
    gen = torch.Generator().manual_seed(cfg.seed)
    for i in range(cfg.timing_warmup + cfg.timing_steps):
        idx = torch.randint(len(data.train_x), (cfg.batch_size,), generator=gen)
        xb, yb = data.train_x[idx], data.train_y[idx]
        k = i % len(runs)
        for _, model, opt, method, times in runs[k:] + runs[:k]:
            t0 = time.perf_counter()
            train_step(model, opt, method, xb, yb, rng)
            times.append(time.perf_counter() - t0)
    return {name: statistics.median(times[cfg.timing_warmup :]) for name, *_, times in runs}


def run_quant_bench(
    cfg: QuantBenchConfig,
    data_dir: str | Path | None = None,
    progress: Progress | None = None,
) -> dict[str, object]:
    """Run every measurement and return the JSON-ready result (keys fixed by the issue)."""
    progress = progress or Progress(enabled=False)
    start = time.perf_counter()
    torch.manual_seed(cfg.seed)
    data = load_dataset("fashion-mnist", data_dir=data_dir)
    progress.done("data", f"Fashion-MNIST {len(data.train_x)} train / {len(data.test_x)} test")

    def fit(model: nn.Module, method: LocalMethod, epochs: float, lr: float, phase: str) -> None:
        train(
            model,
            data.train_x,
            data.train_y,
            method,
            epochs=epochs,
            batch_size=cfg.batch_size,
            lr=lr,
            seed=cfg.seed,
            lr_schedule="cosine",
            on_step=progress.step_callback(phase),
        )

    fp_model = _lenet(data)
    fit(fp_model, LocalMethod(), cfg.fp_epochs, cfg.lr, "float training")
    fp32_acc = evaluate(fp_model, data.test_x, data.test_y)
    progress.done("float", f"acc {fp32_acc:.4f}")

    ptq: dict[str, dict[str, float]] = {}
    for scale in ("max", "mse"):
        method = PTQ(scale_method=scale)
        ptq[scale] = {str(b): _accuracy_at(fp_model, method, b, data) for b in PTQ_BITS}
        progress.done(f"PTQ {scale}", " ".join(f"{b}b {a:.4f}" for b, a in ptq[scale].items()))

    qat: dict[str, float] = {}
    for bits in QAT_BITS:
        model = copy.deepcopy(fp_model)
        method = QAT(bits=bits, scale_method=cfg.qat_scale, step=cfg.qat_step)
        fit(model, method, cfg.qat_epochs, cfg.lr, f"QAT {bits}-bit")
        qat[str(bits)] = _accuracy_at(model, method, bits, data)
        progress.done(f"QAT {bits}-bit", f"acc {qat[str(bits)]:.4f}")

    model = copy.deepcopy(fp_model)
    method = MQAT(bit_set=MQAT_SET, resample="step", scale_method=cfg.qat_scale, step=cfg.qat_step)
    fit(model, method, cfg.mqat_epochs, cfg.lr, "MQAT")
    mqat = {str(b): _accuracy_at(model, method, b, data) for b in EVAL_BITS}
    progress.done("MQAT", " ".join(f"{b}b {a:.4f}" for b, a in mqat.items()))

    wa: dict[str, dict[str, float]] = {}
    ptq_wa = PTQ(scale_method="mse", act_calibrator="mse")
    for bits, act_bits in WA_PAIRS:
        key = f"W{bits}A{act_bits}"
        model = copy.deepcopy(fp_model)
        method = QAT(bits=bits, act_bits=act_bits, scale_method=cfg.qat_scale, step=cfg.qat_step)
        fit(model, method, cfg.qat_epochs, cfg.lr, f"QAT {key}")
        wa[key] = {
            "ptq": _accuracy_at(fp_model, ptq_wa, bits, data, act_bits),
            "qat": _accuracy_at(model, method, bits, data, act_bits),
        }
        progress.done(f"QAT {key}", f"PTQ {wa[key]['ptq']:.4f} QAT {wa[key]['qat']:.4f}")

    times = step_times(
        data,
        cfg,
        {
            "fp": LocalMethod(),
            "qat": QAT(bits=2, scale_method=cfg.qat_scale, step=cfg.qat_step),
            "qat_wa": QAT(bits=2, act_bits=2, scale_method=cfg.qat_scale, step=cfg.qat_step),
            "qat_learned_mse": QAT(bits=2, scale_method="mse", step="learned"),
            "qat_dynamic_max": QAT(bits=2, scale_method="max", step="dynamic"),
        },
    )
    progress.done("step time", " ".join(f"{k} {v * 1e3:.2f} ms" for k, v in times.items()))

    return {
        "fp32_acc": fp32_acc,
        "ptq": ptq,
        "qat": qat,
        "mqat": mqat,
        "wa": wa,
        "qat_step_ratio": times["qat"] / times["fp"],
        "qat_wa_step_ratio": times["qat_wa"] / times["fp"],
        "step_ms": {k: v * 1e3 for k, v in times.items()},
        "seconds": time.perf_counter() - start,
        "setting": {
            "model": "lenet5",
            "dataset": "fashion-mnist",
            "quantization": "weights only, symmetric per output channel, all Conv2d/Linear",
            "qat": f"step {cfg.qat_step}, {cfg.qat_scale}-calibrated; fine-tuned from float",
            "qat_step_ratio": f"2-bit QAT step ({cfg.qat_step} {cfg.qat_scale} step) / float "
            f"step, LeNet-5, batch 64, Adam, median of {cfg.timing_steps} interleaved steps "
            f"after {cfg.timing_warmup} warm-up; step_ms also has LSQ and max-abs per step",
            "qat_wa_step_ratio": "W2A2 QAT step (weights as qat_step_ratio; every quantized "
            "layer's input fake-quantized per tensor on a range MSE-calibrated at the round "
            "start) / float step, measured in the same interleaved run",
            "wa": "PTQ: MSE weight steps and MSE activation ranges on "
            f"{WA_CALIB} training images; QAT: fine-tuned from float at the pair, ranges "
            "calibrated at its start, recalibrated on the same images at deploy",
            "mqat_bits": list(MQAT_SET),
        },
        "config": asdict(cfg),
        "machine": describe_machine(),
    }


def format_table(result: dict[str, object]) -> str:
    """The readable table printed beside the JSON."""
    ptq = result["ptq"]
    qat = result["qat"]
    mqat = result["mqat"]
    cols = [str(b) for b in EVAL_BITS]

    def row(name: str, accs: dict[str, float]) -> str:
        cells = [f"{accs[c]:.4f}" if c in accs else "   -  " for c in cols]
        return f"| {name:<14} | " + " | ".join(cells) + " |"

    lines = [
        f"machine: {machine_line(result['machine'])}",  # type: ignore[arg-type]
        "",
        "| method         | " + " | ".join(f"{c + ' bit':>6}" for c in cols) + " |",
        "|" + "-" * 16 + "|" + "|".join("-" * 8 for _ in cols) + "|",
        row("float", {"32": result["fp32_acc"]}),  # type: ignore[dict-item]
        row("PTQ max-abs", ptq["max"]),  # type: ignore[index]
        row("PTQ MSE", ptq["mse"]),  # type: ignore[index]
        row("QAT 4-bit", {"4": qat["4"]}),  # type: ignore[index]
        row("QAT 2-bit", {"2": qat["2"]}),  # type: ignore[index]
        row("MQAT {2..8}", mqat),  # type: ignore[arg-type]
        "",
        "| W/A  |  PTQ   |  QAT   |",
        "|------|--------|--------|",
        *(
            f"| {k} | {v['ptq']:.4f} | {v['qat']:.4f} |"
            for k, v in result.get("wa", {}).items()  # type: ignore[attr-defined]
        ),
        "",
        f"QAT step / float step: {result['qat_step_ratio']:.3f}; W2A2 QAT step / float "
        f"step: {result['qat_wa_step_ratio']:.3f}; step ms: "
        + ", ".join(f"{k} {v:.2f}" for k, v in result["step_ms"].items()),  # type: ignore[attr-defined]
        f"total: {result['seconds']:.0f} s",
    ]
    return "\n".join(lines)
