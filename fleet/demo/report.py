"""What the demo leaves behind: ONNX files checked in onnxruntime, a report, plots, a summary."""

from __future__ import annotations

import statistics
from pathlib import Path

import numpy as np

from bitfleet.data import ImageData
from bitfleet.extras import require
from coordinator.config import JobConfig
from coordinator.server import JobResult, RoundReport


def check_onnx_files(job: JobResult, data: ImageData, out: Path) -> list[dict]:
    """Run every device's received model in onnxruntime on the whole test set."""
    import onnxruntime as ort

    x = data.test_x.float().div(255.0).numpy()
    y = data.test_y.numpy()
    last = job.reports[-1] if job.reports else None
    rows = []
    for device in sorted(job.assignments):
        assignment, reg = job.assignments[device], job.registrations[device]
        bits = assignment.deploy_bits
        files = sorted((out / "devices" / device).glob("*.onnx"))
        row = {
            "device": device,
            "board": reg.board.name,
            "n_samples": reg.data.n_samples,
            "strategy": assignment.strategy,
            "bits": bits,
            "onnx": str(files[0]) if files else None,
            "bytes": files[0].stat().st_size if files else None,
            "acc_torch": last.acc_deploy.get(str(bits)) if last else None,
            "acc_onnx": None,
            "export_failure": job.export_failures.get(device),
        }
        if files:
            opts = ort.SessionOptions()
            opts.intra_op_num_threads = 2
            session = ort.InferenceSession(str(files[0]), opts, providers=["CPUExecutionProvider"])
            name = session.get_inputs()[0].name
            pred = np.concatenate(
                [
                    session.run(None, {name: x[i : i + 1000]})[0].argmax(1)
                    for i in range(0, len(x), 1000)
                ]
            )
            row["acc_onnx"] = float((pred == y).mean())
        rows.append(row)
    return rows


def _plots(reports: list[RoundReport], devices: list[dict], out: Path) -> list[str]:
    require("matplotlib", "demo", "the demo's plots").use("Agg")
    import matplotlib.pyplot as plt

    names = []
    fig, ax = plt.subplots(figsize=(6, 4))
    rounds = [r.round + 1 for r in reports]
    ax.plot(rounds, [r.acc_fp32 for r in reports], marker="o", label="float")
    for bits in reports[-1].acc_deploy if reports else []:
        ax.plot(rounds, [r.acc_deploy.get(bits) for r in reports], marker=".", label=f"{bits}-bit")
    ax.set(xlabel="round", ylabel="test accuracy", title="Global model accuracy per round")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "accuracy.png", dpi=120)
    plt.close(fig)
    names.append("accuracy.png")

    fig, ax = plt.subplots(figsize=(7, 4))
    labels = [d["device"] for d in devices]
    colours = {"ptq": "tab:blue", "qat": "tab:orange", "mqat": "tab:green"}
    ax.bar(
        labels,
        [d["bits"] for d in devices],
        color=[colours.get(d["strategy"], "grey") for d in devices],
    )
    for i, d in enumerate(devices):
        ax.text(
            i,
            d["bits"] + 0.1,
            f"{d['strategy']}\n{d['n_samples']} samples",
            ha="center",
            fontsize=7,
        )
    ax.set(ylabel="deployed weight bits", title="Per-device strategy and bit-width", ylim=(0, 10))
    ax.tick_params(axis="x", rotation=30)
    fig.tight_layout()
    fig.savefig(out / "devices.png", dpi=120)
    plt.close(fig)
    names.append("devices.png")
    return names


def write_outputs(
    job: JobResult,
    cfg: JobConfig,
    devices: list[dict],
    out: Path,
    seconds: float,
) -> dict:
    """Write report.md and the plots; return the summary (the `--json` contract)."""
    reports = job.reports
    last = reports[-1] if reports else None
    overheads = [r.overhead_seconds for r in reports]
    round_s = [r.host_seconds for r in reports]
    summary = {
        "devices": len(devices),
        "rounds_completed": len(reports),
        "final_acc_fp32": last.acc_fp32 if last else None,
        "final_acc_deploy": dict(last.acc_deploy) if last else {},
        "deploy_bits": {d["device"]: d["bits"] for d in devices},
        "onnx_files": [d["onnx"] for d in devices if d["onnx"]],
        "coordinator_overhead_s": statistics.mean(overheads) if overheads else None,
        "round_seconds": statistics.mean(round_s) if round_s else None,
        "sim_round_seconds": statistics.mean(r.sim_seconds for r in reports) if reports else None,
        "per_device": devices,
        "dropped_messages": dict(job.dropped),
        "seconds": seconds,
    }
    plots = _plots(reports, devices, out) if reports else []
    lines = [
        "# bitfleet demo report",
        "",
        f"{summary['devices']} devices, {summary['rounds_completed']} rounds, allocation "
        f"`{cfg.allocation.mode}` (QAT side `{cfg.allocation.qat_strategy}`"
        f"), {seconds:.0f} s in all. Times: *real* is this "
        "host's wall clock; *simulated* scales each device's training time by its board's "
        "relative speed and adds link time (docs/simulation.md#the-board-clock).",
        "",
        "## Rounds",
        "",
        "| round | devices | late | float acc | "
        + " | ".join(f"{b}-bit acc" for b in summary["final_acc_deploy"])
        + " | real s | simulated s | coordinator s |",
        "|---|---|---|---|" + "---|" * len(summary["final_acc_deploy"]) + "---|---|---|",
    ]
    for r in reports:
        accs = " | ".join(
            f"{r.acc_deploy.get(b, float('nan')):.4f}" for b in summary["final_acc_deploy"]
        )
        lines.append(
            f"| {r.round + 1} | {len(r.received)}/{len(r.selected)} | {len(r.stragglers)} | "
            f"{r.acc_fp32:.4f} | {accs} | {r.host_seconds:.1f} | {r.sim_seconds:.1f} | "
            f"{r.overhead_seconds:.3f} |"
        )
    lines += [
        "",
        "## Devices and their models",
        "",
        "| device | board | samples | strategy | bits | ONNX bytes | acc torch | acc ORT |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for d in devices:
        acc_t = f"{d['acc_torch']:.4f}" if d["acc_torch"] is not None else "-"
        acc_o = f"{d['acc_onnx']:.4f}" if d["acc_onnx"] is not None else "missing"
        if d["export_failure"]:  # the coordinator's reason, after its retry
            acc_o = "no model: " + d["export_failure"].replace("|", "/")
        lines.append(
            f"| {d['device']} | {d['board']} | {d['n_samples']} | {d['strategy']} | {d['bits']} | "
            f"{d['bytes'] or '-'} | {acc_t} | {acc_o} |"
        )
    lines += ["", *[f"![{p}]({p})" for p in plots], ""]
    (out / "report.md").write_text("\n".join(lines))
    return summary
