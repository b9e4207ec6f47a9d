"""The simulator's step costs: this host's seconds per training step, calibrated once and cached
(docs/simulation.md#the-board-clock).

A virtual board's clock is this host's step time for its local method, scaled by its board's
speed. Timed while an experiment runs, that figure moves with whatever else the host does (two
runs of one seed gave 66 and 83 simulated seconds). So each (model, method, batch size) is timed
once per host (CPU model, torch version, threads), on first use, as the least of three
interleaved medians, and kept in the cache (`bitfleet.cache`); every later run reads it and
times nothing. `bitfleet simulate --recalibrate` measures again.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable

from bitfleet.cache import cache_dir, cpu_name, file_lock, read_json, write_json
from bitfleet.data import DATASET_SPECS
from bitfleet.profiles import time_train_steps
from bitfleet.quant import make_method

log = logging.getLogger(__name__)

CACHE_FILE = "step_costs.json"
CALIBRATION_STEPS = 40
REPEATS = 3
"""Medians per figure: the least is kept, the one least disturbed by other load."""


def _method(strategy: str):  # noqa: ANN202 - a LocalMethod
    return make_method(strategy, **({"bits": 2} if strategy in ("qat", "apqn", "mpq") else {}))


def _host_key() -> str:
    import torch

    return f"{cpu_name()} | torch {torch.__version__} | {torch.get_num_threads()} threads"


def _cost_key(model_name: str, dataset: str, strategy: str, batch_size: int) -> str:
    return f"{model_name} | {dataset} | {strategy} | batch {batch_size}"


def calibrate(
    model_name: str, dataset: str, strategies: Iterable[str], batch_size: int
) -> dict[str, float]:
    """Time one training step per method on this host, now: the least of `REPEATS` medians of
    `CALIBRATION_STEPS` interleaved steps (`ptq` trains exactly as `fp` and is not timed)."""
    spec = DATASET_SPECS[dataset]
    names = sorted(set(strategies) - {"ptq"} | {"fp"})
    best: dict[str, float] = {}
    for _ in range(REPEATS):
        times = time_train_steps(
            model_name,
            {s: _method(s) for s in names},
            batch_size=batch_size,
            steps=CALIBRATION_STEPS,
            in_channels=spec.in_channels,
            image_size=spec.image_size,
            num_classes=spec.num_classes,
            warmup=3,
        )
        for s, t in times.items():
            best[s] = min(best.get(s, t), t)
    return best


def host_step_seconds(
    model_name: str,
    dataset: str,
    strategies: Iterable[str],
    batch_size: int,
    *,
    recalibrate: bool = False,
) -> dict[str, float]:
    """Seconds of one training step per method on this host, from the cache; the methods it
    lacks (or all, with `recalibrate`) are timed now and added. `ptq` shares `fp`'s figure."""
    wanted = set(strategies) | {"fp"}
    path = cache_dir() / CACHE_FILE
    host = _host_key()
    with file_lock(path.with_name(f".{path.name}.lock")):
        raw = read_json(path)
        table = raw if isinstance(raw, dict) else {}
        known = table.get(host, {}) if isinstance(table.get(host), dict) else {}
        keys = {s: _cost_key(model_name, dataset, "fp" if s == "ptq" else s, batch_size)
                for s in wanted}  # fmt: skip
        missing = sorted(
            {"fp" if s == "ptq" else s for s, k in keys.items()
             if recalibrate or not _valid(known.get(k))}
        )  # fmt: skip
        if missing:
            t0 = time.perf_counter()
            measured = calibrate(model_name, dataset, missing, batch_size)
            fp_key = _cost_key(model_name, dataset, "fp", batch_size)
            # A method timed later than `fp` is stored as its ratio to the `fp` steps timed
            # beside it, times the cached `fp`: load on the host at that moment slows both
            # alike, so it does not leak into the clock (kure timed under two busy runs read
            # 25 ms against fp's 2.9 ms from a quiet start).
            scale = 1.0
            if not recalibrate and _valid(known.get(fp_key)) and _valid(measured.get("fp")):
                scale = float(known[fp_key]) / measured["fp"]
            for s, t in measured.items():
                key = _cost_key(model_name, dataset, s, batch_size)
                if recalibrate or s in missing or not _valid(known.get(key)):
                    known[key] = t * scale  # `fp` is timed beside the others, kept only if new
            table[host] = known
            write_json(path, table)
            log.info("calibrated step costs %s in %.1f s", sorted(measured),
                     time.perf_counter() - t0)  # fmt: skip
    return {s: float(known[k]) for s, k in keys.items()}


def _valid(value: object) -> bool:
    return isinstance(value, (int, float)) and 0 < value < 1e4
