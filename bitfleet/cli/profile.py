"""`bitfleet profile`: what this machine is, which known board kind it is closest to, how fast.

A device owner runs it once after installing, before `bitfleet agent run`: it shows what the
agent will tell the coordinator at registration (the same `profile_summary`), so a wrong board
kind, a missing dot-product flag or a throttled clock is seen before the first round.
"""

from __future__ import annotations

import argparse
import sys
from typing import TYPE_CHECKING, Any

from .output import write_json

if TYPE_CHECKING:
    from ..profiles import DeviceProfile


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "profile",
        help="measure this machine and name the closest known board kind",
        description="Print this machine's measured profile (cores, clock, memory, integer "
        "dot-product support), the closest board kind in profiles/, and the median time of a "
        "float and a QAT training step on random data: what an agent sends at registration.",
    )
    p.add_argument("--model", default="lenet5", help="model to time (default lenet5)")
    p.add_argument(
        "--dataset",
        default="fashion-mnist",
        help="data set whose input shape and class count to use (default fashion-mnist)",
    )
    p.add_argument("--batch-size", type=int, default=64, help="batch size (default 64)")
    p.add_argument("--steps", type=int, default=8, help="timed steps of each kind (default 8)")
    p.add_argument("--qat-bits", type=int, default=4, help="QAT bit-width to time (default 4)")
    p.add_argument("--no-steps", action="store_true", help="skip the step timing")
    p.add_argument("--json", metavar="OUT", help="write the registration summary as JSON to OUT")
    p.add_argument(
        "--profiles-dir",
        metavar="DIR",
        help="folder of board profiles (default: $BITFLEET_PROFILES_DIR, then the shipped ones)",
    )
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from ..profiles import load_profiles, match_board, measure_machine, profile_summary

    if not args.no_steps:
        _check_step_args(args)  # a typo fails now, not after the machine was measured
    profiles = load_profiles(args.profiles_dir)
    measured = measure_machine()
    match = match_board(
        profiles,
        device_tree_model=measured["device_tree_model"] or "",
        tegra=measured["nv_tegra_release"],
        arch=measured["arch"],
    )
    print(format_machine(measured))
    board = match.profile
    print(f"closest known kind: {board.name} ({match.reason})")
    print(f"  {format_board(board)}")
    steps = None
    if not args.no_steps:
        steps = _time_steps(args)
        print(format_steps(steps, board.qat_overhead))
    summary = profile_summary(board, measured, steps)
    if args.json:
        print(f"wrote {write_json(args.json, summary)}")
    return 0


def _check_step_args(args: argparse.Namespace) -> None:
    from ..data.specs import get_spec
    from ..models import MODELS
    from ..quant import check_bits

    get_spec(args.dataset)
    if args.model not in MODELS:
        raise ValueError(f"unknown model {args.model!r}; known models: {', '.join(sorted(MODELS))}")
    check_bits(args.qat_bits)
    if args.batch_size <= 0 or args.steps <= 0:
        raise ValueError(
            f"--batch-size and --steps must be positive, got {args.batch_size}, {args.steps}"
        )


def _time_steps(args: argparse.Namespace) -> dict[str, Any]:
    from ..data.specs import get_spec
    from ..profiles import measure_step_times

    spec = get_spec(args.dataset)
    print(
        f"timing {args.steps} float and {args.steps} QAT steps of {args.model}, "
        f"batch {args.batch_size} ...",
        file=sys.stderr,
    )
    return measure_step_times(
        args.model,
        batch_size=args.batch_size,
        steps=args.steps,
        in_channels=spec.in_channels,
        image_size=spec.image_size,
        num_classes=spec.num_classes,
        qat_bits=args.qat_bits,
    )


def format_machine(m: dict[str, Any]) -> str:
    clock = f"{m['max_clock_ghz']} GHz" if m.get("max_clock_ghz") else "clock unknown"
    dot = ",".join(m["int_dot_product"]) or "none"
    tegra = "yes" if m["nv_tegra_release"] else "no"
    return (
        f"machine: {m['arch']}, {m['logical_cores']} cores ({m['usable_cores']} usable), "
        f"max {clock}, {m['memory_gib']} GiB ({m['memory_available_gib']} available), "
        f"int dot-product: {dot}\n"
        f"  device tree model: {m['device_tree_model'] or 'none'}; Jetson (L4T): {tegra}; "
        f"python {m['python']}, torch {m['torch']} ({m['torch_threads']} threads), "
        f"onnxruntime {m['onnxruntime'] or 'not installed'}"
    )


def format_board(board: DeviceProfile) -> str:
    def widths(bits: tuple[int, ...]) -> str:
        return "/".join(map(str, bits))

    bound = "speed-bound" if board.speed_bound else "storage-bound"
    return (
        f"{board.description}\n  {bound}: stores {board.preferred_storage}; integer kernels at "
        f"{widths(board.deploy_bits)} bits, packs {widths(board.storage_bits)} bits; "
        f"relative speed {board.relative_speed:g}, link {board.link_mbps:g} Mbps"
    )


def format_steps(steps: dict[str, Any], prior: float) -> str:
    ratio = steps["t_qat"] / steps["t_fp"]
    return (
        f"step time ({steps['model']}, batch {steps['batch_size']}, median of {steps['steps']}, "
        f"{steps['torch_threads']} threads): float {steps['t_fp'] * 1e3:.2f} ms, "
        f"QAT {steps['qat_bits']}-bit {steps['t_qat'] * 1e3:.2f} ms "
        f"(x{ratio:.2f}; the profile assumes x{prior:g})"
    )
