"""`bitfleet bench simulator`: the simulator's runners side by side, in one run.

One method of an experiment (by default `fedhq_fmnist`'s first, in its quick settings) runs for a
few rounds once with the sequential runner (the boards' local rounds one after another on the
main thread) and once with worker processes (`fleet/simulate/compute.py`). The bench reports the
host seconds per round of each, their ratio, and how far apart the two final models are: the
same boards, seeds and rounds, so only the float summation order (one thread against two, the
order updates arrive in) separates them (docs/simulation.md#compute).
"""

from __future__ import annotations

import argparse
import statistics
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

EXPERIMENT = Path(__file__).resolve().parent.parent / "experiments" / "fedhq_fmnist.toml"
ONE_ROUND_TOLERANCE = 1e-4
"""Largest relative parameter difference the two runners' models may show after one round:
float noise (8.8e-6 measured on tiny data, tests/e2e/test_sim_compute.py). Over more rounds QAT's
rounding amplifies it (0.065 after three rounds there): a weight a hair from a bin edge lands
on either side, so the bench reports the difference and both accuracies, and does not gate on it."""


def add_bench_parser(kinds: argparse._SubParsersAction) -> None:
    """`bitfleet bench simulator`, registered through the `bitfleet.benches` entry points."""
    bench = kinds.add_parser(
        "simulator",
        help="the simulator's sequential runner against its worker processes, in one run: "
        "host seconds per round and the difference of the final models",
        description="Runs one method of an experiment for --rounds rounds with each runner and "
        "prints host seconds per round, the speed-up and the models' largest difference.",
    )
    bench.add_argument(
        "--config", default=str(EXPERIMENT), metavar="TOML",
        help="experiment file (default experiments/fedhq_fmnist.toml)",
    )  # fmt: skip
    bench.add_argument("--method", help="the method to run (default: the file's first)")
    bench.add_argument("--rounds", type=int, default=3, metavar="N", help="default 3")
    bench.add_argument("--out", default="runs/bench-simulator", metavar="DIR",
                       help="state of the runs (default runs/bench-simulator)")  # fmt: skip
    bench.add_argument("--json", metavar="OUT", help="write the results as JSON to OUT")
    bench.set_defaults(run=run_bench)


def model_difference(a: dict[str, Any], b: dict[str, Any]) -> float:
    """The largest |a - b| over every float tensor, relative to that tensor's largest |a|."""
    worst = 0.0
    for key, ta in a.items():
        if not ta.is_floating_point():
            continue
        scale = float(ta.abs().max()) or 1.0
        worst = max(worst, float((ta - b[key]).abs().max()) / scale)
    return worst


def step_ceiling(model_name: str, batch_size: int, workers: int) -> dict[str, Any]:
    """The most any runner that shares this host's cores can gain over the sequential one,
    measured: the sequential runner takes one float step on torch's threads; `workers`
    single-threaded processes take `workers` steps in the time one takes on one thread. Their
    ratio bounds the speed-up for a compute-bound step (LeNet-5's per-sample cost is flat from
    batch 64 to 640 here, so stacking boards into one batch gains nothing either)."""
    import torch

    from bitfleet.profiles import time_train_steps
    from bitfleet.quant import make_method

    threads = torch.get_num_threads()

    def step(n: int) -> float:
        torch.set_num_threads(n)
        try:
            return min(
                time_train_steps(
                    model_name, {"fp": make_method("fp")}, batch_size=batch_size, steps=40
                )["fp"]
                for _ in range(3)
            )
        finally:
            torch.set_num_threads(threads)

    shared, one = step(threads), step(1)
    return {
        "step_ms_torch_threads": shared * 1e3,
        "torch_threads": threads,
        "step_ms_one_thread": one * 1e3,
        "workers": workers,
        "ceiling": shared / (one / workers),
    }


def run_simulator_bench(
    config: str | Path, method: str | None, rounds: int, out: Path
) -> dict[str, Any]:
    from bitfleet.data import load_dataset
    from coordinator.config import job_config_from_dict
    from fleet.simulate.compute import ProcessCompute
    from fleet.simulate.experiment import _merge, load_experiment
    from fleet.simulate.run import _job_dict, run_method
    from fleet.simulate.virtual_fleet import build_fleet

    exp = load_experiment(config)
    name = method or next(iter(exp.methods))
    if name not in exp.methods:
        raise ValueError(f"--method {name}: not in {sorted(exp.methods)}")
    overlay = _merge(exp.methods[name], {"training": {"rounds": rounds}})
    exp = replace(exp, quick=_merge(exp.quick, {"training": {"rounds": rounds}}))
    cfg = job_config_from_dict(_job_dict(exp, overlay, name, out, True), source=str(exp.path))
    data = load_dataset(cfg.data.dataset, data_dir=cfg.data.data_dir)
    fleet = build_fleet(exp, data, cfg, True)
    runs: dict[str, Any] = {}
    states = {}
    workers = 1
    for runner in ("sequential", "processes"):
        compute = ProcessCompute() if runner == "processes" else None
        workers = compute.workers if compute is not None else workers
        print(f"bench simulator: {name}, {rounds} rounds, {runner}", file=sys.stderr, flush=True)
        try:
            entry, coordinator = run_method(
                exp, name, overlay, fleet, data, out / runner, quick=True, broker=None,
                compute=compute,
            )  # fmt: skip
        finally:
            if compute is not None:
                compute.close()
        job = coordinator.result()
        per_round = [r.host_seconds for r in job.reports]
        runs[runner] = {
            "host_seconds_per_round": per_round,
            "mean_round_s": statistics.mean(per_round),
            "final_acc": entry["final_acc"],
            "sim_seconds": entry["sim_seconds"],
        }
        states[runner] = job.global_state
    ratio = runs["sequential"]["mean_round_s"] / runs["processes"]["mean_round_s"]
    diff = model_difference(states["sequential"], states["processes"])
    ceiling = step_ceiling(cfg.model.name, cfg.training.batch_size, workers)
    return {
        "method": name,
        "rounds": rounds,
        "devices": len(exp.devices),
        "runs": runs,
        "speedup": ratio,
        "ceiling": ceiling,
        "model_difference": diff,
        "met": {"speedup_at_least_2x": ratio >= 2.0},
    }


def run_bench(args: argparse.Namespace) -> int:
    from bitfleet.cli.output import write_json

    if args.rounds < 1:
        raise ValueError("--rounds must be at least 1")
    r = run_simulator_bench(args.config, args.method, args.rounds, Path(args.out))
    print(f"\n{r['method']}, {r['devices']} boards, {r['rounds']} rounds")
    print("| runner | host s per round | final acc | simulated s |")
    print("|---|---|---|---|")
    for runner, v in r["runs"].items():
        print(f"| {runner} | {v['mean_round_s']:.2f} | {v['final_acc']} | {v['sim_seconds']} |")
    print(f"speed-up {r['speedup']:.2f}x; largest relative model difference "
          f"{r['model_difference']:.2e}")  # fmt: skip
    c = r["ceiling"]
    print(
        f"ceiling on this host {c['ceiling']:.2f}x: one float step "
        f"{c['step_ms_torch_threads']:.2f} ms on {c['torch_threads']} torch threads, "
        f"{c['step_ms_one_thread']:.2f} ms on one, {c['workers']} workers"
    )
    for line, ok in r["met"].items():
        print(f"{'met' if ok else 'NOT met'}: {line}")
    if args.json:
        write_json(args.json, r)
    return 0 if all(r["met"].values()) else 1
