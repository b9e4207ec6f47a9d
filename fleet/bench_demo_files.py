"""`bitfleet bench demo-files DIR`: every model file a demo wrote, in every runtime a board may
have (docs/export.md#runtimes).

The files are the models the devices received (DIR/devices/*/) and every candidate the
coordinator exported at the end (DIR/state/exports/). Each runs on real Fashion-MNIST test
images in this interpreter's onnxruntime (the newest admitted), in `.venv-ort-oldest` (the
oldest), and in onnxruntime's aarch64 build under qemu as a Pi 4 (cortex-a72) and a Pi 5
(cortex-a76), and its top-1 answers are compared with PyTorch's for the same deployed model (the
job's last checkpoint at the file's widths). A candidate stamped with a newer opset than a
runtime loads was written for boards that said they load it; a board on that runtime gets the
same numbers in an older container instead (docs/export.md#runtimes), so there it is `n/a`.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

AGREEMENT = 0.995
ROOT = Path(__file__).resolve().parent.parent
OLDEST = ROOT / ".venv-ort-oldest" / "bin" / "python"


def add_bench_parser(kinds: argparse._SubParsersAction) -> None:
    """`bitfleet bench demo-files`, registered through the `bitfleet.benches` entry points."""
    bench = kinds.add_parser(
        "demo-files",
        help="every model file a demo wrote, on the oldest and newest onnxruntime and on "
        "aarch64 (qemu, Pi 4 and Pi 5 CPUs), against PyTorch",
        description="Runs DIR/state/exports/*.onnx (what `bitfleet demo --out DIR` exported) "
        f"in each runtime and checks top-1 agreement with PyTorch >= {AGREEMENT}.",
    )
    bench.add_argument("dir", metavar="DIR", help="a demo's --out folder")
    bench.add_argument("--images", type=int, default=1000, help="test images (default 1000)")
    bench.add_argument("--json", metavar="OUT", help="write the results as JSON to OUT")
    bench.set_defaults(run=run_bench)


def _references(state_dir: Path, files: list[Path], pixels: Any) -> dict[str, Any]:
    """PyTorch's logits for each file: the last checkpoint deployed at the file's widths."""
    import onnx
    import torch

    from bitfleet.data import DATASET_SPECS
    from coordinator.checkpoint import load_latest_checkpoint
    from coordinator.config import job_config_from_dict
    from coordinator.global_model import GlobalModel

    cfg = job_config_from_dict(json.loads((state_dir / "job.json").read_text()), str(state_dir))
    found = load_latest_checkpoint(state_dir)
    if found is None:
        raise FileNotFoundError(f"{state_dir}: no checkpoint")
    model = GlobalModel(cfg, DATASET_SPECS[cfg.data.dataset])
    state = found[1]
    out = {}
    for f in files:
        props = {p.key: p.value for p in onnx.load(str(f), load_external_data=False).metadata_props}
        layers = json.loads(props["bitfleet.bits_per_layer"])
        widths = set(layers.values())
        bits: int | dict[str, int] = widths.pop() if len(widths) == 1 else layers
        with torch.no_grad():
            out[str(f)] = model.deployed(state, bits)(torch.from_numpy(pixels)).numpy()
    return out


def run_demo_files_bench(out_dir: Path, images: int) -> dict[str, Any]:
    from bitfleet.data import load_dataset
    from export import emulation
    from export.runtimes import agreement, run_in

    state_dir = out_dir / "state"
    delivered = sorted((out_dir / "devices").glob("*/*.onnx"))
    files = delivered + sorted((state_dir / "exports").glob("*.onnx"))
    if not files:
        raise FileNotFoundError(f"{state_dir / 'exports'}: no .onnx files (run bitfleet demo)")
    data = load_dataset("fashion-mnist")
    pixels = data.test_x[:images].float().div(255).numpy()
    reference = _references(state_dir, files, pixels)
    runtimes: dict[str, Any] = {"newest (this venv)": [sys.executable]}
    runtimes["oldest (.venv-ort-oldest)"] = [str(OLDEST)] if OLDEST.exists() else None
    for cpu in emulation.CPUS:
        try:
            runtimes[f"aarch64 {cpu}"] = emulation.arm64_command(cpu)
        except FileNotFoundError:
            runtimes[f"aarch64 {cpu}"] = None
    opsets = {str(f): _opset(f) for f in files}
    names = {str(f): _label(f, out_dir) for f in files}
    rows: dict[str, dict[str, Any]] = {}
    for label, how in runtimes.items():
        if how is None:
            rows[label] = {"missing": True}
            continue
        run = how.run(files, pixels) if hasattr(how, "run") else run_in(how, files, pixels)
        loads = _loads_opset(run.onnxruntime)
        row: dict[str, Any] = {"onnxruntime": run.onnxruntime, "files": {}}
        for f in files:
            key = str(f)
            if key in run.errors:
                cell = {"error": run.errors[key]}
                if opsets[key] > loads and f not in delivered:
                    cell = {"n/a": f"opset {opsets[key]} > {loads}"}
            else:
                cell = {"agreement": agreement(run.logits[key], reference[key])}
            row["files"][names[key]] = cell
        rows[label] = row
        print(f"  {label}: onnxruntime {run.onnxruntime}", file=sys.stderr, flush=True)
    ok = all(
        not r.get("missing")
        and all("n/a" in v or v.get("agreement", 0.0) >= AGREEMENT for v in r["files"].values())
        for r in rows.values()
    )
    listed = [names[str(f)] for f in files]
    return {"files": listed, "images": images, "runtimes": rows, "met": ok}


def _loads_opset(version: str) -> int:
    """The newest default-domain opset an onnxruntime release loads (1.20: 21, 1.22: 22, from
    1.23: 25 and more), to tell a file written for a newer runtime from a failure."""
    major, minor = (int(p) for p in version.split(".")[:2])
    if (major, minor) >= (1, 23):
        return 25
    return 22 if (major, minor) >= (1, 22) else 21


def _opset(path: Path) -> int:
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    return max(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))


def _label(path: Path, out_dir: Path) -> str:
    """`devices/<id>/<file>` for a delivered model, the file name for a candidate."""
    rel = path.relative_to(out_dir)
    return str(rel) if rel.parts[0] == "devices" else path.name


def run_bench(args: argparse.Namespace) -> int:
    from bitfleet.cli.output import write_json

    r = run_demo_files_bench(Path(args.dir), args.images)
    labels = list(r["runtimes"])
    print("| file | " + " | ".join(labels) + " |")
    print("|---|" + "---|" * len(labels))
    for name in r["files"]:
        cells = []
        for label in labels:
            row = r["runtimes"][label]
            if row.get("missing"):
                cells.append("not set up")
                continue
            v = row["files"][name]
            if "agreement" in v:
                cells.append(f"{v['agreement']:.4f}")
            elif "n/a" in v:
                cells.append(f"n/a ({v['n/a']})")
            else:
                cells.append("FAILS: " + v["error"][:60])
        print(f"| {name} | " + " | ".join(cells) + " |")
    versions = ", ".join(f"{k}: {v.get('onnxruntime', '-')}" for k, v in r["runtimes"].items())
    print(f"onnxruntime versions: {versions}")
    print(
        f"{'met' if r['met'] else 'NOT met'}: every file agrees >= {AGREEMENT} in every runtime "
        "that loads its opset, and every delivered file in all of them"
    )
    if args.json:
        write_json(args.json, r)
    return 0 if r["met"] else 1
