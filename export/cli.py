"""`bitfleet export` and `bitfleet bench export`."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

VERIFY_MIN_AGREEMENT = 0.99
"""`--verify` fails below this top-1 agreement between onnxruntime and PyTorch."""


def add_parser(sub: argparse._SubParsersAction) -> None:
    exp = sub.add_parser(
        "export",
        help="write a quantized ONNX model from a checkpoint",
        description="Quantized ONNX from a coordinator checkpoint (or a safetensors state "
        "dict): weights on the b-bit grid of the training quantizer, stored as int8 or packed "
        "INT4/INT2, optional 8-bit activations (QDQ, fused by onnxruntime into integer "
        "kernels), normalisation inside, metadata describing it. --device picks bits and "
        "storage from a board profile.",
    )
    exp.add_argument(
        "--checkpoint", required=True, metavar="C", help="checkpoint file or state dir"
    )
    exp.add_argument("--out", required=True, metavar="FILE", help="the .onnx file to write")
    exp.add_argument("--bits", type=int, help="weight bits 2..8 (default: from --device, else 8)")
    exp.add_argument("--device", metavar="PROFILE", help="board profile, e.g. rpi4, rpi5")
    exp.add_argument("--per-layer-bits", metavar="FILE", help="JSON {layer: bits} (FedMPQ)")
    exp.add_argument("--activations", choices=["8", "float"], help="default: 8 with int8 storage")
    exp.add_argument(
        "--act-bits",
        type=int,
        metavar="A",
        help="activation width the model was trained through (2..8; default: the job's "
        "[allocation] act_bits, float where that is 32): the file quantizes every quantized "
        "layer's input on the model's own grid, calibrated on the first 256 validation images",
    )
    exp.add_argument("--storage", choices=["int8", "packed"], help="default: from --device, int8")
    exp.add_argument("--calib", type=int, default=256, metavar="N", help="calibration samples")
    exp.add_argument("--verify", action="store_true", help="compare with PyTorch in onnxruntime")
    exp.add_argument("--verify-samples", type=int, default=1000, metavar="N")
    exp.add_argument("--model", help="architecture (default: the job's, else lenet5)")
    exp.add_argument("--dataset", help="data set (default: the job's, else fashion-mnist)")
    exp.add_argument("--strategy", default="ptq", help="local method the model was trained with")
    exp.add_argument("--data-dir", metavar="DIR", help="where the data set is")
    exp.set_defaults(run=run_export)


def add_bench_parser(kinds: argparse._SubParsersAction) -> None:
    bench = kinds.add_parser(
        "export",
        help="ONNX size, latency and accuracy of every export variant and onnxruntime's own",
        description="LeNet-5 (Fashion-MNIST) and a CIFAR-style ResNet-18: fp32, int8 QDQ, int8 "
        "weight-only, 4-bit in int8, 4-bit packed, 2-bit packed, and onnxruntime quantize_static "
        "(MinMax, Percentile); bytes, latency at batch 1 and 32, accuracy, agreement.",
    )
    bench.add_argument("--quick", action="store_true", help="shorter LeNet training")
    bench.add_argument("--json", metavar="OUT", help="write the results as JSON to OUT")
    bench.add_argument("--data-dir", metavar="DIR", help="Fashion-MNIST IDX folder")
    bench.set_defaults(run=run_bench)


def run_bench(args: argparse.Namespace) -> int:
    from bitfleet.cli.output import write_json
    from bitfleet.progress import Progress

    from .bench import FULL, QUICK, format_table, run_export_bench

    result = run_export_bench(QUICK if args.quick else FULL, args.data_dir, Progress())
    print(format_table(result))
    if args.json:
        print(f"wrote {write_json(args.json, result)}")
    return 0


def _job_defaults(checkpoint: Path) -> dict:
    for folder in (checkpoint, *checkpoint.parents[:3]):
        job = folder / "job.json"
        if job.is_file():
            try:
                return json.loads(job.read_text(encoding="utf-8"))
            except ValueError as exc:
                raise ValueError(f"{job}: not a job file the coordinator wrote ({exc})") from None
    return {}


def _check_out(out: Path) -> None:
    """Fail before the slow checkpoint load and calibration if `out` cannot be written."""
    if out.is_dir():
        raise ValueError(f"--out {out}: a directory; name the .onnx file to write")
    for parent in out.parents:
        if parent.exists():
            if not parent.is_dir():
                raise ValueError(f"--out {out}: {parent} is a file, not a directory")
            return


def run_export(args: argparse.Namespace) -> int:
    from safetensors import SafetensorError

    from .checkpoint_model import load_for_export
    from .verify import verify_export

    _check_out(Path(args.out))
    ckpt = Path(args.checkpoint)
    job = _job_defaults(ckpt if ckpt.is_dir() else ckpt.parent)
    model_name = args.model or job.get("model", {}).get("name", "lenet5")
    dataset = args.dataset or job.get("data", {}).get("dataset", "fashion-mnist")
    strategy = (
        args.strategy
        if args.strategy != "ptq"
        else job.get("allocation", {}).get("strategy", "ptq")
    )
    job_act = job.get("allocation", {}).get("act_bits", 32)
    act_bits = args.act_bits if args.act_bits is not None else (None if job_act == 32 else job_act)
    try:
        loaded = load_for_export(
            ckpt,
            model_name,
            dataset,
            strategy=strategy,
            bits=args.bits,
            device=args.device,
            per_layer_bits=args.per_layer_bits,
            storage=args.storage,
            activations=args.activations,
            data_dir=args.data_dir,
            act_bits=act_bits,
        )
    except SafetensorError as exc:  # the only file format read_state parses
        raise ValueError(f"--checkpoint {ckpt}: not a safetensors checkpoint ({exc})") from None
    result = loaded.export(Path(args.out), calib=args.calib)
    print(
        f"wrote {result.path} ({result.bytes} bytes): {loaded.describe()}"
        + (f"; float layers {result.float_layers}" if result.float_layers else "")
    )
    if not args.verify:
        return 0
    report = verify_export(result.path, loaded.model, loaded.test_set(args.verify_samples))
    print(
        f"verify on {report['samples']} samples: top-1 agreement {report['agree']:.4f}, max |logit "
        f"diff| {report['max_abs_diff']:.3g}, accuracy onnxruntime {report['acc_onnx']:.4f} / "
        f"PyTorch {report['acc_torch']:.4f} (tolerance: agreement >= {VERIFY_MIN_AGREEMENT})"
    )
    return 0 if report["agree"] >= VERIFY_MIN_AGREEMENT else 1
