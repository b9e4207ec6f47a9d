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
from coordinator.evaluation import act_key

from .experiment import Experiment, SimDevice
from .stats import Interval, bootstrap_ci, mean_ci, paired_diff

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
    evaluate: Callable[..., float],
    host_s: float,
) -> dict[str, Any]:
    """The method's entry in results.json, from the finished `job` and the coordinator's
    `evaluate(state, bits, act_bits, split=...)` (its held-out accuracy of a state deployed at
    bits, with act_bits activations or float ones, on the test split unless told otherwise).
    `final_val_acc` is the deployed accuracy on the validation split: what a choice between
    variants (an ablation's setting, a learning rate) reads, never `final_acc`
    (docs/round.md#validation).

    With `[deploy] act_bits` the method deploys at its narrowest weight and activation widths
    (`W<w>A<a>`, the key the evaluator reports rounds under), and `acc_by_widths` holds the grid
    of every evaluated weight width with every activation width."""
    deploy = min(cfg.deploy.bits)
    act = min(cfg.deploy.act_bits) if cfg.deploy.act_bits else None
    key = str(deploy) if act is None else act_key(deploy, act)
    state = job.global_state
    acc_by_bits = {
        str(b): round(evaluate(state, b), 4)
        for b in sorted({*exp.eval_bits, deploy, 32}, reverse=True)
    }
    acc_by_widths = {
        act_key(b, a): round(evaluate(state, b, a), 4)
        for b in sorted({*exp.eval_bits, deploy} - {32}, reverse=True)
        for a in sorted(cfg.deploy.act_bits, reverse=True)
    }
    # The fine stage's trial rounds ran on the boards before round 1: their time counts.
    sim = float(job.fine.get("trial_sim_seconds_total", 0.0))
    curve = []
    for r in job.reports:
        sim += r.sim_seconds
        acc = r.acc_deploy.get(key)
        curve.append([r.round + 1, round(sim, 2), None if acc is None else round(acc, 4)])
    allocation = job.allocation
    result: dict[str, Any] = {
        "final_acc": acc_by_bits.get(key) if act is None else acc_by_widths.get(key),
        "final_val_acc": round(evaluate(state, deploy, act, split="validation"), 4),
        "final_acc_fp32": acc_by_bits.get("32"),
        "deploy_bits": deploy,
        **({} if act is None else {"deploy_act_bits": act, "acc_by_widths": acc_by_widths}),
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
        budgets, accs, val_accs = {}, {}, {}
        for dev in sorted(job.assignments):
            assignment = job.assignments[dev]
            budgets[dev] = assignment.bits
            accs[dev] = round(evaluate(state, assignment.final_bits()), 4)
            val_accs[dev] = round(evaluate(state, assignment.final_bits(), split="validation"), 4)
        result["device_budget"] = budgets
        result["device_acc"] = accs
        if cfg.allocation.bits_from == "profile":
            result["final_acc"] = round(float(np.mean(list(accs.values()))), 4)
            result["final_val_acc"] = round(float(np.mean(list(val_accs.values()))), 4)
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
    speed, acc = _ratios(q, p, m)
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


def _ratios(q: Mapping[str, Any], p: Mapping[str, Any], m: Mapping[str, Any]) -> tuple:
    """(speed capture, accuracy capture) of `m` between all-QAT `q` and all-PTQ `p`, unrounded;
    each None where its span is not positive (or a figure is missing)."""
    figures = [d.get(k) for d in (q, p, m) for k in ("sim_seconds", "final_acc")]
    if any(v is None for v in figures):
        return None, None
    t_span = q["sim_seconds"] - p["sim_seconds"]
    a_span = q["final_acc"] - p["final_acc"]
    speed = (q["sim_seconds"] - m["sim_seconds"]) / t_span if t_span > 0 else None
    acc = (m["final_acc"] - p["final_acc"]) / a_span if a_span > 0 else None
    return speed, acc


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
        budgets = [d.budget_bits for d in devices if d.budget_bits is not None]
        low = [d.id for d in devices if budgets and d.budget_bits == min(budgets)]
        means = {}
        for name, m in methods.items():
            if "device_acc" in m:
                means[name] = {
                    "mean_acc_lowest_budget_devices": round(
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

_MEANS = {
    "final_acc": 4,
    "final_val_acc": 4,
    "final_acc_fp32": 4,
    "sim_seconds": 2,
    "host_seconds": 2,
}
_PER_SEED = ("final_acc", "final_val_acc", "final_acc_fp32", "sim_seconds", "assignment")

#: Statistics over seeds (fleet/simulate/stats.py, docs/simulation.md#statistics).
LEVEL = 0.95
N_BOOT = 2000
BOOT_SEED = 0
_CAPTURES = ("speed_capture", "acc_capture", "sum")
#: The references every method is paired against, where the experiment has them (float under
#: any of its names), then FedHQ; each unordered pair once, as "method - reference".
_REFERENCES = ("all_qat", "all_ptq", "float", "fp", "fp32", "random_hybrid", "fedhq")
_FEDHQ, _RANDOM_HYBRID = "fedhq", "random_hybrid"
STATS_NOTE = (
    "ci95: 95% intervals over the seeds, [lo, hi]: Student-t for means and for paired "
    "differences (matched by seed); percentile bootstrap over seeds (the same resampled seeds "
    "for every method of a statistic) for the capture ratios, whose resamples with an "
    "undefined ratio are dropped and counted in bootstrap_dropped."
)


def _mean(values: Sequence[Any], digits: int) -> float | None:
    numbers = [float(v) for v in values if v is not None]
    return round(sum(numbers) / len(numbers), digits) if numbers else None


def _mean_map(maps: Sequence[Mapping[str, Any]], digits: int) -> dict[str, float | None]:
    return {k: _mean([m.get(k) for m in maps], digits) for k in maps[0]}


def _ci(values: Sequence[Any], digits: int) -> list[float] | None:
    """The `[lo, hi]` t interval of per-seed `values` for results.json."""
    ci = mean_ci(values, LEVEL)
    return None if ci is None else ci.pair(digits)


def _entry_ci(entries: Sequence[Mapping[str, Any]], out: Mapping[str, Any]) -> dict[str, Any]:
    """`ci95` of a mean entry: the t interval of each main figure it holds, by the same keys;
    `curve` (where averaged) holds the accuracy interval of each point."""
    ci: dict[str, Any] = {}
    for key, digits in _MEANS.items():
        if key in out:
            ci[key] = _ci([e.get(key) for e in entries], digits)
    if "acc_by_bits" in out:
        ci["acc_by_bits"] = {
            b: _ci([(e.get("acc_by_bits") or {}).get(b) for e in entries], 4)
            for b in out["acc_by_bits"]
        }
    if "curve" in out and len({len(e.get("curve") or []) for e in entries}) == 1:
        ci["curve"] = [
            _ci([p[2] for p in points], 4)
            for points in zip(*(e["curve"] for e in entries), strict=True)
        ]
    return ci


def _single_seed_figures(entries: Sequence[Mapping[str, Any]]) -> list[str]:
    """The main figures only one seed recorded: their interval is that value, not a spread."""
    return [
        k for k in _MEANS if k in entries[0] and sum(e.get(k) is not None for e in entries) == 1
    ]


def _mean_entry(runs: Mapping[int, Mapping[str, Any]]) -> dict[str, Any]:
    """One method (or ablation) over seeds: the first seed's entry with its figures replaced
    by their means, their intervals under `ci95`, and every seed's own figures under
    `by_seed`."""
    entries = list(runs.values())
    out = copy.deepcopy(dict(entries[0]))
    for key in ("speed_capture", "acc_capture", "sum", "note", "same_assignment_as"):
        out.pop(key, None)  # per seed; the captures are recomputed from the means
    for key, digits in _MEANS.items():
        if key in out:
            out[key] = _mean([e.get(key) for e in entries], digits)
    for key in ("acc_by_bits", "acc_by_widths", "device_acc"):
        if key in out:
            out[key] = _mean_map([e[key] for e in entries], 4)
    if "qat_devices" in out:
        out["qat_devices"] = _mean([e["qat_devices"] for e in entries], 2)
    if "curve" in out and len({len(e["curve"]) for e in entries}) == 1:
        out["curve"] = [
            [points[0][0], _mean([p[1] for p in points], 2), _mean([p[2] for p in points], 4)]
            for points in zip(*(e["curve"] for e in entries), strict=True)
        ]
    out["ci95"] = _entry_ci(entries, out)
    if single := _single_seed_figures(entries):
        out["ci95_single_seed"] = single
    out["by_seed"] = {str(seed): {k: e[k] for k in _PER_SEED if k in e} for seed, e in runs.items()}
    return out


# Captures over resampled seeds: a sample is one seed's whole results, so every method in a
# capture (all-QAT, all-PTQ and the method) is taken from the same resampled seeds.


def _raw_mean(values: Sequence[Any]) -> float | None:
    numbers = [float(v) for v in values if v is not None]
    return sum(numbers) / len(numbers) if numbers else None


def _captures_of(samples: Sequence[Mapping[str, Any]], name: str, section: str) -> dict:
    """speed_capture, acc_capture and sum of `name` from the means over `samples` (unrounded,
    None where undefined), as `_capture` computes them from the means of all seeds."""
    figures = ("sim_seconds", "final_acc")

    def means(get: Callable[[Mapping[str, Any]], Mapping[str, Any]]) -> dict:
        return {k: _raw_mean([get(s).get(k) for s in samples]) for k in figures}

    speed, acc = _ratios(
        means(lambda s: s["methods"]["all_qat"]),
        means(lambda s: s["methods"]["all_ptq"]),
        means(lambda s: s[section][name]),
    )
    total = None if speed is None or acc is None else speed + acc
    return {"speed_capture": speed, "acc_capture": acc, "sum": total}


def _bootstrap(statistic: Callable[[list[Any]], float | None], per_seed: Mapping) -> Interval:
    ci = bootstrap_ci(statistic, per_seed, n_boot=N_BOOT, level=LEVEL, seed=BOOT_SEED)
    assert ci is not None  # several seeds
    return ci


def _capture_ci(per_seed: Mapping[int, dict], name: str, section: str) -> dict[str, Any]:
    """Bootstrap intervals of `name`'s captures: `ci95` (None where the capture from the means
    is undefined) and `bootstrap_dropped`, the resamples where each was undefined. The same
    bootstrap seed for the three, so they are resampled alike."""
    ci95: dict[str, Any] = {}
    dropped: dict[str, int] = {}
    for part in _CAPTURES:
        ci = _bootstrap(lambda s, part=part: _captures_of(s, name, section)[part], per_seed)
        ci95[part] = ci.pair(4) if ci.estimate is not None else None
        dropped[part] = ci.dropped
    return {"ci95": ci95, "bootstrap_dropped": dropped}


def _with_capture_ci(
    entry: dict[str, Any], per_seed: Mapping[int, dict], name: str, section: str
) -> dict[str, Any]:
    intervals = _capture_ci(per_seed, name, section)
    return {
        **entry,
        "ci95": {**entry.get("ci95", {}), **intervals["ci95"]},
        "bootstrap_dropped": intervals["bootstrap_dropped"],
    }


def _summary_ci(
    summary: dict[str, Any], methods: Mapping[str, dict], per_seed: Mapping[int, dict]
) -> dict[str, Any]:
    """The summary from the means, with intervals: each capture's bootstrap, and FedMPQ's
    mean accuracies' t intervals from each seed's own summary."""
    out = dict(summary)
    for name in methods:
        if name in out and isinstance(out[name], Mapping) and "speed_capture" in out[name]:
            out[name] = _with_capture_ci(out[name], per_seed, name, "methods")
    if isinstance(out.get("fedmpq"), Mapping):
        fedmpq = {}
        for name, figures in out["fedmpq"].items():
            fedmpq[name] = {
                **figures,
                "ci95": {
                    key: _ci(
                        [
                            r.get("summary", {}).get("fedmpq", {}).get(name, {}).get(key)
                            for r in per_seed.values()
                        ],
                        4,
                    )
                    for key in figures
                },
            }
        out["fedmpq"] = fedmpq
    return out


def _pairs(methods: Sequence[str]) -> list[tuple[str, str]]:
    """(method, reference) for every method against each reference present, each unordered
    pair once (all_ptq - all_qat, not all_qat - all_ptq too)."""
    pairs, seen = [], set()
    for ref in (r for r in _REFERENCES if r in methods):
        for name in methods:
            if name != ref and frozenset((name, ref)) not in seen:
                seen.add(frozenset((name, ref)))
                pairs.append((name, ref))
    return pairs


def _paired(methods: Mapping[str, dict], per_seed: Mapping[int, dict]) -> dict[str, Any]:
    """Paired differences over seeds: `differences["m - ref"]` of final_acc and sim_seconds
    (mean of the per-seed differences, paired t interval, n matched seeds), and
    `capture_sum`, FedHQ's capture sum minus random hybrid's, bootstrapped over the same
    resampled seeds."""
    differences = {}
    for name, ref in _pairs(list(methods)):
        row: dict[str, Any] = {"method": name, "reference": ref}
        for key, digits in (("final_acc", 4), ("sim_seconds", 2)):
            d = paired_diff(
                {s: r["methods"][name].get(key) for s, r in per_seed.items()},
                {s: r["methods"][ref].get(key) for s, r in per_seed.items()},
                LEVEL,
            )
            row[key] = (
                None
                if d is None
                else {"diff": round(d.estimate, digits), "ci95": d.pair(digits), "n": d.n}
            )
        differences[f"{name} - {ref}"] = row
    out: dict[str, Any] = {"differences": differences}
    if {_FEDHQ, _RANDOM_HYBRID, "all_qat", "all_ptq"} <= set(methods):
        out["capture_sum"] = _capture_sum_diff(per_seed)
    if figures := _paired_figures(methods, per_seed):
        out["figures"] = figures
    return out


def _paired_figures(methods: Mapping[str, dict], per_seed: Mapping[int, dict]) -> dict[str, Any]:
    """Paired differences of the figures the papers' claims are about, beside final_acc's:
    FedMPQ's mean accuracies against fixed precision and all-8-bit (lowest-budget devices,
    all devices), and each MQAT variant against float training at 2-bit weights and at the
    lowest weight x activation width of the grid."""

    def row(get: Callable[[Mapping[str, Any], str], Any], a: str, b: str) -> dict[str, Any]:
        def by_seed(name: str) -> dict[int, Any]:
            values = {}
            for seed, r in per_seed.items():
                try:
                    values[seed] = get(r, name)
                except (KeyError, TypeError):
                    values[seed] = None
            return values

        d = paired_diff(by_seed(a), by_seed(b), LEVEL)
        value = None if d is None else {"diff": round(d.estimate, 4), "ci95": d.pair(4), "n": d.n}
        return {"method": a, "reference": b, **({"missing": True} if d is None else value)}

    out: dict[str, Any] = {}
    for ref in ("fixed", "all_8bit"):
        if "fedmpq" in methods and ref in methods:
            for key in ("mean_acc_lowest_budget_devices", "mean_acc_all_devices"):
                out[f"fedmpq - {ref}: {key}"] = row(
                    lambda r, name, key=key: r["summary"]["fedmpq"][name][key], "fedmpq", ref
                )
    if "fp" in methods:
        grid = methods["fp"].get("acc_by_widths") or {}
        lowest = min(grid, key=_width_order) if grid else None
        for name in (n for n in methods if n.startswith("mqat")):
            out[f"{name} - fp: 2-bit"] = row(
                lambda r, m: r["methods"][m]["acc_by_bits"]["2"], name, "fp"
            )
            if lowest is not None and lowest in (methods[name].get("acc_by_widths") or {}):
                out[f"{name} - fp: {lowest}"] = row(
                    lambda r, m: r["methods"][m]["acc_by_widths"][lowest], name, "fp"
                )
    return out


def _width_order(key: str) -> tuple[int, int]:
    """ "W2A3" -> (3, 2): the activation width first, then the weight width, so the lowest key
    is the narrowest activations at the narrowest weights."""
    w, a = key[1:].split("A")
    return int(a), int(w)


def _capture_sum_diff(per_seed: Mapping[int, dict]) -> dict[str, Any]:
    def diff(samples: list[Any]) -> float | None:
        a = _captures_of(samples, _FEDHQ, "methods")["sum"]
        b = _captures_of(samples, _RANDOM_HYBRID, "methods")["sum"]
        return None if a is None or b is None else a - b

    ci = _bootstrap(diff, per_seed)
    defined = ci.estimate is not None and ci.lo is not None
    out: dict[str, Any] = {
        "method": _FEDHQ,
        "reference": _RANDOM_HYBRID,
        "diff": None if ci.estimate is None else round(ci.estimate, 4),
        "ci95": ci.pair(4) if defined else None,
        "n": ci.n,
        "bootstrap_dropped": ci.dropped,
    }
    if not defined:
        out["verdict"] = (
            "undefined: a capture sum is undefined on the means (all_qat not slower, or not "
            "more accurate, than all_ptq)"
        )
    elif ci.lo > 0:
        out["verdict"] = (
            "FedHQ's capture sum exceeds random hybrid's, with the paired interval above 0"
        )
    elif ci.hi < 0:
        out["verdict"] = (
            "FedHQ's capture sum is below random hybrid's, with the paired interval below 0"
        )
    else:
        out["verdict"] = (
            "FedHQ's capture sum does not clearly differ from random hybrid's: the paired "
            "interval includes 0"
        )
    return out


def _write_mean(
    out: Path, exp: Experiment, quick: bool, per_seed: Mapping[int, dict], t0: float
) -> dict[str, Any]:
    """results.json over several seeds: the means of every figure with their intervals
    (`ci95`), captures from the means with bootstrap intervals, and paired differences."""
    first = next(iter(per_seed.values()))
    methods = {
        name: _mean_entry({s: r["methods"][name] for s, r in per_seed.items()})
        for name in first["methods"]
    }
    ablations = {}
    for name in first["ablations"]:
        entry = _mean_entry({s: r["ablations"][name] for s, r in per_seed.items()})
        cap = _capture({**methods, name: entry}, name)
        if cap is not None:
            entry = _with_capture_ci({**entry, **_with_sum(cap)}, per_seed, name, "ablations")
        ablations[name] = entry
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
        "time_note": TIME_NOTE
        + " Every figure is the mean over the seeds; by_seed has each, ci95 its 95% interval.",
        "statistics": {
            "note": STATS_NOTE,
            "level": LEVEL,
            "bootstrap_resamples": N_BOOT,
            "bootstrap_seed": BOOT_SEED,
        },
        "allocation_seconds": alloc,
        "methods": methods,
        "ablations": ablations,
        "summary": _summary_ci(_summary(methods, exp.devices), methods, per_seed),
        "paired": _paired(methods, per_seed),
        "summary_by_seed": {str(s): r["summary"] for s, r in per_seed.items()},
        "seconds": round(time.perf_counter() - t0, 1),
    }
    return _save_results(out, results)
