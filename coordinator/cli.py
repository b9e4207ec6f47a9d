"""`bitfleet coordinator serve`: the fleet's server as a daemon; other actions by entry point.

Actions that need more than the coordinator (`provision`, which lives in fleet/) register under
the `bitfleet.coordinator_actions` entry point group, so this role imports none of them.
"""

from __future__ import annotations

import argparse
import signal
import sys

from bitfleet import plugins
from bitfleet.protocol.credentials import BROKER_ENV, PASSWORD_FILE_HELP, resolve_broker

DEFAULT_BROKER = "mqtt://127.0.0.1:1883"


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
        "--broker",
        metavar="URL",
        help=f"mqtt://[user@]host[:port] or mqtts://... (default ${BROKER_ENV}, else "
        f"{DEFAULT_BROKER}); the password does not belong here (see --password-file)",
    )
    serve.add_argument("--password-file", metavar="PATH", help=PASSWORD_FILE_HELP)
    serve.add_argument("--ca-file", help="CA certificate for mqtts://")
    serve.set_defaults(run=run_serve)
    for add_action in plugins.load_all("bitfleet.coordinator_actions").values():
        add_action(actions)


def run_serve(args: argparse.Namespace) -> int:
    from bitfleet.data.availability import check_available

    from .checkpoint import CheckpointError
    from .config import load_job_config
    from .server import Coordinator, RoundReport
    from .state import check_state_dir

    cfg = load_job_config(args.config)
    # What the operator has to fix is found before connecting, not rounds into the job.
    address = resolve_broker(args.broker, args.password_file, default=DEFAULT_BROKER)
    check_state_dir(cfg.job.state_dir)
    check_available(cfg.data.dataset, cfg.data.data_dir)

    def show(r: RoundReport) -> None:
        deploy = " ".join(f"{b}b {a:.4f}" for b, a in r.acc_deploy.items())
        print(
            f"round {r.round + 1}/{cfg.training.rounds}: {len(r.received)}/{len(r.selected)} "
            f"devices, {len(r.stragglers)} late, acc {r.acc_fp32:.4f} ({deploy}), "
            f"{r.host_seconds:.1f} s",
            flush=True,
        )

    coordinator = Coordinator(cfg, address, ca_file=args.ca_file, on_round=show)
    signal.signal(signal.SIGTERM, lambda *_: coordinator.stop())
    try:
        result = coordinator.run()
    except CheckpointError as exc:
        # A full or read-only disk is the operator's to fix: what and where, not a traceback.
        # The last checkpoint is intact, so the same command resumes once the disk is fixed.
        if args.verbose:
            raise
        print(f"bitfleet: error: {exc}", file=sys.stderr)
        return 1
    for m in result.moves:
        print(f"round {m.round + 1}: {m.device} moved {m.old} -> {m.new} ({m.reason})")
    for device, path in sorted(result.exported.items()):
        choice = result.deploy.get(device)
        why = f" ({choice.chosen}: {choice.reason})" if choice else ""
        print(f"model for {device}: {path}{why}", flush=True)
    for device, why in sorted(result.export_failures.items()):
        print(f"bitfleet: no model for {device}: {why}", file=sys.stderr, flush=True)
    return 1 if result.export_failures else 0
