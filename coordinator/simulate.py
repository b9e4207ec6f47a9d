"""`bitfleet simulate`: many virtual boards in one process, through the daemon's own code.

Each method of an experiment is one federated job run by `Coordinator`, the class behind
`bitfleet coordinator serve`, against virtual devices that are the boards' own `EdgeAgent`s
(found through the `bitfleet.agents` entry point). An in-process bus replaces MQTT; `--broker`
runs the same experiment over a real broker instead. Nothing here aggregates, allocates or
trains: it builds the fleet, runs the methods, and evaluates and reports what they produced.

Time (DESIGN section 5): the host's step time is measured once per local method; a virtual
board's training time is that scaled by the board's relative speed and, for methods that run
the fake quantizer, by the board's QAT overhead from its profile. The coordinator adds transfer
time from the link bandwidth and takes the slowest participant per round. Reports show this
simulated board clock beside the host's wall clock and say which is which.
"""

from __future__ import annotations

import argparse
import copy
import json
import queue
import re
import shutil
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bitfleet import plugins
from bitfleet.data import DATASET_SPECS, ImageData, load_dataset, partition
from bitfleet.profiles import load_profile, measure_machine, profile_summary, time_train_steps
from bitfleet.protocol.inprocess import InProcessBus
from bitfleet.quant import make_method

from .allocation import QUANT_IN_FORWARD, AllocationInput, make_allocation_rule
from .config import JobConfig, JobConfigError, job_config_from_dict
from .server import Coordinator, RoundReport

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10 needs the tomli backport
    import tomli as tomllib

EVAL_BITS_DEFAULT = (32, 8, 6, 4, 3, 2)
TIME_NOTE = (
    "How the board clock is made: this host's measured step time per local method, scaled by "
    "each board profile's relative speed and, for methods that fake-quantize, its QAT "
    "overhead; results.json calls it sim_seconds, and the host clock host_seconds."
)


# --- the experiment file -------------------------------------------------------------------------


@dataclass(frozen=True)
class SimDevice:
    id: str
    board: str
    budget_bits: int | None = None


@dataclass
class Experiment:
    """An experiment file: the base job, the methods (job overlays), the fleet, the ablations."""

    path: Path
    name: str
    base: dict[str, Any]
    methods: dict[str, dict[str, Any]]
    devices: list[SimDevice]
    eval_bits: tuple[int, ...]
    quick: dict[str, Any]
    ablations: dict[str, dict[str, Any]] = field(default_factory=dict)
    seeds: tuple[int, ...] = (0,)
    quick_seeds: tuple[int, ...] | None = None

    def seeds_for(self, quick: bool) -> tuple[int, ...]:
        """The job seeds a run repeats every method over: `[simulate.quick] seeds` in a quick
        run where given, else `[simulate] seeds`, else the job's own seed."""
        return self.quick_seeds if quick and self.quick_seeds else self.seeds

    def with_seed(self, seed: int) -> Experiment:
        """The same experiment with `[job] seed` set: another data split, initial model and
        random draws (a method that sets its own seed keeps it)."""
        return replace(self, base=_merge(self.base, {"job": {"seed": seed}}))


def _merge(base: Mapping[str, Any], overlay: Mapping[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(dict(base))
    for table, values in overlay.items():
        if isinstance(values, Mapping) and isinstance(out.get(table), Mapping):
            out[table] = {**out[table], **values}
        else:
            out[table] = copy.deepcopy(values)
    return out


def load_experiment(path: str | Path) -> Experiment:
    """Read and check an experiment file; every method's job is checked before anything runs."""
    path = Path(path)
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise FileNotFoundError(f"{path}: cannot read experiment file: {exc}") from exc
    except tomllib.TOMLDecodeError as exc:
        raise JobConfigError(f"{path}: not valid TOML: {exc}") from exc
    sim = raw.pop("simulate", None)
    if not isinstance(sim, dict):
        raise JobConfigError(f"{path}: missing the [simulate] table (fleet, methods, quick)")
    methods = raw.pop("methods", None)
    if not isinstance(methods, dict) or not methods:
        raise JobConfigError(f"{path}: [methods] must name at least one method")
    ablations = raw.pop("ablations", {})
    known = {"name", "devices", "eval_bits", "quick", "description", "seeds"}
    for key in sim:
        if key not in known:
            raise JobConfigError(f"{path}: unknown key simulate.{key}; allowed: {sorted(known)}")
    devices: list[SimDevice] = []
    for i, group in enumerate(sim.get("devices", [])):
        if not isinstance(group, dict) or "board" not in group:
            raise JobConfigError(f"{path}: simulate.devices[{i}] needs a board")
        try:
            load_profile(group["board"])
        except (FileNotFoundError, LookupError, ValueError) as exc:
            raise JobConfigError(f"{path}: simulate.devices[{i}].board: {exc}") from exc
        budget = group.get("budget_bits")
        if budget is not None and budget not in range(2, 9):
            raise JobConfigError(f"{path}: simulate.devices[{i}].budget_bits must be in 2..8")
        count = group.get("count", 1)
        if not isinstance(count, int) or count < 1:
            raise JobConfigError(f"{path}: simulate.devices[{i}].count must be a positive integer")
        for _ in range(count):
            devices.append(SimDevice(f"dev{len(devices)}-{group['board']}", group["board"], budget))
    if len(devices) < 2:
        raise JobConfigError(f"{path}: simulate.devices must describe at least 2 devices")
    base = raw
    for kind, group in (("methods", methods), ("ablations", ablations)):
        for name, overlay in group.items():
            where = f"{path} [{kind}.{name}]"
            if not isinstance(overlay, dict):
                raise JobConfigError(f"{where} must be a table of job tables")
            job_config_from_dict(_merge(base, overlay), source=where)
    eval_bits = tuple(sim.get("eval_bits", EVAL_BITS_DEFAULT))
    quick = dict(sim.get("quick", {}))
    default_seed = base.get("job", {}).get("seed", 0)
    seeds = _check_seeds(sim.get("seeds", [default_seed]), f"{path}: simulate.seeds")
    quick_seeds = quick.pop("seeds", None)
    if quick_seeds is not None:
        quick_seeds = _check_seeds(quick_seeds, f"{path}: simulate.quick.seeds")
    return Experiment(
        path=path,
        name=str(sim.get("name", path.stem)),
        base=base,
        methods=methods,
        devices=devices,
        eval_bits=eval_bits,
        quick=quick,
        ablations=ablations,
        seeds=seeds,
        quick_seeds=quick_seeds,
    )


def _check_seeds(value: Any, where: str) -> tuple[int, ...]:
    ok = (
        isinstance(value, list)
        and value
        and all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in value)
    )
    if not ok or len(set(value)) != len(value):
        raise JobConfigError(f"{where} must be a list of distinct integers >= 0, got {value!r}")
    return tuple(value)


# --- the virtual fleet ---------------------------------------------------------------------------


def measure_host_steps(
    model_name: str, dataset: str, strategies: set[str], batch_size: int, steps: int = 40
) -> dict[str, float]:
    """Median seconds of one training step per local method on this host (DESIGN 5);
    `ptq` trains exactly as `fp` does and shares its figure."""
    spec = DATASET_SPECS[dataset]
    methods = {
        s: make_method(s, **({"bits": 2} if s in ("qat", "apqn", "mpq") else {}))
        for s in sorted((strategies - {"ptq"}) | {"fp"})
    }
    out = time_train_steps(
        model_name,
        methods,
        batch_size=batch_size,
        steps=steps,
        in_channels=spec.in_channels,
        image_size=spec.image_size,
        num_classes=spec.num_classes,
        warmup=3,
    )
    out["ptq"] = out["fp"]
    return out


@dataclass
class VirtualFleet:
    """The devices of an experiment: their data slices, profiles and clocks."""

    devices: list[SimDevice]
    data: dict[str, tuple[torch.Tensor, torch.Tensor]]
    profiles: dict[str, dict[str, Any]]
    host_steps: dict[str, float]
    num_classes: int

    def clock(self, device: str) -> Callable[[str, int], float]:
        """The device's board clock: (local method, optimiser steps) -> seconds on its board."""
        board = self.profiles[device]["board"]
        speed = float(board["relative_speed"])
        overhead = float(board.get("qat_overhead") or 1.0)
        t_fp = self.host_steps["fp"] / speed

        def seconds(strategy: str, steps: int) -> float:
            if strategy in QUANT_IN_FORWARD:
                return steps * t_fp * overhead
            host = self.host_steps.get(strategy, self.host_steps["fp"])
            return steps * t_fp * host / self.host_steps["fp"]

        return seconds

    def registration(self) -> tuple[dict[str, dict], dict[str, dict]]:
        """What the devices will say at registration, for allocation-only ablations."""
        from bitfleet.data import label_histogram
        from bitfleet.data.label_fit import fit_label_profile

        data = {}
        for dev, (_, y) in self.data.items():
            counts = label_histogram(y.numpy(), range(len(y)), self.num_classes)
            hist = [int(c) for c in counts]
            data[dev] = {
                "n_samples": len(y),
                "label_hist": hist,
                "label_fit": fit_label_profile(hist).to_dict(),
            }
        return self.profiles, data


def build_fleet(
    exp: Experiment,
    data: ImageData,
    job: JobConfig,
    quick: bool,
    host_steps: dict[str, float] | None = None,
) -> VirtualFleet:
    """Split the training set over the devices (Dirichlet or IID, seeded) and give each its
    board's profile with step times scaled from this host's (`host_steps`, measured here
    unless given: repeated seeds share one measurement, so their clocks are comparable)."""
    x, y = data.train_x, data.train_y
    fraction = float(exp.quick.get("train_fraction", 1.0)) if quick else 1.0
    if fraction < 1.0:
        keep = torch.randperm(len(y), generator=torch.Generator().manual_seed(job.job.seed))
        keep = keep[: int(len(y) * fraction)]
        x, y = x[keep], y[keep]
    parts = partition(
        y.numpy(), len(exp.devices), job.data.partition, seed=job.job.seed, alpha=job.data.alpha
    )
    strategies = {job.allocation.strategy, job.allocation.qat_strategy, job.allocation.ptq_strategy}
    for overlay in exp.methods.values():
        a = overlay.get("allocation", {})
        strategies |= {a.get(k) for k in ("strategy", "qat_strategy", "ptq_strategy")} - {None}
    if host_steps is None:
        host_steps = measure_host_steps(
            job.model.name, job.data.dataset, strategies, job.training.batch_size
        )
    machine = measure_machine()
    fleet_data, profiles = {}, {}
    for dev, idx in zip(exp.devices, parts, strict=True):
        index = torch.from_numpy(idx).long()
        fleet_data[dev.id] = (x[index], y[index])
        board = load_profile(dev.board)
        speed = board.relative_speed
        steps = {
            "t_fp": host_steps["fp"] / speed,
            "t_qat": host_steps["fp"] / speed * board.qat_overhead,
            "source": "simulated: host step time scaled by the profile",
        }
        summary = profile_summary(board, machine, steps)
        summary["qat_overhead"] = board.qat_overhead  # the board's, not this host's ratio
        if dev.budget_bits is not None:
            summary["board"]["budget_bits"] = dev.budget_bits
        profiles[dev.id] = summary
    num_classes = DATASET_SPECS[job.data.dataset].num_classes
    return VirtualFleet(exp.devices, fleet_data, profiles, host_steps, num_classes)


# --- running one method --------------------------------------------------------------------------


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", text).strip("-.") or "method"


def _job_dict(exp: Experiment, overlay: Mapping[str, Any], name: str, out: Path, quick: bool):
    job = _merge(exp.base, overlay)
    job.setdefault("job", {})
    job["job"].update(name=_slug(f"{exp.name}-{name}"), fleet=_slug(f"sim-{name}"))
    job["job"]["state_dir"] = str(out / "state" / _slug(name))
    job.setdefault("rounds", {})
    job["rounds"].setdefault("min_devices", len(exp.devices))
    if quick:
        for table, values in exp.quick.items():
            if isinstance(values, dict):
                job[table] = {**job.get(table, {}), **values}
    return job


class _RoundBar:
    """One live line per method: rounds done, accuracy, simulated and host time."""

    def __init__(self, method: str, rounds: int) -> None:
        self.method, self.rounds = method, rounds
        self.live = sys.stderr.isatty()
        self.t0 = time.perf_counter()
        self.sim = 0.0

    def __call__(self, report: RoundReport) -> None:
        self.sim += report.sim_seconds
        done = report.round + 1
        width = 20
        filled = int(width * done / self.rounds)
        acc = " ".join(f"{b}-bit {a:.3f}" for b, a in report.acc_deploy.items())
        line = (
            f"{self.method:>14} [{'#' * filled}{'.' * (width - filled)}] round {done}/{self.rounds}"
            f"  acc {report.acc_fp32:.3f} float, {acc}  sim {self.sim:7.0f} s"
            f"  host {time.perf_counter() - self.t0:5.0f} s"
        )
        end = "\n" if done == self.rounds or not self.live else ""
        print(("\r\033[K" if self.live else "") + line, end=end, file=sys.stderr, flush=True)


class HostCompute:
    """The virtual boards' training, run one piece at a time on the thread that serves it.

    The boards share this host: ten of them training at once on two cores run slower in all
    than one after the other. And the threads matter: every thread that runs torch ops keeps
    its own OpenMP team, and with a dozen teams on two cores libgomp stops spinning, so each
    kernel call pays for a wake-up (LeNet-5's step: 7.1 ms beside ten idle teams, 4.8 ms
    alone). The simulator therefore serves this queue from its main thread, with torch's two
    threads, and runs the agents and the coordinator with one thread each.
    """

    def __init__(self) -> None:
        self._jobs: queue.Queue[tuple[Callable[[], Any], threading.Event, list[Any]]] = (
            queue.Queue()
        )
        self._closed = threading.Event()

    def __call__(self, work: Callable[[], Any]) -> Any:
        """Run `work` on the serving thread and return its result (or raise its error)."""
        done, box = threading.Event(), []
        self._jobs.put((work, done, box))
        while not done.wait(0.2):
            if self._closed.is_set():
                raise RuntimeError("the simulation stopped before this board's training ran")
        if isinstance(box[0], BaseException):
            raise box[0]
        return box[0]

    def serve(self, until: Callable[[], bool]) -> None:
        """Run queued work until `until()` is true."""
        while not until():
            try:
                work, done, box = self._jobs.get(timeout=0.1)
            except queue.Empty:
                continue
            try:
                box.append(work())
            except Exception as exc:  # noqa: BLE001 - handed to the board that asked
                box.append(exc)
            finally:
                done.set()

    def close(self) -> None:
        """Stop taking work; boards still waiting get an error instead of hanging."""
        self._closed.set()


def run_method(
    exp: Experiment,
    name: str,
    overlay: Mapping[str, Any],
    fleet: VirtualFleet,
    data: ImageData,
    out: Path,
    *,
    quick: bool,
    broker: str | None,
) -> tuple[dict[str, Any], Coordinator]:
    """Run one method as a federated job; return its results entry and the coordinator."""
    job = _job_dict(exp, overlay, name, out, quick)
    cfg = job_config_from_dict(job, source=f"{exp.path} [methods.{name}]")
    shutil.rmtree(cfg.job.state_dir, ignore_errors=True)
    bus = InProcessBus() if broker is None else None
    factory = bus.transport if bus is not None else None
    bar = _RoundBar(name, cfg.training.rounds)
    coordinator = Coordinator(
        cfg, broker, transport_factory=factory, data=data, export=False, on_round=bar
    )
    make_agent = plugins.load("bitfleet.agents", "virtual")
    host_cpu = HostCompute()
    agents = [
        make_agent(
            dev.id,
            fleet=cfg.job.fleet,
            profile=fleet.profiles[dev.id],
            data=fleet.data[dev.id],
            dataset=cfg.data.dataset,
            model=cfg.model.name,
            broker=broker,
            transport_factory=factory,
            clock=fleet.clock(dev.id),
            compute=host_cpu,
        )
        for dev in fleet.devices
    ]
    errors: list[BaseException] = []

    def serve(agent: Any) -> None:
        torch.set_num_threads(1)  # see HostCompute: only the training thread gets two
        try:
            agent.run()
        except BaseException as exc:  # noqa: BLE001 - reported after the job
            errors.append(exc)

    reports: list[RoundReport] = []

    def coordinate() -> None:
        torch.set_num_threads(1)
        try:
            reports.extend(coordinator.run())
        except BaseException as exc:  # noqa: BLE001 - re-raised below
            errors.append(exc)

    threads = [threading.Thread(target=serve, args=(a,), daemon=True) for a in agents]
    t0 = time.perf_counter()
    main = threading.Thread(target=coordinate, name=f"coordinator-{name}", daemon=True)
    main.start()
    # Boards register once on connect and repeat only every 10 s: let the coordinator listen
    # first, as a daemon that was started before its fleet does.
    while main.is_alive() and not (coordinator.transport and coordinator.transport.is_connected):
        time.sleep(0.01)
    for t in threads:
        t.start()
    try:
        host_cpu.serve(until=lambda: not main.is_alive())
    except KeyboardInterrupt:
        coordinator.stop()
        main.join()
        raise
    finally:
        host_cpu.close()
        for agent in agents:
            agent.stop()
        for t in threads:
            t.join(30)
    host_s = time.perf_counter() - t0
    if errors:
        raise RuntimeError(f"method {name} failed: {errors[0]!r}") from errors[0]
    return _method_results(exp, cfg, coordinator, reports, host_s), coordinator


def _method_results(
    exp: Experiment,
    cfg: JobConfig,
    coordinator: Coordinator,
    reports: list[RoundReport],
    host_s: float,
) -> dict[str, Any]:
    deploy = min(cfg.deploy.bits)
    state = coordinator.global_state
    acc_by_bits = {
        str(b): round(coordinator.evaluate_state(state, b), 4)
        for b in sorted({*exp.eval_bits, deploy, 32}, reverse=True)
    }
    # The fine stage's trial rounds ran on the boards before round 1: their time counts.
    sim = float(coordinator.fine_report.get("trial_sim_seconds_total", 0.0))
    curve = []
    for r in reports:
        sim += r.sim_seconds
        acc = r.acc_deploy.get(str(deploy))
        curve.append([r.round + 1, round(sim, 2), None if acc is None else round(acc, 4)])
    allocation = coordinator.allocation
    result: dict[str, Any] = {
        "final_acc": acc_by_bits.get(str(deploy)),
        "final_acc_fp32": acc_by_bits.get("32"),
        "deploy_bits": deploy,
        "sim_seconds": round(sim, 2),
        "host_seconds": round(host_s, 2),
        "rounds": len(reports),
        "curve": curve,
        "assignment": dict(sorted(allocation.strategies.items())) if allocation else {},
        "acc_by_bits": acc_by_bits,
        "allocation_seconds": dict(coordinator.allocation_seconds),
    }
    if allocation is not None and allocation.significance:
        result["significance"] = {
            d: [round(x, 4), round(y, 4)] for d, (x, y) in sorted(allocation.significance.items())
        }
        result["rules"] = dict(sorted(allocation.rules.items()))
    if coordinator.fine_report:
        result["fine"] = coordinator.fine_report
    if cfg.allocation.bits_from == "profile" or any(d.budget_bits for d in exp.devices):
        # Devices deploy different bits: score each device's own deployed model.
        budgets, accs = {}, {}
        for dev in sorted(coordinator.assignments):
            record = coordinator.store.device(dev)
            budgets[dev] = coordinator.device_budget(record.profile if record else {})
            bits = coordinator.device_deploy_bits(dev)
            accs[dev] = round(coordinator.evaluate_state(state, bits), 4)
        result["device_budget"] = budgets
        result["device_acc"] = accs
        if cfg.allocation.bits_from == "profile":
            result["final_acc"] = round(float(np.mean(list(accs.values()))), 4)
            result["deploy_bits"] = "per-device budget"
        layer_bits = {d: b for d, b in coordinator.layer_bits.items()}
        if layer_bits:
            result["layer_bits"] = layer_bits
    return result


# --- the experiment ------------------------------------------------------------------------------


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


def run_experiment(
    path: str | Path,
    out: str | Path,
    *,
    quick: bool = False,
    broker: str | None = None,
    seeds: Sequence[int] | None = None,
) -> dict[str, Any]:
    """Run every method of an experiment file; write results.json, report.md and plots.

    With several seeds every method and ablation runs once per seed, each seed's own results
    go to `DIR/seed-N/`, and `DIR/results.json` holds their means (with each seed's figures
    under `by_seed`): a ranking of methods from one seed is often the seed's, not the
    methods'.
    """
    from .simulate_report import write_report

    exp = load_experiment(path)
    seeds = _check_seeds(list(seeds), "--seeds") if seeds else exp.seeds_for(quick)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    data: ImageData | None = None
    host_steps: dict[str, float] | None = None
    per_seed: dict[int, dict[str, Any]] = {}
    for seed in seeds:
        exp_s = exp.with_seed(seed)
        out_s = out if len(seeds) == 1 else out / f"seed-{seed}"
        out_s.mkdir(parents=True, exist_ok=True)
        first = _job_dict(exp_s, next(iter(exp_s.methods.values())), "base", out_s, quick)
        base_cfg = job_config_from_dict(first, source=str(exp.path))
        if data is None:
            data = load_dataset(base_cfg.data.dataset, data_dir=base_cfg.data.data_dir)
        fleet = build_fleet(exp_s, data, base_cfg, quick, host_steps)
        host_steps = fleet.host_steps
        print(
            f"bitfleet simulate {exp.name}: {len(exp.devices)} virtual devices, "
            f"{len(exp.methods)} methods{' (quick)' if quick else ''}, seed {seed}"
            f"{f' ({len(per_seed) + 1} of {len(seeds)})' if len(seeds) > 1 else ''}; "
            "host step times "
            + ", ".join(f"{k} {v * 1e3:.2f} ms" for k, v in fleet.host_steps.items()),
            file=sys.stderr,
            flush=True,
        )
        methods: dict[str, dict[str, Any]] = {}
        by_assignment: dict[str, str] = {}
        for name, overlay in exp_s.methods.items():
            methods[name], _ = run_method(
                exp_s, name, overlay, fleet, data, out_s, quick=quick, broker=broker
            )
            by_assignment.setdefault(_assignment_key(exp_s, overlay, methods[name]), name)
            _write(out_s, exp_s, quick, methods, {}, t0)  # keep what is done if a later one fails
        ablations = _run_ablations(exp_s, fleet, data, out_s, quick, broker, methods, by_assignment)
        per_seed[seed] = _write(out_s, exp_s, quick, methods, ablations, t0)
        if len(seeds) > 1:
            write_report(per_seed[seed], out_s)
    one = len(seeds) == 1
    results = per_seed[seeds[0]] if one else _write_mean(out, exp, quick, per_seed, t0)
    write_report(results, out)
    return results


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
) -> dict[str, Any]:
    """Each ablation is a FedHQ variant (xi, SigAcc rule...). Its coarse allocation is computed
    first; where it equals a method already run, that run's results are its results (same
    seeds, same computation), otherwise it is trained like a method."""
    results: dict[str, Any] = {}
    profiles, reg_data = fleet.registration()
    for name, overlay in exp.ablations.items():
        job = _job_dict(exp, overlay, name, out, quick)
        cfg = job_config_from_dict(job, source=f"{exp.path} [ablations.{name}]")
        entry: dict[str, Any] = {"allocation": dict(overlay.get("allocation", {}))}
        if not cfg.allocation.fine:
            fleet_in = AllocationInput(
                profiles=profiles,
                data=reg_data,
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
            run, _ = run_method(exp, name, overlay, fleet, data, out, quick=quick, broker=broker)
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


# --- the command ---------------------------------------------------------------------------------


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
        args.config, args.out, quick=args.quick, broker=args.broker, seeds=args.seeds
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
