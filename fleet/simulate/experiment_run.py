"""A whole experiment: every method and ablation, once per seed, then results and report.

Repeated seeds share one data set load and one host step measurement, so their board clocks
are comparable. An ablation whose coarse allocation equals a method's already run reuses that
run's results instead of training again.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from bitfleet.data import DATASET_SPECS, ImageData, load_dataset
from coordinator.allocation import QUANT_IN_FORWARD, AllocationInput, make_allocation_rule
from coordinator.config import JobConfig, job_config_from_dict

from .compute import ProcessCompute, make_compute
from .experiment import Experiment, _check_seeds, _merge, load_experiment
from .results import _capture, _with_sum, _write, _write_mean
from .run import _job_dict, run_method
from .virtual_fleet import VirtualFleet, build_fleet


def run_experiment(
    path: str | Path,
    out: str | Path,
    *,
    quick: bool = False,
    broker: str | None = None,
    seeds: Sequence[int] | None = None,
    recalibrate: bool = False,
    runner: str = "processes",
    only: Sequence[str] | None = None,
) -> dict[str, Any]:
    """Run every method of an experiment file; write results.json, report.md and plots.

    With several seeds every method and ablation runs once per seed, each seed's own results
    go to `DIR/seed-N/`, and `DIR/results.json` holds their means (with each seed's figures
    under `by_seed`): a ranking of methods from one seed is often the seed's, not the
    methods'. `only` runs just the methods and ablations it names.
    """
    from .report import write_report

    exp = load_experiment(path)
    if only:
        exp = exp.only(only)
    seeds = _check_seeds(list(seeds), "--seeds") if seeds else exp.seeds_for(quick)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    per_seed: dict[int, dict[str, Any]] = {}
    # The sequential runner is per method (run_method's); worker processes start once.
    compute = make_compute(runner) if runner != "sequential" else None
    try:
        _run_seeds(exp, seeds, out, quick, broker, recalibrate, compute, per_seed, t0)
    finally:
        if compute is not None:
            compute.close()
    one = len(seeds) == 1
    results = per_seed[seeds[0]] if one else _write_mean(out, exp, quick, per_seed, t0)
    write_report(results, out)
    return results


def _run_seeds(
    exp: Experiment,
    seeds: Sequence[int],
    out: Path,
    quick: bool,
    broker: str | None,
    recalibrate: bool,
    compute: ProcessCompute | None,
    per_seed: dict[int, dict[str, Any]],
    t0: float,
) -> None:
    """Every method and ablation of `exp` once per seed, into `per_seed`."""
    from .report import write_report

    data: ImageData | None = None
    host_steps: dict[str, float] | None = None
    for seed in seeds:
        exp_s = exp.with_seed(seed)
        out_s = out if len(seeds) == 1 else out / f"seed-{seed}"
        out_s.mkdir(parents=True, exist_ok=True)
        first = _job_dict(exp_s, next(iter(exp_s.methods.values())), "base", out_s, quick)
        base_cfg = job_config_from_dict(first, source=str(exp.path))
        if data is None:
            data = load_dataset(base_cfg.data.dataset, data_dir=base_cfg.data.data_dir)
        fleet = build_fleet(exp_s, data, base_cfg, quick, host_steps, recalibrate)
        host_steps = fleet.host_steps
        print(
            f"bitfleet simulate {exp.name}: {len(exp.devices)} virtual devices, "
            f"{len(exp.methods)} methods{' (quick)' if quick else ''}, seed {seed}"
            f"{f' ({len(per_seed) + 1} of {len(seeds)})' if len(seeds) > 1 else ''}; "
            "host step times (cost model, cached) "
            + ", ".join(f"{k} {v * 1e3:.2f} ms" for k, v in fleet.host_steps.items()),
            file=sys.stderr,
            flush=True,
        )
        methods: dict[str, dict[str, Any]] = {}
        by_assignment: dict[str, str] = {}
        for name, overlay in exp_s.methods.items():
            methods[name], _ = run_method(
                exp_s, name, overlay, fleet, data, out_s, quick=quick, broker=broker,
                compute=compute,
            )  # fmt: skip
            by_assignment.setdefault(_assignment_key(exp_s, overlay, methods[name]), name)
            _write(out_s, exp_s, quick, methods, {}, t0)  # keep what is done if a later one fails
        ablations = _run_ablations(
            exp_s, fleet, data, out_s, quick, broker, methods, by_assignment, compute
        )
        per_seed[seed] = _write(out_s, exp_s, quick, methods, ablations, t0)
        if len(seeds) > 1:
            write_report(per_seed[seed], out_s)


def _assignment_key(exp: Experiment, overlay: Mapping[str, Any], result: dict) -> str:
    """Two runs with the same training setup and the same assignment compute the same thing."""
    job = _merge(exp.base, overlay)
    setup = {k: v for k, v in job.items() if k != "allocation"}
    a = dict(job.get("allocation", {}))
    for key in ("mode", "xi", "a", "p_qat", "speed_rule", "acc_rule", "fine", "time_weight"):
        a.pop(key, None)
    return json.dumps([setup, a, result["assignment"]], sort_keys=True, default=str)


def _run_ablations(
    exp: Experiment,
    fleet: VirtualFleet,
    data: ImageData,
    out: Path,
    quick: bool,
    broker: str | None,
    methods: dict[str, dict],
    by_assignment: dict[str, str],
    compute: ProcessCompute | None = None,
) -> dict[str, Any]:
    """Each ablation is a FedHQ variant (xi, SigAcc rule...). Its coarse allocation is computed
    first; where it equals a method already run, that run's results are its results (same
    seeds, same computation), otherwise it is trained like a method."""
    results: dict[str, Any] = {}
    registrations = fleet.registrations()
    for name, overlay in exp.ablations.items():
        job = _job_dict(exp, overlay, name, out, quick)
        cfg = job_config_from_dict(job, source=f"{exp.path} [ablations.{name}]")
        entry: dict[str, Any] = {"allocation": dict(overlay.get("allocation", {}))}
        if not cfg.allocation.fine:
            fleet_in = AllocationInput(
                registrations=registrations,
                local_epochs=cfg.training.local_epochs,
                batch_size=cfg.training.batch_size,
                model_bytes=_model_bytes(cfg),
            )
            alloc = make_allocation_rule(cfg.allocation, cfg.job.seed).allocate(fleet_in)
            key = _assignment_key(
                exp, overlay, {"assignment": dict(sorted(alloc.strategies.items()))}
            )
            same = by_assignment.get(key)
        else:
            same = None
        if same is not None:
            run = methods[same]
            entry["same_assignment_as"] = same
        else:
            run, _ = run_method(
                exp, name, overlay, fleet, data, out, quick=quick, broker=broker, compute=compute
            )
            by_assignment.setdefault(_assignment_key(exp, overlay, run), name)
        entry.update(
            assignment=run["assignment"],
            final_acc=run["final_acc"],
            sim_seconds=run["sim_seconds"],
            qat_devices=sum(1 for s in run["assignment"].values() if s in QUANT_IN_FORWARD),
        )
        for key in ("acc_by_bits", "device_acc", "allocation_seconds", "fine"):
            if key in run and (cfg.allocation.fine or key not in ("allocation_seconds", "fine")):
                entry[key] = run[key]
        methods_with = {**methods, name: run}
        cap = _capture(methods_with, name)
        if cap is not None:
            entry.update(_with_sum(cap))
        results[name] = entry
    return results


def _model_bytes(cfg: JobConfig) -> int:
    from bitfleet.models import create_model_for

    model = create_model_for(cfg.model.name, DATASET_SPECS[cfg.data.dataset])
    return sum(v.numel() * v.element_size() for v in model.state_dict().values())
