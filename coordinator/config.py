"""A federated job, read from TOML and checked before anything starts.

Every table is a frozen dataclass whose fields carry their kind and range, so the loader, the
error messages and `to_dict` come from one description. An error names the file, the
`table.key` and what was wrong: an operator starting a daemon should learn about a typo in
the first second, not after twenty minutes of waiting for devices. `config_hash` fingerprints
what a run computes, so a coordinator refuses to resume a state directory with another job.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import math
import os
import re
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from bitfleet.data import DATASET_SPECS, DEFAULT_VALIDATION_FRACTION, PARTITION_SCHEMES
from bitfleet.models import MODELS
from bitfleet.quant import FLOAT_BITS, METHODS, STEP_MODES, SUPPORTED_BITS
from bitfleet.training import OPTIMIZERS

from .aggregation import AGGREGATIONS
from .server_optimizers import SERVER_OPTIMIZERS
from .validation import NORM_MODES

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10 needs the tomli backport
    import tomli as tomllib

__all__ = [
    "ACC_RULES",
    "ALLOCATION_MODES",
    "BITS_SOURCES",
    "SPEED_RULES",
    "HASH_EXCLUDED",
    "STORAGE_MODES",
    "AllocationSection",
    "DataSection",
    "DeploySection",
    "JobConfig",
    "JobConfigError",
    "JobSection",
    "ModelSection",
    "RoundsSection",
    "ServerSection",
    "TrainingSection",
    "ValidationSection",
    "config_hash",
    "job_config_from_dict",
    "load_job_config",
]

ALLOCATION_MODES = ("fixed", "fedhq", "random")
"""`fixed`: every device gets `strategy` at `bits` (all-QAT, all-PTQ, float FedAvg);
`fedhq`: docs/allocation.md#fedhq; `random`: the FedRH baseline (QAT with probability `p_qat`)."""

BITS_SOURCES = ("job", "profile")
"""Where a device's training bits come from: the job's `bits`, or its profile's budget."""

SPEED_RULES = ("critical", "simple")
"""SigSpeed: lengthening of the critical path (docs/allocation.md#fedhq), or the simpler
own-slowdown ablation."""

ACC_RULES = ("fit", "raw")
"""SigAcc from the fitted label profile (docs/allocation.md#fedhq), or from the raw histogram
(ablation)."""

STORAGE_MODES = ("int8", "packed", "auto")
"""How sub-8-bit weights are stored in exports (docs/export.md); `auto`: the profile decides."""

HASH_EXCLUDED = ("job.state_dir", "data.data_dir", "training.rounds")
"""Left out of `config_hash`: where things live, and how many rounds (so a run can be extended)."""

_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")


class JobConfigError(ValueError):
    """A job file that cannot be used; the message names the file and the `table.key`."""


# --- field descriptions -------------------------------------------------------------------

Check = Callable[[Any], str | None]


def _key(default: Any, kind: str, *checks: Check, doc: str = "") -> Any:
    return field(default=default, metadata={"kind": kind, "checks": checks, "doc": doc})


def _one_of(choices: Any) -> Check:
    allowed = list(choices)
    return lambda v: None if v in allowed else f"must be one of {allowed}"


def _gt(lo: float) -> Check:
    return lambda v: None if v > lo else f"must be > {lo}"


def _ge(lo: float) -> Check:
    return lambda v: None if v >= lo else f"must be >= {lo}"


def _le(hi: float) -> Check:
    return lambda v: None if v <= hi else f"must be <= {hi}"


def _lt(hi: float) -> Check:
    return lambda v: None if v < hi else f"must be < {hi}"


def _name(v: str) -> str | None:
    # Names end up in directory names and MQTT topics, where '/', '+', '#' and spaces break.
    if _NAME_RE.fullmatch(v):
        return None
    return "must be letters, digits, '_', '.' or '-' (it is used in paths and MQTT topics)"


def _bit_set(v: tuple[int, ...]) -> str | None:
    return _bits_list(v) if v else None


def _bits_list(v: tuple[int, ...]) -> str | None:
    if not v:
        return "must list at least one bit-width"
    if any(b not in SUPPORTED_BITS for b in v):
        return "each bit-width must be in 2..8"
    if len(set(v)) != len(v):
        return "must not repeat a bit-width"
    return None


# --- tables ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class JobSection:
    """`[job]`: what the run is called, which fleet it drives, where its state lives."""

    name: str = _key("fmnist-lenet", "str", _name)
    fleet: str = _key("default", "str", _name, doc="MQTT topic prefix bitfleet/<fleet>/")
    seed: int = _key(0, "int", _ge(0))
    state_dir: Path | None = _key(None, "path?", doc="default runs/<name> beside the job file")


@dataclass(frozen=True)
class ModelSection:
    """`[model]`: the architecture, by its name in `bitfleet.models.MODELS`."""

    name: str = _key("lenet5", "str", _one_of(MODELS))


@dataclass(frozen=True)
class DataSection:
    """`[data]`: the data set the coordinator evaluates on and how a simulator splits it."""

    dataset: str = _key("fashion-mnist", "str", _one_of(DATASET_SPECS))
    data_dir: Path | None = _key(None, "path?")
    partition: str = _key("dirichlet", "str", _one_of(PARTITION_SCHEMES))
    alpha: float = _key(0.5, "float", _gt(0))
    test_samples: int | None = _key(None, "int?", _ge(1), doc="first N test samples; all if unset")
    validation_fraction: float = _key(
        DEFAULT_VALIDATION_FRACTION,
        "float",
        _gt(0),
        _le(0.5),
        doc="training images the coordinator holds back for its decisions; no device trains "
        "on them, and the test split only reports (docs/round.md#validation)",
    )


@dataclass(frozen=True)
class TrainingSection:
    """`[training]`: rounds and what each device does locally in one round."""

    rounds: int = _key(5, "int", _ge(1))
    local_epochs: float = _key(1.0, "float", _gt(0))
    batch_size: int = _key(64, "int", _ge(1))
    lr: float = _key(1e-3, "float", _gt(0))
    optimizer: str = _key("adam", "str", _one_of(sorted(OPTIMIZERS)))


@dataclass(frozen=True)
class RoundsSection:
    """`[rounds]`: selection, deadlines and quorum of every round."""

    fraction: float = _key(1.0, "float", _gt(0), _le(1))
    min_devices: int = _key(2, "int", _ge(1))
    deadline_s: float = _key(120.0, "float", _gt(0))
    quorum: float = _key(0.8, "float", _gt(0), _le(1))
    register_timeout_s: float = _key(120.0, "float", _gt(0))


@dataclass(frozen=True)
class ServerSection:
    """`[server]`: the server optimiser applied to the round's mean (Reddi et al. 2021).

    `lr` defaults per optimiser (1.0 for fedavg/fedavgm, 0.01 for fedadam, whose steps are
    about `lr` per coordinate whatever the update's size).

    `aggregation` says how the round's updates become that "mean": the streaming
    sample-weighted mean, or a robust rule against hostile updates (coordinate-wise trimmed mean
    or median, unweighted), which must hold every update of the round in memory.
    """

    optimizer: str = _key("fedavg", "str", _one_of(SERVER_OPTIMIZERS))
    lr: float = _key(1.0, "float", _gt(0))
    momentum: float = _key(0.9, "float", _ge(0), _lt(1))
    beta1: float = _key(0.9, "float", _ge(0), _lt(1))
    beta2: float = _key(0.99, "float", _ge(0), _lt(1))
    eps: float = _key(1e-3, "float", _gt(0), doc="FedAdam's adaptivity tau")
    aggregation: str = _key(
        "mean",
        "str",
        _one_of(AGGREGATIONS),
        doc="mean: streaming, O(model); trimmed_mean, median: buffer the round, O(N x model)",
    )
    trim: float = _key(0.2, "float", _ge(0), _lt(0.5), doc="trimmed_mean: share cut per side")
    max_weight_share: float = _key(
        0.25,
        "float",
        _gt(0),
        _le(1),
        doc="mean: largest share of a round's weight one device gets (docs/round.md#weights)",
    )


@dataclass(frozen=True)
class ValidationSection:
    """`[validation]`: the update-norm outlier rule (`coordinator.validation`).

    Names, shapes, dtypes and NaN/Inf are always checked. The norm rule compares each update's
    `|update - global|` with the median of the last `window` accepted ones, and until
    `min_history` are known with the round's own, from the first round on.

    `reject` is the default: a clipped hostile update still moves the model by `factor` times
    an honest step in the direction its sender chose; a rejected one moves it not at all, and
    an honest device ten times the median's norm is rare (docs/security.md#threat-model).
    """

    mode: str = _key("reject", "str", _one_of(NORM_MODES), doc="off | clip | reject")
    factor: float = _key(10.0, "float", _ge(1), doc="outlier: norm > factor x median")
    min_history: int = _key(5, "int", _ge(1), doc="norms the median needs; fewer: the round's")
    window: int = _key(100, "int", _ge(1), doc="recent accepted norms the median is taken over")


@dataclass(frozen=True)
class AllocationSection:
    """`[allocation]`: which local method and bit budget each device gets
    (docs/allocation.md#fedhq)."""

    mode: str = _key("fixed", "str", _one_of(ALLOCATION_MODES))
    strategy: str = _key("qat", "str", _one_of(METHODS))
    bits: int = _key(4, "int", _one_of((*SUPPORTED_BITS, FLOAT_BITS)))
    xi: float = _key(0.2, "float", _ge(0), _le(1), doc="FedHQ band half-width")
    a: float = _key(0.0625, "float", _ge(0), _le(1), doc="FedHQ 'unimportant' threshold")
    p_qat: float = _key(0.5, "float", _ge(0), _le(1), doc="random mode: P(QAT)")
    qat_strategy: str = _key("qat", "str", _one_of(METHODS), doc="hybrid modes: the QAT side")
    ptq_strategy: str = _key("ptq", "str", _one_of(METHODS), doc="hybrid modes: the PTQ side")
    bit_set: tuple[int, ...] = _key(
        (), "int-list", _bit_set, doc="mqat's widths; empty: each device's supported ones"
    )
    act_bits: int = _key(
        FLOAT_BITS,
        "int",
        _one_of((*SUPPORTED_BITS, FLOAT_BITS)),
        doc="activation width of QAT, MQAT, APQN, KURE training; 32: float activations",
    )
    act_bit_set: tuple[int, ...] = _key(
        (), "int-list", _bit_set, doc="mqat's activation widths, drawn per round; empty: act_bits"
    )
    bits_from: str = _key(
        "job", "str", _one_of(BITS_SOURCES), doc="job: `bits` for all; profile: device budget"
    )
    speed_rule: str = _key("critical", "str", _one_of(SPEED_RULES), doc="SigSpeed definition")
    acc_rule: str = _key("fit", "str", _one_of(ACC_RULES), doc="SigAcc from the fit or raw")
    deploy_aware: bool = _key(
        False, "bool", doc="fedhq: SigAcc scaled by the PTQ loss at the fleet's deploy widths"
    )
    deploy_loss_ref: float = _key(
        0.02, "float", _gt(0), _le(1), doc="deploy-aware: PTQ loss that counts SigAcc fully"
    )
    reallocate: bool = _key(True, "bool", doc="fedhq: decide again each round from speeds")
    calib_batches: int = _key(8, "int", _ge(0), doc="PTQ calibration batches in T(PTQ)")
    fine: bool = _key(False, "bool", doc="fedhq: run the fine ML-based adjustment")
    fine_candidates: int = _key(6, "int", _ge(2), doc="trial assignments of ambiguous devices")
    fine_rounds: int = _key(1, "int", _ge(1), doc="trial rounds per candidate")
    fine_epochs: float = _key(0.25, "float", _gt(0), doc="local epochs of a trial round")
    time_weight: float = _key(
        0.5,
        "float",
        _ge(0),
        doc="fine stage: accuracy points given up per unit of round-time share",
    )
    step: str = _key(
        "frozen", "str", _one_of(STEP_MODES), doc="qat/mqat step: frozen per round, or learned"
    )
    mpq_lasso: float = _key(1e-4, "float", _ge(0), doc="mpq: group-Lasso strength")


@dataclass(frozen=True)
class DeploySection:
    """`[deploy]`: the widths a device's candidates are exported at, and how the boards time
    them (docs/export.md#deploy-candidates)."""

    bits: tuple[int, ...] = _key((8, 4, 2), "int-list", _bits_list)
    act_bits: tuple[int, ...] = _key(
        (), "int-list", _bit_set, doc="activation widths evaluated with each weight width"
    )
    storage: str = _key(
        "auto", "str", _one_of(STORAGE_MODES), doc="auto: int8 and packed candidates both"
    )
    timing_timeout_s: float = _key(
        120.0, "float", _gt(0), doc="how long boards have to time their candidates"
    )


@dataclass(frozen=True)
class JobConfig:
    """One federated job: every table of the job file, checked."""

    job: JobSection = field(default_factory=JobSection)
    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    training: TrainingSection = field(default_factory=TrainingSection)
    rounds: RoundsSection = field(default_factory=RoundsSection)
    server: ServerSection = field(default_factory=ServerSection)
    allocation: AllocationSection = field(default_factory=AllocationSection)
    deploy: DeploySection = field(default_factory=DeploySection)
    validation: ValidationSection = field(default_factory=ValidationSection)

    def to_dict(self) -> dict[str, dict[str, Any]]:
        """Plain JSON-able tables (paths as strings, lists for tuples); loads back unchanged."""
        out: dict[str, dict[str, Any]] = {}
        for table in fields(self):
            section = getattr(self, table.name)
            out[table.name] = {k.name: _plain(getattr(section, k.name)) for k in fields(section)}
        return out


TABLES: dict[str, type] = {f.name: f.default_factory for f in fields(JobConfig)}  # type: ignore[misc]


def _plain(v: Any) -> Any:
    if isinstance(v, Path):
        return str(v)
    if isinstance(v, tuple):
        return list(v)
    return v


# --- loading --------------------------------------------------------------------------------


def _convert(kind: str, v: Any, base_dir: Path) -> tuple[Any, str | None]:
    """Coerce a raw TOML value to a field's kind; return (value, problem)."""
    if kind.endswith("?"):
        if v is None:
            return None, None
        kind = kind[:-1]
    if kind == "str":
        return (v, None) if isinstance(v, str) else (v, "expected a string")
    if kind == "int":
        if isinstance(v, bool) or not isinstance(v, int):
            return v, "expected an integer"
        return v, None
    if kind == "bool":
        return (v, None) if isinstance(v, bool) else (v, "expected true or false")
    if kind == "float":
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            return v, "expected a number"
        if not math.isfinite(v):
            return v, "must be finite"
        return float(v), None
    if kind == "path":
        if not isinstance(v, str) or not v:
            return v, "expected a non-empty path string"
        p = Path(v).expanduser()
        return Path(os.path.abspath(base_dir / p)), None
    if kind == "int-list":
        if not isinstance(v, (list, tuple)) or any(
            isinstance(b, bool) or not isinstance(b, int) for b in v
        ):
            return v, "expected a list of integers"
        return tuple(v), None
    raise AssertionError(f"unknown field kind {kind}")  # a bug in this module, not in the file


def _suggest(word: str, allowed: list[str]) -> str:
    close = difflib.get_close_matches(word, allowed, n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _load_table(
    table: str, raw: Any, source: str, base_dir: Path
) -> tuple[dict[str, Any], set[str]]:
    """Check one table's keys and values; return the values and the keys given explicitly."""
    cls = TABLES[table]
    if not isinstance(raw, Mapping):
        raise JobConfigError(f"{source}: [{table}] must be a table, got {raw!r}")
    specs = {f.name: f for f in fields(cls)}
    values: dict[str, Any] = {}
    for key, v in raw.items():
        if key not in specs:
            raise JobConfigError(
                f"{source}: unknown key {table}.{key}{_suggest(key, list(specs))}; "
                f"allowed keys in [{table}]: {', '.join(specs)}"
            )
        kind = specs[key].metadata["kind"]
        value, problem = _convert(kind, v, base_dir)
        if problem is None and value is not None:
            for check in specs[key].metadata["checks"]:
                problem = check(value)
                if problem:
                    break
        if problem:
            raise JobConfigError(f"{source}: {table}.{key}: {problem}, got {v!r}")
        values[key] = value
    return values, set(raw)


def job_config_from_dict(
    d: Mapping[str, Any], source: str = "<job config>", base_dir: str | Path | None = None
) -> JobConfig:
    """Check a job given as nested tables; relative paths resolve against `base_dir` (or cwd)."""
    base = Path(os.path.abspath(base_dir if base_dir is not None else Path.cwd()))
    if not isinstance(d, Mapping):
        raise JobConfigError(f"{source}: expected tables, got {type(d).__name__}")
    for table in d:
        if table not in TABLES:
            raise JobConfigError(
                f"{source}: unknown table [{table}]{_suggest(table, list(TABLES))}; "
                f"allowed tables: {', '.join(TABLES)}"
            )
    tables: dict[str, Any] = {}
    for table, cls in TABLES.items():
        values, given = _load_table(table, d.get(table, {}), source, base)
        if table == "job" and values.get("state_dir") is None:
            values["state_dir"] = base / "runs" / values.get("name", JobSection.name)
        if table == "server" and "lr" not in given:
            optimizer = values.get("optimizer", ServerSection.optimizer)
            values["lr"] = SERVER_OPTIMIZERS[optimizer].default_lr
        tables[table] = cls(**values)
        if table == "validation" and tables[table].min_history > tables[table].window:
            raise JobConfigError(
                f"{source}: validation.min_history: must be <= validation.window "
                f"({tables[table].window}), got {tables[table].min_history}"
            )
    return JobConfig(**tables)


def load_job_config(path: str | Path) -> JobConfig:
    """Read and check a TOML job file; relative paths in it resolve against its folder."""
    path = Path(path)
    try:
        text = path.read_bytes().decode("utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise JobConfigError(f"{path}: cannot read job file: {e}") from e
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise JobConfigError(f"{path}: not valid TOML: {e}") from e
    return job_config_from_dict(raw, source=str(path), base_dir=path.absolute().parent)


def config_hash(cfg: JobConfig, exclude: tuple[str, ...] = HASH_EXCLUDED) -> str:
    """sha256 of the job's canonical JSON, without the `table.key`s in `exclude`."""
    d = cfg.to_dict()
    for dotted in exclude:
        table, _, key = dotted.partition(".")
        d.get(table, {}).pop(key, None)
    canonical = json.dumps(d, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(canonical.encode("ascii")).hexdigest()
