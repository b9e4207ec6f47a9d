"""The experiment file of `bitfleet simulate`: its fleet, methods, ablations and seeds.

An experiment file is a job file (the base job every method starts from) plus a `[simulate]`
table (the virtual fleet, the bit-widths to evaluate, the quick settings, the seeds), a
`[methods]` table of job overlays and an optional `[ablations]` table of more. Everything is
checked here, every method's job included, before anything runs.
"""

from __future__ import annotations

import copy
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from bitfleet.profiles import check_budget, load_profile
from coordinator.config import JobConfigError, job_config_from_dict

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10 needs the tomli backport
    import tomli as tomllib

EVAL_BITS_DEFAULT = (32, 8, 6, 4, 3, 2)


@dataclass(frozen=True)
class SimDevice:
    """One virtual board; `slow_from_round` (1-based, as reports count) and `slow_factor`
    make it train `slow_factor` times slower from that round on (thermal throttling, other
    load: docs/allocation.md#runtime). Slow from round 1, it registers its slow step times."""

    id: str
    board: str
    budget_bits: float | None = None
    slow_from_round: int | None = None
    slow_factor: float = 1.0

    def slowdown(self, rnd: int) -> float:
        """How many times slower than its board this device trains in round `rnd` (0-based)."""
        if self.slow_from_round is None or rnd + 1 < self.slow_from_round:
            return 1.0
        return self.slow_factor


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

    def only(self, names: Sequence[str]) -> Experiment:
        """The same experiment with only the methods and ablations named (in the file's order);
        an unknown name is an error that lists the known ones."""
        known = [*self.methods, *self.ablations]
        unknown = [n for n in names if n not in known]
        if unknown:
            raise JobConfigError(
                f"{self.path}: no method or ablation {', '.join(map(repr, unknown))}; "
                f"known: {', '.join(known)}"
            )
        methods = {n: o for n, o in self.methods.items() if n in names}
        if not methods:
            raise JobConfigError(f"{self.path}: --methods must name at least one method")
        ablations = {n: o for n, o in self.ablations.items() if n in names}
        return replace(self, methods=methods, ablations=ablations)

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
        if budget is not None:
            try:
                check_budget(budget)
            except ValueError as exc:
                raise JobConfigError(f"{path}: simulate.devices[{i}].budget_bits: {exc}") from None
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
