"""`bitfleet bench reallocation`: a board that slows down mid-job is re-allocated in time.

Runs one FedHQ job of an experiment file twice on the simulator: once with one virtual board
training `--factor` times slower from round `--from-round` (thermal throttling, other load), and
once with that board slow from the start (it registers its slow step times). It reports when
the coordinator moved the board and by how much the simulated round times of the two runs
differ from then on (docs/allocation.md#runtime).
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

EXPERIMENT = Path(__file__).resolve().parent.parent / "experiments" / "reallocation_fmnist.toml"
BY_ROUND = 5
"""The round (1-based) by which the slowed board must have moved."""
TOLERANCE = 0.10
"""How far its round times may then be from the slow-from-the-start run's."""


def add_bench_parser(kinds: argparse._SubParsersAction) -> None:
    """`bitfleet bench reallocation`, registered through the `bitfleet.benches` entry points."""
    bench = kinds.add_parser(
        "reallocation",
        help="FedHQ at runtime: one virtual board slows down mid-job; is it re-allocated by "
        "round 5, and do rounds then take as long as with the board slow from the start",
        description="Runs the experiment's first method twice on the simulator (slowed from "
        "--from-round, slow from the start) and compares when the board moves and the "
        "simulated round times after the move. Prints a table, writes JSON with --json.",
    )
    bench.add_argument(
        "--config",
        default=str(EXPERIMENT),
        metavar="TOML",
        help="experiment file (default experiments/reallocation_fmnist.toml)",
    )
    bench.add_argument(
        "--device",
        metavar="ID",
        help="the board that slows (default: the QAT device whose QAT round is longest, the "
        "nearest to the boundary)",
    )
    bench.add_argument("--factor", type=float, default=4.0, help="slowdown (default 4)")
    bench.add_argument("--from-round", type=int, default=3, metavar="N",
                       help="first slow round, 1-based (default 3)")  # fmt: skip
    bench.add_argument("--out", default="runs/bench-reallocation", metavar="DIR",
                       help="state of the two runs (default runs/bench-reallocation)")  # fmt: skip
    bench.add_argument("--json", metavar="OUT", help="write the results as JSON to OUT")
    bench.set_defaults(run=run_bench)


def _nearest_to_boundary(exp: Any, fleet: Any, cfg: Any) -> str:
    """The QAT-side device whose QAT round is the longest: the first a slowdown pushes over."""
    from coordinator.allocation import AllocationInput, make_allocation_rule

    fleet_in = AllocationInput(
        registrations=fleet.registrations(),
        local_epochs=cfg.training.local_epochs,
        batch_size=cfg.training.batch_size,
        model_bytes=1,
    )
    alloc = make_allocation_rule(cfg.allocation, cfg.job.seed).allocate(fleet_in)
    costs = {c.device: c for c in fleet_in.costs(cfg.allocation.calib_batches)}
    qat = [d for d, s in alloc.strategies.items() if s == cfg.allocation.qat_strategy]
    if not qat:
        raise ValueError("the experiment allocates no device to QAT: nothing to re-allocate")
    return max(qat, key=lambda d: costs[d].qat_round)


def run_reallocation_bench(
    config: str | Path, device: str | None, factor: float, from_round: int, out: Path
) -> dict[str, Any]:
    from bitfleet.data import load_dataset
    from coordinator.config import job_config_from_dict
    from fleet.simulate.experiment import load_experiment
    from fleet.simulate.run import _job_dict, run_method
    from fleet.simulate.virtual_fleet import build_fleet

    exp = load_experiment(config)
    name, overlay = next(iter(exp.methods.items()))
    cfg = job_config_from_dict(_job_dict(exp, overlay, name, out, True), source=str(exp.path))
    if cfg.allocation.mode != "fedhq":
        raise ValueError(f"{exp.path}: the first method must be FedHQ, got {cfg.allocation.mode}")
    data = load_dataset(cfg.data.dataset, data_dir=cfg.data.data_dir)
    plain = build_fleet(exp, data, cfg, True)
    device = device or _nearest_to_boundary(exp, plain, cfg)
    if device not in {d.id for d in exp.devices}:
        raise ValueError(f"--device {device}: not in the experiment's fleet")
    runs: dict[str, dict[str, Any]] = {}
    for label, start in (("slowed", from_round), ("slow_from_start", 1)):
        devices = [
            replace(d, slow_from_round=start, slow_factor=factor) if d.id == device else d
            for d in exp.devices
        ]
        exp_v = replace(exp, devices=devices)
        fleet = build_fleet(exp_v, data, cfg, True, plain.host_steps)
        print(f"bench reallocation: {label} ({device} {factor:g}x from round {start})",
              file=sys.stderr, flush=True)  # fmt: skip
        _, coordinator = run_method(
            exp_v, name, overlay, fleet, data, out / label, quick=True, broker=None
        )
        job = coordinator.result()
        runs[label] = {
            "sim_seconds": [r.sim_seconds for r in job.reports],
            "moves": [m.to_dict() for m in job.moves if m.device == device],
            "final_strategy": job.assignments[device].strategy,
        }
    moves = runs["slowed"]["moves"]
    moved_at = moves[0]["round"] + 1 if moves else None  # 1-based, as reports count
    slowed, start = runs["slowed"]["sim_seconds"], runs["slow_from_start"]["sim_seconds"]
    after = range((moved_at or len(slowed) + 1) - 1, min(len(slowed), len(start)))
    gaps = [abs(slowed[i] - start[i]) / start[i] for i in after]
    result = {
        "device": device,
        "factor": factor,
        "from_round": from_round,
        "moved_at_round": moved_at,
        "move": moves[0] if moves else None,
        "max_gap_after_move": max(gaps) if gaps else None,
        "runs": runs,
        "met": {
            f"moved_by_round_{BY_ROUND}": moved_at is not None and moved_at <= BY_ROUND,
            f"rounds_within_{TOLERANCE:.0%}": bool(gaps) and max(gaps) <= TOLERANCE,
        },
    }
    return result


def run_bench(args: argparse.Namespace) -> int:
    from bitfleet.cli.output import write_json

    if args.factor <= 1 or args.from_round < 2:
        raise ValueError("--factor must be above 1 and --from-round at least 2")
    r = run_reallocation_bench(args.config, args.device, args.factor, args.from_round,
                               Path(args.out))  # fmt: skip
    slowed = r["runs"]["slowed"]["sim_seconds"]
    start = r["runs"]["slow_from_start"]["sim_seconds"]
    print(f"\n{r['device']} {r['factor']:g}x slower from round {r['from_round']}")
    print("| round | slowed: simulated s | slow from start: simulated s | gap |")
    print("|---|---|---|---|")
    for i, (a, b) in enumerate(zip(slowed, start, strict=False)):
        mark = " <- moved" if r["moved_at_round"] == i + 1 else ""
        print(f"| {i + 1} | {a:.1f} | {b:.1f} | {abs(a - b) / b:+.1%}{mark} |")
    move = r["move"]
    print(f"moved: {move['old']} -> {move['new']} at round {r['moved_at_round']} ({move['reason']})"
          if move else "moved: never")  # fmt: skip
    for line, ok in r["met"].items():
        print(f"{'met' if ok else 'NOT met'}: {line}")
    if args.json:
        write_json(args.json, r)
    return 0 if all(r["met"].values()) else 1
