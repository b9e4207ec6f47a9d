"""Device profiles: what each board kind can do, how to recognise it, and how fast it trains.

A profile (`profiles/<name>.toml`, docs/architecture.md#device-profiles) holds the public-spec
figures of one board kind: cores, clock, memory, integer dot-product support, the bit-widths it
runs fast (`deploy_bits`) and stores packed (`storage_bits`), its link and its speed relative to a
server. The coordinator and the simulator plan with these figures; an agent also measures its own
machine and step times (`measure_machine`, `measure_step_times`), because a board's real memory,
clock and QAT cost beat any table, and sends both at registration (`profile_summary`): statistics,
never data samples.
"""

from __future__ import annotations

import os
import platform
import random
import statistics
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from importlib import resources
from pathlib import Path
from typing import Any

import psutil

from .machine import _INT_DOT_FLAGS, describe_machine
from .machine import cpu_flags as read_cpu_flags
from .runtime_facts import RuntimeFacts

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10 (JetPack 6's Ubuntu 22.04) needs the backport
    import tomli as tomllib

__all__ = [
    "PROFILES_ENV",
    "STORAGE_KINDS",
    "BoardMatch",
    "DetectRule",
    "DeviceProfile",
    "ProfileError",
    "detect_board",
    "load_profile",
    "load_profiles",
    "match_board",
    "measure_machine",
    "measure_step_times",
    "profile_summary",
    "profiles_dir",
]

PROFILES_ENV = "BITFLEET_PROFILES_DIR"
STORAGE_KINDS = ("int8", "packed")
"""`int8`: b-bit weights in int8 containers, run on integer kernels (speed-bound boards);
`packed`: INT4/INT2 initializers dequantized at run time, smaller files (storage-bound boards)."""

_BITS = tuple(range(2, 9))  # bitfleet.quant.SUPPORTED_BITS, without importing torch to read TOML

MAX_QAT_OVERHEAD = 100.0
"""Largest plausible cost of a QAT step relative to a float step (measured: 1.1 to 3)."""
_ARCH_ALIASES = {"arm64": "aarch64", "amd64": "x86_64", "x64": "x86_64"}
_DEVICE_TREE_MODEL = Path("/proc/device-tree/model")
_TEGRA_RELEASE = Path("/etc/nv_tegra_release")
SUMMARY_SCHEMA = 1


class ProfileError(ValueError):
    """A profile file that is missing, unreadable or wrong; the message names file and key."""


@dataclass(frozen=True)
class DetectRule:
    """How a board kind recognises itself on the running machine.

    `device_tree_model`: substrings of /proc/device-tree/model (case-insensitive), the board's
    own name; `nv_tegra_release`: whether /etc/nv_tegra_release exists (Jetson / L4T);
    `cpu_flags`: flags every such board's /proc/cpuinfo lists; `arch`: platform.machine().
    """

    device_tree_model: tuple[str, ...] = ()
    nv_tegra_release: bool = False
    cpu_flags: tuple[str, ...] = ()
    arch: str | None = None


def check_budget(budget: object) -> float:
    """`budget` if it is a bit budget: a number of bits per weight in [2, 8] (an int stays
    one, so a stated 4 still reads as 4)."""
    number = isinstance(budget, (int, float)) and type(budget) is not bool
    if number and _BITS[0] <= budget <= _BITS[-1]:  # type: ignore[operator]
        return budget  # type: ignore[return-value]
    raise ValueError(f"expected bits per weight in {_BITS[0]}..{_BITS[-1]}, got {budget!r}")


@dataclass(frozen=True)
class DeviceProfile:
    """One board kind's figures, as the coordinator and the simulator plan with them."""

    name: str
    description: str
    detect: DetectRule
    cores: int
    clock_ghz: float
    memory_gib: float
    gflops_fp32: float
    """Nominal (peak) fp32 throughput of the CPU, which is what bitfleet trains on."""
    int_dot_product: bool
    """Arm v8.2 dotprod or x86 VNNI: int8 kernels beat float in onnxruntime (docs/export.md)."""
    onnxruntime_providers: tuple[str, ...]
    deploy_bits: tuple[int, ...]
    """Bit-widths the board runs on integer kernels."""
    storage_bits: tuple[int, ...]
    """Bit-widths it can store packed (INT8 / INT4 / INT2 initializers)."""
    preferred_storage: str
    """`int8` for speed-bound boards, `packed` for storage-bound ones (see STORAGE_KINDS)."""
    qat_overhead: float
    """Prior for a QAT step's cost relative to a float step; measured step times replace it."""
    link_mbps: float
    relative_speed: float
    """Training speed relative to the x86 server (1.0): x86-server's `resnet18_ms` over this
    board's; the simulator scales host times by it."""
    resnet18_ms: float
    """Published ncnn ResNet-18 fp32 latency on the board's CPU (ms, batch 1; the profile
    file cites the table): what a virtual board scales float latencies measured on its host by."""
    resnet18_int8_ms: float | None = None
    """ncnn's `resnet18_int8` latency on the same threads, where the table has one (ms); the
    scale for integer-kernel files. None: such files scale like float ones."""
    budget_bits: float | None = None
    """A bit budget stated outright, in bits per weight at most (a fleet operator's choice, a
    simulated device), in [2, 8] and fractional where a mix of layer widths may meet it
    (2.5: FedMPQ may give some layers 3 bits, a uniform width gets 2); None: the board's
    widths decide (`deploy_width`). Never in a shipped profile file."""
    path: str | None = field(default=None, compare=False)

    @property
    def speed_bound(self) -> bool:
        """Deploy for speed (int8 kernels) rather than size (packed weights)."""
        return self.preferred_storage == "int8"

    def deploy_width(self, allowed: Sequence[int] = _BITS) -> int:
        """The one rule for the bits this board trains its budget at and deploys at, among
        `allowed` (docs/allocation.md#deploy-width).

        A stated `budget_bits` wins, as a limit someone set: the widest allowed width within it
        (at most the budget; the narrowest allowed one where none is). Otherwise the
        widest allowed width, because no board here needs fewer bits: 8-bit weights of a
        ResNet-18 take 11 MB, under 1% of the smallest board's memory, and onnxruntime runs
        sub-8-bit Conv weights in float or on int8 kernels, so fewer bits buy no speed, only
        accuracy lost (a Pi 4 scored 0.787 at 2 bits where 8 bits scored 0.851).
        """
        widths = sorted({int(b) for b in allowed})
        if not widths or any(b not in _BITS for b in widths):
            raise ValueError(f"allowed must name integer widths in 2..8, got {list(allowed)}")
        if self.budget_bits is not None:
            within = [b for b in widths if b <= self.budget_bits]
            return within[-1] if within else widths[0]
        return widths[-1]

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready (lists, not tuples); the source path stays local, and `budget_bits` and
        `resnet18_int8_ms` appear only where one is stated."""
        data = asdict(self)
        data.pop("path")
        for optional in ("budget_bits", *_OPTIONAL_FIELDS):
            if data[optional] is None:
                data.pop(optional)
        return _lists(data)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], source: str = "registration") -> DeviceProfile:
        """A profile sent as `to_dict()` (a board's registration), checked key by key as a
        profile file is; a `ProfileError` names `source` and the key."""
        if not isinstance(data, Mapping):
            raise ProfileError(f"{source}: board must be a table, got {type(data).__name__}")
        raw = {k: v for k, v in data.items() if not (k in _OPTIONAL_FIELDS and v is None)}
        budget = raw.pop("budget_bits", None)
        if budget is not None:
            try:
                budget = check_budget(budget)
            except ValueError as exc:
                raise ProfileError(f"{source}: key 'budget_bits': {exc}") from None
        profile = _parse(raw, Path(source), check_name=False)
        return replace(profile, budget_bits=budget, path=None)


@dataclass(frozen=True)
class BoardMatch:
    """The board kind chosen for a machine, and why: `exact` when the board named itself."""

    profile: DeviceProfile
    exact: bool
    reason: str


def _lists(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _lists(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_lists(v) for v in value]
    return value


# ---------------------------------------------------------------------------------------------
# Finding and reading the files


#: The shipped profiles as package data: `bitfleet/board_profiles` is a link to the top-level
#: `profiles/` folder, so a checkout, an editable install and a wheel all read the same files.
_PACKAGED_PROFILES = "bitfleet.board_profiles"


def profiles_dir(dir: str | Path | None = None) -> Path:
    """The folder of profile files: `dir`, else $BITFLEET_PROFILES_DIR, else the shipped ones.

    An explicit choice that does not exist is an error rather than a silent fallback, so a typo
    in a path or in the environment never plans a fleet with the wrong figures.
    """
    if dir is not None:
        path = Path(dir)
        if not path.is_dir():
            raise FileNotFoundError(f"profiles directory {path} does not exist")
        return path
    env = os.environ.get(PROFILES_ENV)
    if env:
        path = Path(env)
        if not path.is_dir():
            raise FileNotFoundError(f"{PROFILES_ENV}={env} is not a directory")
        return path
    shipped = _shipped_profiles_dir()
    if shipped is not None:
        return shipped
    raise FileNotFoundError(
        f"no device profiles found: pass a profiles directory or set {PROFILES_ENV}; the "
        f"package data {_PACKAGED_PROFILES} is missing or empty (reinstall bitfleet)"
    )


def _shipped_profiles_dir() -> Path | None:
    """The folder holding the package-data profiles, or None when none are installed.

    `bitfleet.board_profiles` is a namespace package (no `__init__.py` among the TOML files),
    so `files()` may give a `MultiplexedPath`; its entries are plain paths on a file system.
    """
    try:
        root = resources.files(_PACKAGED_PROFILES)
    except ModuleNotFoundError:
        return None
    for entry in root.iterdir():
        if entry.name.endswith(".toml") and isinstance(entry, Path):
            return entry.parent.resolve()  # the checkout's profiles/, not the link
    return None


def load_profiles(dir: str | Path | None = None) -> dict[str, DeviceProfile]:
    """Every `*.toml` profile in the folder (see `profiles_dir`), by name, each validated."""
    folder = profiles_dir(dir)
    files = sorted(folder.glob("*.toml"))
    if not files:
        raise FileNotFoundError(f"no *.toml device profiles in {folder}")
    return {p.name: p for p in map(_load_file, files)}


def load_profile(name_or_path: str | Path, dir: str | Path | None = None) -> DeviceProfile:
    """A profile by name ("rpi5") from the profiles folder, or from a path to a TOML file."""
    text = str(name_or_path)
    path = Path(name_or_path)
    if text.endswith(".toml") or os.sep in text or (os.altsep and os.altsep in text):
        if not path.is_file():
            raise FileNotFoundError(f"device profile {path} does not exist")
        return _load_file(path)
    profiles = load_profiles(dir)
    try:
        return profiles[text]
    except KeyError:
        raise ProfileError(
            f"unknown device profile {text!r}; known: {', '.join(sorted(profiles))}"
        ) from None


def _load_file(path: Path) -> DeviceProfile:
    try:
        with path.open("rb") as f:
            raw = tomllib.load(f)
    except OSError as exc:
        raise ProfileError(f"{path}: cannot read: {exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ProfileError(f"{path}: not valid TOML: {exc}") from None
    return _parse(raw, path)


# Each top-level key, and how it is checked and normalised.
def _str(v: Any) -> str:
    if not isinstance(v, str) or not v.strip():
        raise TypeError("expected a non-empty string")
    return v


def _bool(v: Any) -> bool:
    if not isinstance(v, bool):
        raise TypeError("expected true or false")
    return v


def _pos_int(hi: int) -> Callable[[Any], int]:
    """A positive integer up to a plausible `hi`: a board figure out of that range is a typo in
    a file or a lie in a registration, and would skew every plan made with it."""

    def check(v: Any) -> int:
        if isinstance(v, bool) or not isinstance(v, int) or not 0 < v <= hi:
            raise TypeError(f"expected an integer in 1..{hi}")
        return v

    return check


def _pos_float(hi: float) -> Callable[[Any], float]:
    """A positive finite number up to a plausible `hi` (see `_pos_int`)."""

    def check(v: Any) -> float:
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 < v <= hi:
            raise TypeError(f"expected a number in (0, {hi:g}]")
        return float(v)

    return check


def _overhead(v: Any) -> float:
    v = _pos_float(MAX_QAT_OVERHEAD)(v)
    if v < 1.0:
        raise TypeError("expected a number >= 1.0 (a QAT step is never cheaper than a float step)")
    return v


def _strs(v: Any) -> tuple[str, ...]:
    if not isinstance(v, list) or not all(isinstance(s, str) and s for s in v):
        raise TypeError("expected a list of non-empty strings")
    return tuple(v)


def _providers(v: Any) -> tuple[str, ...]:
    v = _strs(v)
    if not v:
        raise TypeError("expected at least one onnxruntime provider")
    return v


def _bits(v: Any) -> tuple[int, ...]:
    ok = isinstance(v, list) and v and all(type(b) is int and b in _BITS for b in v)
    if not ok or len(set(v)) != len(v):
        raise TypeError(f"expected a non-empty list of distinct bit-widths from {list(_BITS)}")
    return tuple(sorted(v, reverse=True))


def _storage(v: Any) -> str:
    if v not in STORAGE_KINDS:
        raise TypeError(f"expected one of {list(STORAGE_KINDS)}")
    return v


_FIELDS: dict[str, Callable[[Any], Any]] = {
    "name": _str,
    "description": _str,
    "cores": _pos_int(1024),
    "clock_ghz": _pos_float(10.0),
    "memory_gib": _pos_float(65536.0),
    "gflops_fp32": _pos_float(1e6),
    "int_dot_product": _bool,
    "onnxruntime_providers": _providers,
    "deploy_bits": _bits,
    "storage_bits": _bits,
    "preferred_storage": _storage,
    "qat_overhead": _overhead,
    "link_mbps": _pos_float(1e6),
    "relative_speed": _pos_float(1e4),
    "resnet18_ms": _pos_float(1e6),
    "resnet18_int8_ms": _pos_float(1e6),
}
_OPTIONAL_FIELDS = ("resnet18_int8_ms",)
"""Keys of `_FIELDS` a profile file or a registration may leave out (the field stays None)."""
_DETECT_FIELDS: dict[str, Callable[[Any], Any]] = {
    "device_tree_model": _strs,
    "nv_tegra_release": _bool,
    "cpu_flags": _strs,
    "arch": _str,
}


def _check_table(
    raw: Mapping[str, Any],
    fields: Mapping[str, Callable[[Any], Any]],
    path: Path,
    prefix: str,
    optional: Sequence[str] = (),
) -> dict[str, Any]:
    unknown = sorted(set(raw) - set(fields))
    if unknown:
        raise ProfileError(
            f"{path}: unknown key {prefix + unknown[0]!r}; known: {', '.join(fields)}"
        )
    out = {}
    for key, check in fields.items():
        if key not in raw:
            if key in optional:
                continue
            raise ProfileError(f"{path}: missing key {prefix + key!r}")
        try:
            out[key] = check(raw[key])
        except TypeError as exc:
            raise ProfileError(f"{path}: key {prefix + key!r}: {exc}, got {raw[key]!r}") from None
    return out


def _parse(raw: Mapping[str, Any], path: Path, check_name: bool = True) -> DeviceProfile:
    raw = dict(raw)
    detect_raw = raw.pop("detect", None)
    if not isinstance(detect_raw, dict):
        raise ProfileError(
            f"{path}: missing table 'detect' ([detect] with {', '.join(_DETECT_FIELDS)})"
        )
    values = _check_table(raw, _FIELDS, path, "", _OPTIONAL_FIELDS)
    detect = _check_table(detect_raw, _DETECT_FIELDS, path, "detect.")
    if check_name and values["name"] != path.stem:
        raise ProfileError(
            f"{path}: key 'name': {values['name']!r} differs from the file name {path.stem!r}"
        )
    detect["arch"] = _norm_arch(detect["arch"])
    return DeviceProfile(**values, detect=DetectRule(**detect), path=str(path))


# ---------------------------------------------------------------------------------------------
# Recognising the running board


def _norm_arch(arch: str) -> str:
    arch = arch.strip()
    return _ARCH_ALIASES.get(arch.lower(), arch)


def _read_device_tree_model() -> str | None:
    try:
        return _DEVICE_TREE_MODEL.read_bytes().rstrip(b"\0").decode(errors="replace").strip()
    except OSError:
        return None


def _read_tegra() -> bool:
    return _TEGRA_RELEASE.exists()


def match_board(
    profiles: Mapping[str, DeviceProfile] | None = None,
    *,
    device_tree_model: str | None = None,
    tegra: bool | None = None,
    cpu_flags: set[str] | list[str] | tuple[str, ...] | None = None,
    arch: str | None = None,
) -> BoardMatch:
    """The known board kind closest to this machine (or to the given facts), and why.

    A board that names itself in the device tree wins, the longest matching name first (a
    "Raspberry Pi 400" is a Pi 4 by its own entry). Otherwise the closest kind of the same
    architecture: same Tegra-ness, then same integer dot-product support, then all of the
    profile's CPU flags present. Facts not given are read from this machine.
    """
    profiles = load_profiles() if profiles is None else profiles
    if device_tree_model is None:
        device_tree_model = _read_device_tree_model()
    if tegra is None:
        tegra = _read_tegra()
    flags = set(read_cpu_flags() if cpu_flags is None else cpu_flags)
    arch = _norm_arch(platform.machine() if arch is None else arch)

    same_arch = [profiles[n] for n in sorted(profiles) if profiles[n].detect.arch in (None, arch)]
    if not same_arch:
        known = ", ".join(f"{p.name} ({p.detect.arch})" for p in profiles.values())
        raise ProfileError(f"no known board kind for architecture {arch!r}; known: {known}")

    model = (device_tree_model or "").casefold()
    named = [
        (len(s), s, p)
        for p in same_arch
        for s in p.detect.device_tree_model
        if model and s.casefold() in model
    ]
    if named:
        _, hit, profile = max(named, key=lambda t: t[0])
        return BoardMatch(profile, True, f"device tree model {device_tree_model!r} names {hit!r}")

    has_dot = any(f in flags for f in _INT_DOT_FLAGS)

    def closeness(p: DeviceProfile) -> tuple[bool, bool, bool]:
        return (
            p.detect.nv_tegra_release == tegra,
            p.int_dot_product == has_dot,
            all(f in flags for f in p.detect.cpu_flags),
        )

    profile = max(same_arch, key=closeness)  # max keeps the first (by name) of equals
    tegra_text = "Tegra" if tegra else "not Tegra"
    dot_text = "integer dot product" if has_dot else "no integer dot product"
    return BoardMatch(profile, False, f"closest by architecture: {arch}, {tegra_text}, {dot_text}")


def detect_board(
    profiles: Mapping[str, DeviceProfile] | None = None,
    *,
    device_tree_model: str | None = None,
    tegra: bool | None = None,
    cpu_flags: set[str] | list[str] | tuple[str, ...] | None = None,
    arch: str | None = None,
) -> DeviceProfile:
    """The profile of the running board; see `match_board` for the rules and injectable facts."""
    return match_board(
        profiles, device_tree_model=device_tree_model, tegra=tegra, cpu_flags=cpu_flags, arch=arch
    ).profile


# ---------------------------------------------------------------------------------------------
# Measuring this machine


def _max_clock_ghz() -> float | None:
    try:
        freq = psutil.cpu_freq()
    except (OSError, NotImplementedError):  # absent cpufreq in some VMs and containers
        freq = None
    if freq is not None and (freq.max or freq.current):
        return round((freq.max or freq.current) / 1000, 2)
    return None


def measure_machine() -> dict[str, Any]:
    """This machine as it really is: cores, clock, memory, architecture, integer dot products.

    JSON-ready. `usable_cores` is what this process may run on (cgroups, taskset), which is
    what training gets; `int_dot_product` lists the flags found (avx512_vnni, avx_vnni, asimddp).
    """
    info = describe_machine()
    mem = psutil.virtual_memory()
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        usable = os.cpu_count()
    info.update(
        arch=_norm_arch(str(info["arch"])),
        usable_cores=usable,
        max_clock_ghz=_max_clock_ghz(),
        memory_gib=round(mem.total / 2**30, 2),
        memory_available_gib=round(mem.available / 2**30, 2),
        device_tree_model=_read_device_tree_model(),
        nv_tegra_release=_read_tegra(),
    )
    return info


def time_train_steps(
    model_name: str,
    methods: Mapping[str, Any],
    *,
    batch_size: int = 64,
    steps: int = 8,
    in_channels: int = 1,
    image_size: int = 28,
    num_classes: int = 10,
    warmup: int = 2,
    seed: int = 0,
) -> dict[str, float]:
    """Median seconds of one training step of `model_name` under each local method.

    Random data, the same step the agents run. Steps of the methods alternate, so drift
    (thermal throttling on a fanless board, other load on a shared host) hits them alike;
    `warmup` steps of each are not counted.
    """
    import torch

    from .models import create_model
    from .training import make_optimizer, train_step

    if batch_size <= 0 or steps <= 0 or warmup < 0:
        raise ValueError(
            f"batch_size and steps must be positive and warmup >= 0, "
            f"got {batch_size}, {steps}, {warmup}"
        )
    gen = torch.Generator().manual_seed(seed)
    xb = torch.rand(batch_size, in_channels, image_size, image_size, generator=gen)
    yb = torch.randint(0, num_classes, (batch_size,), generator=gen)
    runs = []
    for key, method in methods.items():
        torch.manual_seed(seed)
        model = create_model(model_name, num_classes, in_channels, image_size)
        method.prepare(model)
        model.train()
        rng = random.Random(seed)
        method.begin_round(model, rng)
        opt = make_optimizer(model, "adam", 1e-3)
        runs.append((key, model, opt, method, rng, []))
    for _ in range(warmup + steps):
        for _key, model, opt, method, rng, times in runs:
            t0 = time.perf_counter()
            train_step(model, opt, method, xb, yb, rng)
            times.append(time.perf_counter() - t0)
    return {key: statistics.median(t[warmup:]) for key, *_, t in runs}


def measure_step_times(
    model_name: str,
    batch_size: int = 64,
    steps: int = 8,
    in_channels: int = 1,
    image_size: int = 28,
    num_classes: int = 10,
    qat_bits: int = 4,
    *,
    warmup: int = 2,
    seed: int = 0,
) -> dict[str, Any]:
    """Median seconds of a float and of a QAT training step of `model_name` on this machine.

    What FedHQ's speed significance needs from each board (docs/allocation.md#fedhq): real `t_fp`
    and `t_qat` on the job's model and batch size (`time_train_steps`).
    """
    import torch

    from .quant import QAT, LocalMethod

    methods = {"t_fp": LocalMethod(), "t_qat": QAT(bits=qat_bits)}
    result: dict[str, Any] = time_train_steps(
        model_name,
        methods,
        batch_size=batch_size,
        steps=steps,
        in_channels=in_channels,
        image_size=image_size,
        num_classes=num_classes,
        warmup=warmup,
        seed=seed,
    )
    result.update(
        batch_size=batch_size,
        model=model_name,
        qat_bits=qat_bits,
        steps=steps,
        warmup=warmup,
        input_shape=[in_channels, image_size, image_size],
        torch_threads=torch.get_num_threads(),
    )
    return result


def profile_summary(
    board: DeviceProfile,
    measured: Mapping[str, Any],
    steps: Mapping[str, Any] | None,
    runtime: RuntimeFacts | None = None,
) -> dict[str, Any]:
    """What an agent sends at registration: its board kind, its machine, its step times, its
    runtime.

    JSON-ready: `board` is the matched profile (`board["name"]` its kind), `measured` the
    machine (`measure_machine`), `step_times` the timings (`measure_step_times`) or None,
    `runtime` what its onnxruntime loads (`bitfleet.runtime_facts.probe_runtime`) where known.
    `qat_overhead` is the measured t_qat / t_fp where step times exist, else the profile's
    prior; `qat_overhead_source` says which. No data samples ever go in here.
    """
    if steps is not None and steps.get("t_fp", 0) > 0:
        overhead, source = float(steps["t_qat"]) / float(steps["t_fp"]), "measured"
    else:
        overhead, source = board.qat_overhead, "profile"
    return {
        "schema": SUMMARY_SCHEMA,
        "board": board.to_dict(),
        "measured": _lists(dict(measured)),
        "step_times": None if steps is None else _lists(dict(steps)),
        "qat_overhead": round(overhead, 4),
        "qat_overhead_source": source,
        **({} if runtime is None else {"runtime": runtime.to_dict()}),
    }
