"""`bitfleet bench ...`: benchmarks that print a table and write JSON."""

from __future__ import annotations

import argparse

from .. import plugins
from ..progress import Progress
from .output import write_json


def add_parser(sub: argparse._SubParsersAction) -> None:
    bench = sub.add_parser(
        "bench",
        help="measure accuracy and speed; print a table and write JSON",
        description="Benchmarks. Each prints a table on stdout, progress on stderr, "
        "and writes its figures as JSON with --json.",
    )
    kinds = bench.add_subparsers(dest="bench", metavar="KIND", required=True)
    quant = kinds.add_parser(
        "quant",
        help="PTQ, QAT and MQAT accuracy and QAT step cost, LeNet-5 on Fashion-MNIST",
        description="Centralised Fashion-MNIST, LeNet-5, fixed seed: float accuracy; PTQ at "
        "8/6/4/3/2 bits with max-abs and MSE scales; QAT at 4 and 2 bits; MQAT over "
        "{2,3,4,6,8} evaluated at 32..2 bits; the QAT/float step-time ratio.",
    )
    quant.add_argument(
        "--quick", action="store_true", help="fewer epochs (a few minutes on 2 cores)"
    )
    quant.add_argument("--json", metavar="OUT", help="write the results as JSON to OUT")
    quant.add_argument(
        "--data-dir",
        metavar="DIR",
        help="folder with the Fashion-MNIST IDX files (default: $BITFLEET_DATA_DIR, then "
        "/usr/share/datasets/fashion-mnist)",
    )
    quant.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    quant.set_defaults(run=run_quant)
    # Benchmarks of the roles (e.g. `bench export`) register as entry points.
    for add_role_bench in plugins.load_all("bitfleet.benches").values():
        add_role_bench(kinds)


def run_quant(args: argparse.Namespace) -> int:
    from dataclasses import replace

    from ..bench.quant import FULL, QUICK, format_table, run_quant_bench

    cfg = replace(QUICK if args.quick else FULL, seed=args.seed)
    result = run_quant_bench(cfg, data_dir=args.data_dir, progress=Progress())
    print(format_table(result))
    if args.json:
        print(f"wrote {write_json(args.json, result)}")
    return 0
