"""`bitfleet demo`: a whole fleet on this machine, in one command.

An MQTT broker (embedded amqtt unless `--broker` names one), the coordinator in this process,
and N agent processes posing as heterogeneous boards from `profiles/`, each with its own
non-IID slice of Fashion-MNIST. Every board ends with an ONNX model at its own bit-width, and
the demo checks each file in onnxruntime against the coordinator's own evaluation.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

DEMO_BOARDS = ("rpi4", "rpi5", "jetson-nano", "jetson-orin-nano", "x86-server")


def add_parser(sub: argparse._SubParsersAction) -> None:
    demo = sub.add_parser(
        "demo",
        help="run a whole fleet on this machine: broker, coordinator, N agents, ONNX per board",
        description="Starts an MQTT broker (embedded unless --broker), the coordinator and N "
        "agent processes with virtual boards from profiles/, federates LeNet-5 on Fashion-MNIST "
        "split Dirichlet(alpha), and writes report.md, metrics.jsonl, plots and one .onnx per "
        "device into --out.",
    )
    demo.add_argument("--devices", type=int, default=6, help="number of agents (default 6)")
    demo.add_argument("--rounds", type=int, default=10, help="federated rounds (default 10)")
    demo.add_argument("--local-epochs", type=float, default=1.0, help="per round (default 1)")
    demo.add_argument("--alpha", type=float, default=0.5, help="Dirichlet alpha (default 0.5)")
    demo.add_argument(
        "--strategy", default="mqat", help="local method for every device (default mqat)"
    )
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--out", default="runs/demo", metavar="DIR", help="output folder")
    demo.add_argument("--broker", metavar="URL", help="use this broker instead of the embedded one")
    demo.add_argument("--json", metavar="OUT", help="write the summary JSON to OUT")
    demo.set_defaults(run=run_demo)


def _job(args: argparse.Namespace, out: Path) -> dict:
    return {
        "job": {
            "name": "demo",
            "fleet": "demo",
            "seed": args.seed,
            "state_dir": str(out / "state"),
        },
        "model": {"name": "lenet5"},
        "data": {"dataset": "fashion-mnist", "partition": "dirichlet", "alpha": args.alpha},
        "training": {
            "rounds": args.rounds,
            "local_epochs": args.local_epochs,
            "batch_size": 64,
            "lr": 1e-3,
            "optimizer": "adam",
        },
        "rounds": {
            "fraction": 1.0,
            "min_devices": args.devices,
            "deadline_s": 300.0,
            "quorum": 0.8,
            "register_timeout_s": 180.0,
        },
        "server": {"optimizer": "fedavg"},
        "allocation": {"mode": "fixed", "strategy": args.strategy, "bits": 4},
        "deploy": {"bits": [8, 4, 2]},
    }


def _spawn_agents(
    args: argparse.Namespace, url: str, out: Path
) -> list[tuple[str, subprocess.Popen]]:
    logs = out / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    agents = []
    for i in range(args.devices):
        board = DEMO_BOARDS[i % len(DEMO_BOARDS)]
        device = f"dev{i}-{board}"
        cmd = [
            sys.executable, "-m", "bitfleet", "agent", "run",
            "--broker", url,
            "--data", f"fashion-mnist:{i}/{args.devices}",
            "--alpha", str(args.alpha),
            "--partition-seed", str(args.seed),
            "--device-id", device,
            "--profile", board,
            "--fleet", "demo",
            "--out-dir", str(out / "devices" / device),
            "--threads", "1",
            "--no-step-measure",
            "--exit-after-model",
        ]  # fmt: skip
        log_file = (logs / f"{device}.log").open("w")
        agents.append((device, subprocess.Popen(cmd, stdout=log_file, stderr=subprocess.STDOUT)))
    return agents


def run_demo(args: argparse.Namespace) -> int:
    from bitfleet.broker import EmbeddedBroker

    from .config import job_config_from_dict
    from .demo_report import check_onnx_files, write_outputs
    from .server import Coordinator, RoundReport

    if args.devices < 2:
        raise ValueError("--devices must be at least 2")
    if args.rounds < 1:
        raise ValueError("--rounds must be at least 1")
    out = Path(args.out)
    shutil.rmtree(out / "state", ignore_errors=True)  # each demo is a fresh job
    shutil.rmtree(out / "devices", ignore_errors=True)
    out.mkdir(parents=True, exist_ok=True)
    cfg = job_config_from_dict(_job(args, out), source="bitfleet demo")
    broker = None
    url = args.broker
    if url is None:
        broker = EmbeddedBroker().start()
        url = broker.url
    t0 = time.perf_counter()
    metrics = (out / "metrics.jsonl").open("w")

    def show(r: RoundReport) -> None:
        deploy = " ".join(f"{b}-bit {a:.3f}" for b, a in r.acc_deploy.items())
        print(
            f"round {r.round + 1}/{args.rounds}  devices {len(r.received)}/{len(r.selected)}  "
            f"acc {r.acc_fp32:.3f} (float)  {deploy}  "
            f"round {r.host_seconds:.1f} s real, {r.sim_seconds:.1f} s simulated  "
            f"[{time.perf_counter() - t0:.0f} s]",
            flush=True,
        )
        metrics.write(json.dumps(r.__dict__) + "\n")
        metrics.flush()

    print(
        f"bitfleet demo: broker {url}, {args.devices} agents, {args.rounds} rounds, "
        f"strategy {args.strategy}; logs in {out / 'logs'}",
        flush=True,
    )
    agents = _spawn_agents(args, url, out)
    try:
        coordinator = Coordinator(cfg, url, on_round=show)
        reports = coordinator.run()
        deadline = time.monotonic() + 120
        for _, proc in agents:
            proc.wait(timeout=max(1.0, deadline - time.monotonic()))
    finally:
        for _, proc in agents:
            if proc.poll() is None:
                proc.kill()
        metrics.close()
        if broker is not None:
            broker.stop()
    onnx = check_onnx_files(coordinator, out)
    summary = write_outputs(coordinator, reports, onnx, out, time.perf_counter() - t0)
    if args.json:
        from bitfleet.cli.output import write_json

        write_json(args.json, summary)
    print(
        f"done in {summary['seconds']:.0f} s: float acc {summary['final_acc_fp32']:.4f}, "
        f"deployed {summary['final_acc_deploy']}; report {out / 'report.md'}",
        flush=True,
    )
    failed = [name for name, p in agents if p.returncode != 0]
    if failed:
        print(f"agents that did not finish cleanly: {failed} (see {out / 'logs'})", file=sys.stderr)
        return 1
    return 0
