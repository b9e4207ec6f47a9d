"""What the demo leaves behind: ONNX files checked in onnxruntime, a report, plots, a summary."""

from __future__ import annotations

import statistics
from pathlib import Path

import numpy as np

from bitfleet.data import ImageData
from bitfleet.deploy import CANDIDATE_KINDS, DeployChoice, DeployLimits, limit_failure
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
    allocation = job.allocation
    for device in sorted(job.assignments):
        assignment, reg = job.assignments[device], job.registrations[device]
        choice = job.deploy.get(device)
        kind = CANDIDATE_KINDS.get(choice.chosen) if choice and choice.chosen else None
        bits = kind.weight_bits if kind is not None else assignment.deploy_bits
        files = sorted((out / "devices" / device).glob("*.onnx"))
        sig = allocation.significance.get(device) if allocation else None
        plan = job.plans.get(device)
        row = {
            "device": device,
            "board": reg.board.name,
            "n_samples": reg.data.n_samples,
            "strategy": assignment.strategy,
            "strategy_why": {
                "x": sig[0] if sig else None,
                "y": sig[1] if sig else None,
                "rule": allocation.rules.get(device) if allocation else None,
            },
            "limits": reg.limits.to_dict(),
            "planned_bits": assignment.deploy_bits,
            "plan_why": plan.reason if plan else "no limit: the widest width",
            "candidate": choice.chosen if choice else None,
            "choice_gap": _choice_gap(choice, reg.limits) if choice else None,
            "deploy": choice.to_dict() if choice else None,
            "bits": bits,
            "onnx": str(files[0]) if files else None,
            "bytes": files[0].stat().st_size if files else None,
            "acc_torch": (last.acc_fp32 if bits >= 32 else last.acc_deploy.get(str(bits)))
            if last
            else None,
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


def _choice_gap(choice: DeployChoice, limits: DeployLimits) -> float:
    """How much more accurate the best candidate within the device's limits is than the chosen
    one (at most the accuracy tie, unless no candidate meets the limits)."""
    meets = [c.accuracy for c in choice.candidates if limit_failure(c, limits) is None]
    if not meets or choice.chosen is None:
        return 0.0
    return max(meets) - choice.score(choice.chosen).accuracy


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


def _device_sections(job: JobResult, devices: list[dict], limits_why: dict[str, str]) -> list[str]:
    """Per device: its strategy and why, its limits and where they come from, its candidates
    and why the chosen one won."""
    factor = job.allocation.acc_factor if job.allocation else None
    lines = ["## Who trained how, and why", ""]
    if factor is not None:
        lines += [f"Deploy-aware FedHQ: SigAcc x{factor[0]:.2f} ({factor[1]}).", ""]
    lines += [
        "| device | board | strategy | x (SigSpeed) | y (SigAcc) | rule |",
        "|---|---|---|---|---|---|",
    ]
    for d in devices:
        w = d["strategy_why"]
        fx = "-" if w["x"] is None else f"{w['x']:.2f}"
        fy = "-" if w["y"] is None else f"{w['y']:.2f}"
        lines.append(
            f"| {d['device']} | {d['board']} | {d['strategy']} | {fx} | {fy} | {w['rule'] or '-'} |"
        )
    for m in job.moves:
        lines.append(f"\nRound {m.round + 1}: {m.device} moved {m.old} -> {m.new} ({m.reason}).")
    lines += ["", "## Deploy candidates", ""]
    for d in devices:
        limits = ", ".join(f"{k} {v}" for k, v in d["limits"].items()) or "none"
        source = limits_why.get(d["device"])
        lines += [
            f"### {d['device']} ({d['board']})",
            "",
            f"Limits: {limits}" + (f" ({source})" if source else "") + ". "
            f"Planned width {d['planned_bits']} bits: {d['plan_why']}.",
            "",
        ]
        deploy = d["deploy"]
        if deploy is None:
            lines += ["No candidates: " + (d["export_failure"] or "not exported"), ""]
            continue
        lines += [
            "| candidate | bytes | validation acc (ORT, decides) | test acc (ORT) "
            "| latency ms (board) | |",
            "|---|---|---|---|---|---|",
        ]
        for c in deploy["candidates"]:
            lat = "-" if c["latency_ms"] is None else f"{c['latency_ms']:.3f}"
            mark = (
                "**chosen**"
                if c["name"] == deploy["chosen"]
                else deploy["excluded"].get(c["name"], "")
            )
            test = "-" if c.get("test_accuracy") is None else f"{c['test_accuracy']:.4f}"
            lines.append(
                f"| {c['name']} | {c['bytes']} | {c['accuracy']:.4f} | {test} | {lat} | {mark} |"
            )
        lines += ["", f"Why: {deploy['reason']}.", ""]
    return lines


def write_outputs(
    job: JobResult,
    cfg: JobConfig,
    devices: list[dict],
    out: Path,
    seconds: float,
    limits_why: dict[str, str] | None = None,
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
        "deploy_candidate": {d["device"]: d["candidate"] for d in devices},
        "moves": [m.to_dict() for m in job.moves],
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
        "| device | board | samples | strategy | model | bits | ONNX bytes | acc torch | acc ORT |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for d in devices:
        acc_t = f"{d['acc_torch']:.4f}" if d["acc_torch"] is not None else "-"
        acc_o = f"{d['acc_onnx']:.4f}" if d["acc_onnx"] is not None else "missing"
        if d["export_failure"]:  # the coordinator's reason, after its retry
            acc_o = "no model: " + d["export_failure"].replace("|", "/")
        lines.append(
            f"| {d['device']} | {d['board']} | {d['n_samples']} | {d['strategy']} | "
            f"{d['candidate'] or '-'} | {d['bits']} | {d['bytes'] or '-'} | {acc_t} | {acc_o} |"
        )
    lines += ["", *_device_sections(job, devices, limits_why or {})]
    lines += ["", *[f"![{p}]({p})" for p in plots], ""]
    (out / "report.md").write_text("\n".join(lines))
    return summary
