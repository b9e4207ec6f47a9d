"""One method of an experiment, run as a federated job by the daemon's own `Coordinator`.

The virtual boards are the boards' own `EdgeAgent`s (found through the `bitfleet.agents` entry
point); an in-process bus replaces MQTT unless a broker URL is given. Nothing here aggregates,
allocates or trains: it wires the coordinator and the boards together, runs the job, and hands
what it produced to `results._method_results`.
"""

from __future__ import annotations

import re
import shutil
import sys
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from bitfleet import plugins
from bitfleet.data import ImageData
from bitfleet.protocol.inprocess import InProcessBus
from coordinator.config import job_config_from_dict
from coordinator.evaluation import width_label
from coordinator.server import Coordinator, JobResult, RoundReport

from .compute import ProcessCompute, SequentialCompute
from .experiment import Experiment, _merge
from .results import _method_results
from .virtual_fleet import VirtualFleet


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
        acc = " ".join(f"{width_label(b)} {a:.3f}" for b, a in report.acc_deploy.items())
        line = (
            f"{self.method:>14} [{'#' * filled}{'.' * (width - filled)}] round {done}/{self.rounds}"
            f"  acc {report.acc_fp32:.3f} float, {acc}  sim {self.sim:7.0f} s"
            f"  host {time.perf_counter() - self.t0:5.0f} s"
        )
        end = "\n" if done == self.rounds or not self.live else ""
        print(("\r\033[K" if self.live else "") + line, end=end, file=sys.stderr, flush=True)


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
    compute: SequentialCompute | ProcessCompute | None = None,
) -> tuple[dict[str, Any], Coordinator]:
    """Run one method as a federated job; return its results entry and the coordinator.

    `compute` runs the boards' local rounds (`fleet.simulate.compute`; shared across methods,
    so worker processes start once); None: one after another on this thread."""
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
    host_cpu = compute if compute is not None else SequentialCompute()
    owned = compute is None
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
        torch.set_num_threads(1)  # see SequentialCompute: only the training thread gets two
        try:
            agent.run()
        except BaseException as exc:  # noqa: BLE001 - reported after the job
            errors.append(exc)

    finished: list[JobResult] = []

    def coordinate() -> None:
        torch.set_num_threads(1)
        try:
            finished.append(coordinator.run())
        except BaseException as exc:  # noqa: BLE001 - re-raised below
            errors.append(exc)

    threads = [threading.Thread(target=serve, args=(a,), daemon=True) for a in agents]
    t0 = time.perf_counter()
    main = threading.Thread(target=coordinate, name=f"coordinator-{name}", daemon=True)
    main.start()
    # Boards register once on connect and repeat only every 10 s: let the coordinator listen
    # first, as a daemon that was started before its fleet does.
    while main.is_alive() and not coordinator.listening.wait(0.01):
        pass
    for t in threads:
        t.start()
    try:
        host_cpu.serve(until=lambda: not main.is_alive())
    except KeyboardInterrupt:
        coordinator.stop()
        main.join()
        raise
    finally:
        if owned:  # a shared runner outlives the method; its owner closes it
            host_cpu.close()
        for agent in agents:
            agent.stop()
        for t in threads:
            t.join(30)
    host_s = time.perf_counter() - t0
    if errors:
        raise RuntimeError(f"method {name} failed: {errors[0]!r}") from errors[0]
    entry = _method_results(exp, cfg, finished[0], coordinator.evaluate_state, host_s)
    return entry, coordinator
