"""`bitfleet coordinator serve`: the fleet's server as a daemon."""

from __future__ import annotations

import argparse
import signal


def add_parser(sub: argparse._SubParsersAction) -> None:
    coord = sub.add_parser("coordinator", help="run the coordinator daemon")
    actions = coord.add_subparsers(dest="coordinator_command", metavar="ACTION", required=True)
    serve = actions.add_parser(
        "serve",
        help="run a federated job from a TOML job file",
        description="Waits for agents, assigns strategies and bits, runs rounds with deadline "
        "and quorum, evaluates and checkpoints every round (restart resumes), and sends each "
        "device its quantized ONNX model at the end.",
    )
    serve.add_argument("--config", required=True, metavar="JOB.toml", help="the job file")
    serve.add_argument(
        "--broker", default="mqtt://127.0.0.1:1883", metavar="URL", help="MQTT broker URL"
    )
    serve.add_argument("--ca-file", help="CA certificate for mqtts://")
    serve.set_defaults(run=run_serve)


def run_serve(args: argparse.Namespace) -> int:
    from .config import load_job_config
    from .server import Coordinator, RoundReport

    cfg = load_job_config(args.config)

    def show(r: RoundReport) -> None:
        deploy = " ".join(f"{b}b {a:.4f}" for b, a in r.acc_deploy.items())
        print(
            f"round {r.round + 1}/{cfg.training.rounds}: {len(r.received)}/{len(r.selected)} "
            f"devices, {len(r.stragglers)} late, acc {r.acc_fp32:.4f} ({deploy}), "
            f"{r.host_seconds:.1f} s",
            flush=True,
        )

    coordinator = Coordinator(cfg, args.broker, ca_file=args.ca_file, on_round=show)
    signal.signal(signal.SIGTERM, lambda *_: coordinator.stop())
    coordinator.run()
    return 0
