"""The `bitfleet simulate` command: its arguments, and what it prints when done."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from coordinator.config import JobConfigError

from .compute import RUNNERS
from .experiment import _check_seeds
from .experiment_run import run_experiment


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "simulate",
        help="reproduce an experiment with many virtual boards in one process",
        description="Runs every method of an experiment file (experiments/*.toml) as a "
        "federated job through the coordinator's own code, with virtual boards from profiles/ "
        "on an in-process bus (or --broker). Writes DIR/results.json, DIR/report.md and plots.",
    )
    p.add_argument("--config", required=True, metavar="FILE", help="experiment TOML file")
    p.add_argument("--out", required=True, metavar="DIR", help="output folder")
    p.add_argument(
        "--quick", action="store_true", help="the file's [simulate.quick] settings (fewer rounds)"
    )
    p.add_argument(
        "--broker", metavar="URL", help="run over this MQTT broker instead of in-process"
    )
    p.add_argument(
        "--seeds",
        type=_seed_list,
        metavar="N[,N...]",
        help="job seeds to repeat every method over (default: the file's [simulate] seeds, "
        "else its [job] seed); with several, results.json holds the means and DIR/seed-N/ "
        "each seed's own results",
    )
    p.add_argument(
        "--methods",
        type=lambda text: [n.strip() for n in text.split(",") if n.strip()],
        metavar="NAME[,NAME...]",
        help="run only these methods and ablations of the file (default: all of them)",
    )
    p.add_argument(
        "--recalibrate",
        action="store_true",
        help="time this host's training steps again before the run (default: the figures "
        "measured the first time, cached: the board clock does not move with host load)",
    )
    p.add_argument(
        "--runner",
        choices=RUNNERS,
        default="processes",
        help="where the boards' local rounds run: processes (default: one worker per core, "
        "one torch thread each) or sequential (one after another on the main thread)",
    )
    p.set_defaults(run=_run)


def _seed_list(text: str) -> list[int]:
    try:
        seeds = [int(part) for part in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated integers such as 0,1,2, got {text!r}"
        ) from None
    try:
        return list(_check_seeds(seeds, "--seeds"))
    except JobConfigError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _run(args: argparse.Namespace) -> int:
    results = run_experiment(
        args.config,
        args.out,
        quick=args.quick,
        broker=args.broker,
        seeds=args.seeds,
        recalibrate=args.recalibrate,
        runner=args.runner,
        only=args.methods,
    )
    for name, m in results["methods"].items():
        print(
            f"{name:>16}: acc {m['final_acc']} at {m['deploy_bits']} bits, "
            f"fp32 {m['final_acc_fp32']}, {m['sim_seconds']:.0f} s simulated, "
            f"{m['host_seconds']:.0f} s host"
        )
    if results["summary"]:
        print("summary:", json.dumps(results["summary"]))
    print(f"wrote {Path(args.out) / 'results.json'} and report.md in {results['seconds']:.0f} s")
    return 0
