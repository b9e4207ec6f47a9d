"""`bitfleet demo`: a whole fleet on this machine, in one command.

An MQTT broker (embedded amqtt unless `--broker` names one), the coordinator in this process,
and N agent processes posing as heterogeneous boards from `profiles/`, each with its own
non-IID slice of Fashion-MNIST. Every board ends with an ONNX model at its own bit-width, and
the demo checks each file in onnxruntime against the coordinator's own evaluation.

`--secure` takes the path of a real fleet instead: it provisions one (`coordinator provision`:
a CA, one password per board, the ACL), starts Mosquitto with the generated TLS-only config,
and every process logs in over mqtts:// with its own account; each agent reads its password from
its provisioned password file, so no password is on a command line.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from fleet.broker import MosquittoProcess
    from fleet.provision import Provisioned

DEMO_BOARDS = ("rpi4", "rpi5", "jetson-nano", "jetson-orin-nano", "x86-server")

DEMO_LIMITS: dict[int, tuple[str, list[str]]] = {
    1: (
        "model pushed over a metered cellular link: 40 KiB per update",
        ["--max-model-kib", "40"],
    ),
    2: ("camera pipeline: 2 ms per frame left for the model", ["--max-latency-ms", "2"]),
    4: ("shared server: the model may take 100 KiB of the cache", ["--max-model-kib", "100"]),
}
"""The owners' limits of the demo's devices, by index, and where each comes from (what a
deployment like it would state); the other devices have none."""


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
        "--allocation",
        choices=("fedhq", "fedhq-paper", "fixed", "random"),
        default="fedhq",
        help="who trains how: fedhq (default: FedHQ aware of the widths the fleet deploys at: "
        "QAT where PTQ would lose accuracy at those widths and QAT costs little round time), "
        "fedhq-paper (the paper's rule), fixed (every device --strategy), random (FedRH)",
    )
    demo.add_argument(
        "--no-limits",
        action="store_true",
        help="drop the owners' limits some demo devices have (a size or latency limit each)",
    )
    demo.add_argument(
        "--strategy",
        default="mqat",
        help="the QAT side's local method (default mqat: bits drawn from each board's widths)",
    )
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--out", default="runs/demo", metavar="DIR", help="output folder")
    where = demo.add_mutually_exclusive_group()
    where.add_argument(
        "--broker", metavar="URL", help="use this broker instead of the embedded one"
    )
    where.add_argument(
        "--secure",
        action="store_true",
        help="provision the fleet (CA, one password per device, ACL) into OUT/fleet and run it "
        "over TLS through Mosquitto started with the generated config (needs mosquitto)",
    )
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
        "allocation": {
            "mode": "fedhq" if args.allocation.startswith("fedhq") else args.allocation,
            "deploy_aware": args.allocation == "fedhq",
            "strategy": args.strategy,
            "qat_strategy": args.strategy,
            "bits": 4,
        },
        "deploy": {"bits": [8, 4, 2]},
    }


def _start_secure_broker(
    args: argparse.Namespace, out: Path
) -> tuple[Provisioned, MosquittoProcess]:
    """Provision the demo's fleet into OUT/fleet and start Mosquitto with its TLS config on a
    free loopback port: what deploy/README.md does for a real fleet, on one machine."""
    from fleet.broker import MosquittoProcess, find_mosquitto, free_port
    from fleet.provision import provision

    find_mosquitto()  # its absence is the likely failure: say so before writing anything
    fleet_dir = out / "fleet"
    shutil.rmtree(fleet_dir, ignore_errors=True)  # fresh credentials for each demo
    port = free_port()
    fleet = provision(
        "demo",
        args.devices,
        fleet_dir,
        hosts=["localhost"],
        port=port,
        bind="127.0.0.1",
        # Started by root, Mosquitto would drop to its own user, which may not reach OUT. This
        # broker is the demo's, on loopback only: it runs as whoever runs the demo.
        broker_user="root" if os.geteuid() == 0 else None,
    )
    broker = MosquittoProcess(fleet.conf, port, out / "logs" / "mosquitto.log").start()
    return fleet, broker


def _spawn_agents(
    args: argparse.Namespace, url: str, out: Path, fleet: Provisioned | None = None
) -> list[tuple[str, subprocess.Popen]]:
    """One agent process per device; with a provisioned `fleet`, each logs in as itself."""
    logs = out / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    agents = []
    for i in range(args.devices):
        board = DEMO_BOARDS[i % len(DEMO_BOARDS)]
        if fleet is None:
            device, connect = f"dev{i}-{board}", ["--broker", url]
        else:  # the device id is the account's user name, which the ACL binds its topics to
            device = list(fleet.devices)[i]
            # The password goes by file, never in argv: every local user can read a command
            # line (docs/security.md#broker-credentials).
            connect = [
                "--broker", fleet.public_url(device),
                "--password-file", str(fleet.password_file(device)),
                "--ca-file", str(fleet.ca_file),
            ]  # fmt: skip
        cmd = [
            sys.executable, "-m", "bitfleet", "agent", "run",
            *connect,
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
            *([] if args.no_limits or i not in DEMO_LIMITS else DEMO_LIMITS[i][1]),
        ]  # fmt: skip
        log_file = (logs / f"{device}.log").open("w")
        agents.append((device, subprocess.Popen(cmd, stdout=log_file, stderr=subprocess.STDOUT)))
    return agents


def run_demo(args: argparse.Namespace) -> int:
    from bitfleet.protocol import parse_broker_url
    from coordinator.config import job_config_from_dict
    from coordinator.evaluation import width_label
    from coordinator.server import Coordinator, RoundReport
    from fleet.broker import EmbeddedBroker

    from .report import check_onnx_files, write_outputs

    if args.devices < 2:
        raise ValueError("--devices must be at least 2")
    if args.rounds < 1:
        raise ValueError("--rounds must be at least 1")
    out = Path(args.out)
    shutil.rmtree(out / "state", ignore_errors=True)  # each demo is a fresh job
    shutil.rmtree(out / "devices", ignore_errors=True)
    out.mkdir(parents=True, exist_ok=True)
    cfg = job_config_from_dict(_job(args, out), source="bitfleet demo")
    broker: EmbeddedBroker | MosquittoProcess | None = None
    fleet: Provisioned | None = None
    url = args.broker
    if args.secure:
        fleet, broker = _start_secure_broker(args, out)
        url = fleet.coordinator_url
    elif url is None:
        broker = EmbeddedBroker().start()
        url = broker.url
    t0 = time.perf_counter()
    metrics = (out / "metrics.jsonl").open("w")

    def show(r: RoundReport) -> None:
        deploy = " ".join(f"{width_label(b)} {a:.3f}" for b, a in r.acc_deploy.items())
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
        f"bitfleet demo: broker {parse_broker_url(url)}"  # never the password
        + (f" (TLS, one account per device, see {fleet.out})" if fleet else "")
        + f", {args.devices} agents, {args.rounds} rounds, "
        f"allocation {args.allocation} ({args.strategy}); logs in {out / 'logs'}",
        flush=True,
    )
    agents: list[tuple[str, subprocess.Popen]] = []
    try:
        agents = _spawn_agents(args, url, out, fleet)
        ca_file = str(fleet.ca_file) if fleet else None
        coordinator = Coordinator(cfg, url, ca_file=ca_file, on_round=show)
        job = coordinator.run()
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
    onnx = check_onnx_files(job, coordinator.data, out)
    limits_why = {
        name: DEMO_LIMITS[i][0]
        for i, (name, _) in enumerate(agents)
        if i in DEMO_LIMITS and not args.no_limits
    }
    summary = write_outputs(job, cfg, onnx, out, time.perf_counter() - t0, limits_why)
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
