"""`bitfleet bench arm64`: every export variant in onnxruntime's aarch64 build, under user-mode
emulation as a Pi 4 (cortex-a72, no dot products) and a Pi 5 (cortex-a76, asimddp)
(docs/export.md#runtimes; `export/emulation.py`, set up by `scripts/arm64_runtime.sh`).

The files: LeNet-5 trained briefly on real Fashion-MNIST, every variant of `export.bench`
exported for the newest opsets and for opset 21 (`export_variants`, which the tests share).
The variants with 8-bit activations come twice: as the exporter chooses (`float_layers="auto"`
times integer against float kernels on the exporting machine, and on x86 float tends to win,
so the file computes in float) and with integer kernels forced, which are the ones whose
kernels differ with and without dot products.
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from bitfleet.progress import Progress

    from .emulation import Emulated

#: How the variants with 8-bit activations choose their kernels, and the name suffix each
#: choice gets: "auto" as the exporter measures on this machine (no suffix; machine-dependent,
#: so a test should not rely on it), every layer in float, every layer on integer kernels.
KERNELS: dict[str, str] = {"auto": "", "float": "-floatkernels", "integer": "-intkernels"}


@dataclass
class Variants:
    """Exported files by name (e.g. "int8_qdq-opset21"), PyTorch's logits for each, the test
    pixels they were computed on (N, 1, 28, 28 float32 in [0, 1]) and each file's opset."""

    files: dict[str, Path]
    reference: dict[str, np.ndarray]
    pixels: np.ndarray
    opsets: dict[str, int]


def export_variants(
    out: Path,
    images: int = 1000,
    kernels: Sequence[str] = ("auto", "integer"),
    data_dir: str | None = None,
) -> Variants:
    """Train LeNet-5 for one epoch on 4000 Fashion-MNIST images (seed 0) and export every
    variant for opset 25 and 21 into `out`, those with 8-bit activations once per choice in
    `kernels` (keys of `KERNELS`; the name gets its suffix)."""
    import torch

    from bitfleet.data import load_dataset
    from bitfleet.models import create_model
    from bitfleet.quant import PTQ, LocalMethod, quant_layers
    from bitfleet.runtime_facts import OPSET_BASE, OPSET_INT2
    from bitfleet.training import train

    from .api import export_model
    from .bench import VARIANTS

    data = load_dataset("fashion-mnist", data_dir=data_dir)
    torch.manual_seed(0)
    model = create_model("lenet5")
    train(model, data.train_x[:4000], data.train_y[:4000], LocalMethod(), epochs=1, seed=0)
    calib = data.train_x[:128].float().div(255).numpy()
    x = data.test_x[:images].float().div(255).numpy()
    found = Variants({}, {}, x, {})
    for opset in (OPSET_INT2, OPSET_BASE):
        for variant, (bits, storage, acts) in VARIANTS.items():
            for kernel in kernels if acts else ("auto",):
                q = copy.deepcopy(model)
                method = PTQ(scale_method="mse")
                method.prepare(q)
                method.deploy(q, bits)
                float_layers: str | set[str] = {
                    "auto": "auto",
                    "float": set(quant_layers(q)),
                    "integer": set(),
                }[kernel]
                name = f"{variant}{KERNELS[kernel] if acts else ''}-opset{opset}"
                result = export_model(
                    q, out / f"{name}.onnx", (1, 28, 28), storage=storage, activations=acts,
                    calib=calib, max_opset=opset, float_layers=float_layers,
                )  # fmt: skip
                with torch.no_grad():
                    found.reference[name] = q.eval()(torch.from_numpy(x)).numpy()
                found.files[name] = result.path
                found.opsets[name] = file_opset(result.path)
    return found


def file_opset(path: Path) -> int:
    """The default-domain opset a file is stamped with: what a runtime must know to load it."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    return max(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))


def opset_probes(out: Path) -> dict[int, Path]:
    """`bitfleet.runtime_facts.probe_model` per probed opset, as files for a runtime in another
    interpreter: the newest that runtime runs is the newest opset it loads."""
    import onnx

    from bitfleet.runtime_facts import PROBED_OPSETS, probe_model

    probes: dict[int, Path] = {}
    for opset in PROBED_OPSETS:
        probes[opset] = out / f"probe-opset{opset}.onnx"
        onnx.save(probe_model(opset), probes[opset])
    return probes


def newest_opset(emulated: Emulated, probes: dict[int, Path], timeout_s: float = 300) -> int:
    """The newest opset the emulated runtime loads."""
    run = emulated.run(list(probes.values()), np.zeros((1, 1), np.float32), timeout_s=timeout_s)
    loaded = [opset for opset, path in probes.items() if str(path) in run.logits]
    return max(loaded, default=min(probes) - 1)


def run_arm64_bench(
    cpus: Sequence[str],
    images: int = 1000,
    data_dir: str | None = None,
    progress: Progress | None = None,
) -> dict[str, object]:
    """Per CPU: the runtime's versions and flags, the newest opset it loads, and per file
    whether it loads, its agreement with PyTorch and the seconds its own run took (interpreter
    start, load, `images` images at batch 256, one thread)."""
    import tempfile

    from bitfleet.progress import Progress

    from .emulation import CPUS, arm64_command
    from .runtimes import agreement

    progress = progress or Progress(enabled=False)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bitfleet-arm64-") as tmp:
        variants = export_variants(Path(tmp), images, data_dir=data_dir)
        probes = opset_probes(Path(tmp))
        progress.done("exported", f"{len(variants.files)} files, {images} test images")
        per_cpu: dict[str, dict] = {}
        for cpu in cpus:
            emulated = arm64_command(cpu)
            t0 = time.perf_counter()
            emulated.run([], variants.pixels[:1])
            start_s = time.perf_counter() - t0
            rows: dict[str, dict] = {}
            for name, path in variants.files.items():
                t0 = time.perf_counter()
                run = emulated.run([path], variants.pixels)
                seconds = time.perf_counter() - t0
                logits = run.logits.get(str(path))
                rows[name] = {
                    "opset": variants.opsets[name],
                    "loads": logits is not None,
                    "agree": None
                    if logits is None
                    else agreement(logits, variants.reference[name]),
                    "error": run.errors.get(str(path)),
                    "seconds": seconds,
                }
            per_cpu[cpu] = {
                "board": CPUS.get(cpu, ""),
                "onnxruntime": run.onnxruntime,
                "versions": emulated.versions,
                "hwcap": emulated.features(),
                "newest_opset": newest_opset(emulated, probes),
                "interpreter_start_s": start_s,
                "files": rows,
            }
            progress.done(cpu, f"{len(rows)} files")
    return {"cpus": per_cpu, "images": images, "seconds": time.perf_counter() - start}


def format_table(result: dict[str, object]) -> str:
    cpus: dict[str, dict] = result["cpus"]  # type: ignore[assignment]
    lines = []
    for cpu, info in cpus.items():
        flags = ",".join(k for k, v in info["hwcap"].items() if v) or "none"
        v = info["versions"]
        lines.append(
            f"{cpu} ({info['board']}): HWCAP dot products: {flags}; onnxruntime "
            f"{info['onnxruntime']} (newest opset {info['newest_opset']}), numpy {v.get('numpy')}, "
            f"Debian python {v.get('debian_python')}, {v.get('qemu')}; interpreter start "
            f"{info['interpreter_start_s']:.1f} s"
        )
    lines += [
        "",
        f"{result['images']} Fashion-MNIST test images; agreement: top-1 equal to PyTorch's",
        "| file | cpu | onnxruntime | loads? | agreement | seconds |",
        "|---|---|---|---|---|---|",
    ]
    for cpu, info in cpus.items():
        for name, r in info["files"].items():
            agree = f"{r['agree']:.4f}" if r["agree"] is not None else "-"
            loads = "yes" if r["loads"] else f"no (opset {r['opset']})"
            lines.append(
                f"| {name} | {cpu} | {info['onnxruntime']} | {loads} | {agree} | "
                f"{r['seconds']:.1f} |"
            )
    lines.append(f"total: {result['seconds']:.0f} s")
    return "\n".join(lines)


def add_bench_parser(kinds: argparse._SubParsersAction) -> None:
    from .emulation import CPUS

    bench = kinds.add_parser(
        "arm64",
        help="every export variant in onnxruntime's aarch64 build under qemu, as a Pi 4 and a Pi 5",
        description="LeNet-5 (Fashion-MNIST), every export variant for opset 25 and 21, run in "
        "onnxruntime's aarch64 wheel under qemu-user (set up by scripts/arm64_runtime.sh) per "
        "CPU: loads?, agreement with PyTorch, seconds.",
    )
    bench.add_argument(
        "--cpu",
        action="append",
        metavar="CPU",
        help=f"qemu CPU model, repeatable (default: {' and '.join(CPUS)})",
    )
    bench.add_argument("--images", type=int, default=1000, help="test images (default 1000)")
    bench.add_argument("--json", metavar="OUT", help="write the results as JSON to OUT")
    bench.add_argument("--data-dir", metavar="DIR", help="Fashion-MNIST IDX folder")
    bench.set_defaults(run=run_bench)


def run_bench(args: argparse.Namespace) -> int:
    from bitfleet.cli.output import write_json
    from bitfleet.progress import Progress

    from .emulation import CPUS, missing

    reason = missing()
    if reason:
        print(reason, file=sys.stderr)
        return 1
    result = run_arm64_bench(args.cpu or list(CPUS), args.images, args.data_dir, Progress())
    print(format_table(result))
    if args.json:
        print(f"wrote {write_json(args.json, result)}")
    return 0
