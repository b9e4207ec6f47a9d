"""What `bitfleet simulate` writes to results.json: one entry per method, captures, summaries.

`_method_results` is the one place that reads a finished job (its `JobResult`); everything
after it works on plain dicts. results.json is written whole or not at all, after
every method (so a later failure keeps what is done), and with several seeds holds their means.
"""

from __future__ import annotations

import copy
import json
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from coordinator.config import JobConfig

from .experiment import Experiment, SimDevice

if TYPE_CHECKING:
    from coordinator.server import JobResult

TIME_NOTE = (
    "How the board clock is made: this host's step time per local method (calibrated once per "
    "host and cached, never timed during the run), scaled by each board profile's relative "
    "speed and, for methods that fake-quantize, its QAT overhead; results.json calls it "
    "sim_seconds, and the host clock host_seconds."
)


# --- one method ----------------------------------------------------------------------------------


def _method_results(
    exp: Experiment,
    cfg: JobConfig,
    job: JobResult,
    evaluate: Callable[[dict, int | dict[str, int]], float],
    host_s: float,
) -> dict[str, Any]:
    """The method's entry in results.json, from the finished `job` and the coordinator's
    `evaluate(state, bits)` (its held-out test accuracy of a state deployed at bits)."""
    deploy = min(cfg.deploy.bits)
    state = job.global_state
    acc_by_bits = {
        str(b): round(evaluate(state, b), 4)
        for b in sorted({*exp.eval_bits, deploy, 32}, reverse=True)
    }
    # The fine stage's trial rounds ran on the boards before round 1: their time counts.
    sim = float(job.fine.get("trial_sim_seconds_total", 0.0))
    curve = []
    for r in job.reports:
        sim += r.sim_seconds
        acc = r.acc_deploy.get(str(deploy))
        curve.append([r.round + 1, round(sim, 2), None if acc is None else round(acc, 4)])
    allocation = job.allocation
    result: dict[str, Any] = {
        "final_acc": acc_by_bits.get(str(deploy)),
        "final_acc_fp32": acc_by_bits.get("32"),
        "deploy_bits": deploy,
        "sim_seconds": round(sim, 2),
        "host_seconds": round(host_s, 2),
        "rounds": len(job.reports),
        "curve": curve,
        "assignment": dict(sorted(allocation.strategies.items())) if allocation else {},
        "acc_by_bits": acc_by_bits,
        "allocation_seconds": dict(job.allocation_seconds),
    }
    if allocation is not None and allocation.significance:
        result["significance"] = {
            d: [round(x, 4), round(y, 4)] for d, (x, y) in sorted(allocation.significance.items())
        }
        result["rules"] = dict(sorted(allocation.rules.items()))
    if job.fine:
        result["fine"] = job.fine
    if cfg.allocation.bits_from == "profile" or any(d.budget_bits for d in exp.devices):
        # Devices deploy different bits: score each device's own deployed model.
        budgets, accs = {}, {}
        for dev in sorted(job.assignments):
            assignment = job.assignments[dev]
            budgets[dev] = assignment.bits
            accs[dev] = round(evaluate(state, assignment.final_bits()), 4)
        result["device_budget"] = budgets
        result["device_acc"] = accs
        if cfg.allocation.bits_from == "profile":
            result["final_acc"] = round(float(np.mean(list(accs.values()))), 4)
            result["deploy_bits"] = "per-device budget"
        layer_bits = {d: a.per_layer_bits for d, a in job.assignments.items() if a.per_layer_bits}
        if layer_bits:
            result["layer_bits"] = layer_bits
    return result


# --- captures and summaries ----------------------------------------------------------------------


def _capture(methods: Mapping[str, dict], name: str) -> dict[str, Any] | None:
    """FedHQ's two captures for method `name`, against all-QAT and all-PTQ.

    A capture is a share of what all-QAT gains in accuracy (or all-PTQ saves in time), so it
    is defined only when that gain is positive: where a short run leaves all-QAT no more
    accurate than all-PTQ (it happens from seed to seed), the ratio would flip sign or blow
    up, and is left out with a note instead.
    """
    try:
        q, p, m = methods["all_qat"], methods["all_ptq"], methods[name]
    except KeyError:
        return None
    t_span = q["sim_seconds"] - p["sim_seconds"]
    a_span = q["final_acc"] - p["final_acc"]
    speed = (q["sim_seconds"] - m["sim_seconds"]) / t_span if t_span > 0 else None
    acc = (m["final_acc"] - p["final_acc"]) / a_span if a_span > 0 else None
    out: dict[str, Any] = {
        "speed_capture": None if speed is None else round(speed, 4),
        "acc_capture": None if acc is None else round(acc, 4),
    }
    notes = []
    if speed is None:
        notes.append(f"all_qat is not slower than all_ptq ({t_span:+.2f} s): no time to save")
    if acc is None:
        notes.append(
            f"all_qat is not more accurate than all_ptq ({a_span:+.4f}): no gain to capture"
        )
    if notes:
        out["note"] = "; ".join(notes)
    return out


def _with_sum(capture: dict[str, Any]) -> dict[str, Any]:
    parts = (capture["speed_capture"], capture["acc_capture"])
    total = None if None in parts else round(parts[0] + parts[1], 4)
    return {**capture, "sum": total}


def _summary(methods: Mapping[str, dict], devices: list[SimDevice]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name in methods:
        if name in ("all_qat", "all_ptq"):
            continue
        cap = _capture(methods, name)
        if cap is not None:
            out[name] = _with_sum(cap)
    if "mqat" in methods and "fp" in methods:
        m, f = methods["mqat"]["acc_by_bits"], methods["fp"]["acc_by_bits"]
        out["robustness"] = {
            "mqat_4_minus_32": round(m["4"] - m["32"], 4),
            "mqat_2_minus_fp_2": round(m["2"] - f["2"], 4),
        }
    if "fedmpq" in methods and "device_acc" in methods["fedmpq"]:
        low = [d.id for d in devices if d.budget_bits == 2]
        means = {}
        for name, m in methods.items():
            if "device_acc" in m:
                means[name] = {
                    "mean_acc_2bit_devices": round(
                        float(np.mean([m["device_acc"][d] for d in low])), 4
                    )
                    if low
                    else None,
                    "mean_acc_all_devices": round(
                        float(np.mean(list(m["device_acc"].values()))), 4
                    ),
                }
        out["fedmpq"] = means
    return out


# --- results.json --------------------------------------------------------------------------------


def _write(
    out: Path,
    exp: Experiment,
    quick: bool,
    methods: dict[str, dict],
    ablations: dict[str, Any],
    t0: float,
) -> dict[str, Any]:
    alloc = {"coarse": 0.0, "fine": 0.0}
    for m in [*methods.values(), *ablations.values()]:
        for k in alloc:
            alloc[k] = max(alloc[k], float(m.get("allocation_seconds", {}).get(k, 0.0)))
    results = {
        "config": str(exp.path),
        "experiment": exp.name,
        "quick": quick,
        "devices": [d.__dict__ for d in exp.devices],
        "seed": exp.base.get("job", {}).get("seed", 0),
        "time_note": TIME_NOTE,
        "allocation_seconds": {k: round(v, 4) for k, v in alloc.items()},
        "methods": methods,
        "ablations": ablations,
        "summary": _summary(methods, exp.devices),
        "seconds": round(time.perf_counter() - t0, 1),
    }
    return _save_results(out, results)


def _save_results(out: Path, results: dict[str, Any]) -> dict[str, Any]:
    """Write `out/results.json` whole or not at all: a reader never sees half a file."""
    tmp = out / "results.json.part"
    tmp.write_text(json.dumps(results, indent=2, allow_nan=False))
    tmp.replace(out / "results.json")
    return results


# --- several seeds --------------------------------------------------------------------------------

_MEANS = {"final_acc": 4, "final_acc_fp32": 4, "sim_seconds": 2, "host_seconds": 2}
_PER_SEED = ("final_acc", "final_acc_fp32", "sim_seconds", "assignment")


def _mean(values: Sequence[Any], digits: int) -> float | None:
    numbers = [float(v) for v in values if v is not None]
    return round(sum(numbers) / len(numbers), digits) if numbers else None


def _mean_map(maps: Sequence[Mapping[str, Any]], digits: int) -> dict[str, float | None]:
    return {k: _mean([m.get(k) for m in maps], digits) for k in maps[0]}


def _mean_entry(runs: Mapping[int, Mapping[str, Any]]) -> dict[str, Any]:
    """One method (or ablation) over seeds: the first seed's entry with its figures replaced
    by their means, and every seed's own figures under `by_seed`."""
    entries = list(runs.values())
    out = copy.deepcopy(dict(entries[0]))
    for key in ("speed_capture", "acc_capture", "sum", "note", "same_assignment_as"):
        out.pop(key, None)  # per seed; the captures are recomputed from the means
    for key, digits in _MEANS.items():
        if key in out:
            out[key] = _mean([e.get(key) for e in entries], digits)
    for key in ("acc_by_bits", "device_acc"):
        if key in out:
            out[key] = _mean_map([e[key] for e in entries], 4)
    if "qat_devices" in out:
        out["qat_devices"] = _mean([e["qat_devices"] for e in entries], 2)
    if "curve" in out and len({len(e["curve"]) for e in entries}) == 1:
        out["curve"] = [
            [points[0][0], _mean([p[1] for p in points], 2), _mean([p[2] for p in points], 4)]
            for points in zip(*(e["curve"] for e in entries), strict=True)
        ]
    out["by_seed"] = {str(seed): {k: e[k] for k in _PER_SEED if k in e} for seed, e in runs.items()}
    return out


def _write_mean(
    out: Path, exp: Experiment, quick: bool, per_seed: Mapping[int, dict], t0: float
) -> dict[str, Any]:
    """results.json over several seeds: the means of every figure, captures from the means."""
    first = next(iter(per_seed.values()))
    methods = {
        name: _mean_entry({s: r["methods"][name] for s, r in per_seed.items()})
        for name in first["methods"]
    }
    ablations = {}
    for name in first["ablations"]:
        entry = _mean_entry({s: r["ablations"][name] for s, r in per_seed.items()})
        cap = _capture({**methods, name: entry}, name)
        ablations[name] = {**entry, **_with_sum(cap)} if cap is not None else entry
    alloc = {
        k: max(r["allocation_seconds"][k] for r in per_seed.values())
        for k in first["allocation_seconds"]
    }
    results = {
        "config": str(exp.path),
        "experiment": exp.name,
        "quick": quick,
        "devices": first["devices"],
        "seeds": list(per_seed),
        "time_note": TIME_NOTE + " Every figure is the mean over the seeds; by_seed has each.",
        "allocation_seconds": alloc,
        "methods": methods,
        "ablations": ablations,
        "summary": _summary(methods, exp.devices),
        "summary_by_seed": {str(s): r["summary"] for s, r in per_seed.items()},
        "seconds": round(time.perf_counter() - t0, 1),
    }
    return _save_results(out, results)
