"""What machine a benchmark ran on: every benchmark states it beside its numbers.

See docs/architecture.md#benchmarks-and-their-json.
"""

from __future__ import annotations

import os
import platform
from importlib import metadata
from pathlib import Path

import psutil

from .runtime_facts import KERNEL_FLAGS as _INT_DOT_FLAGS


def cpu_flags() -> set[str]:
    """The CPU's feature flags from /proc/cpuinfo (`flags` on x86, `Features` on Arm)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    flags: set[str] = set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            flags.update(value.split())
    return flags


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def describe_machine() -> dict[str, object]:
    """Cores, architecture, integer dot-product support and library versions."""
    flags = cpu_flags()
    return {
        "arch": platform.machine(),
        "python": platform.python_version(),
        "logical_cores": os.cpu_count(),
        "physical_cores": psutil.cpu_count(logical=False),
        "memory_gib": round(psutil.virtual_memory().total / 2**30, 1),
        "int_dot_product": sorted(f for f in _INT_DOT_FLAGS if f in flags),
        "torch": _version("torch"),
        "torch_threads": _torch_threads(),
        "onnxruntime": _version("onnxruntime"),
    }


def _torch_threads() -> int:
    import torch

    return torch.get_num_threads()


def machine_line(info: dict[str, object]) -> str:
    """One line for the top of a benchmark table."""
    dot = ",".join(info["int_dot_product"]) or "none"  # type: ignore[arg-type]
    return (
        f"{info['arch']}, {info['logical_cores']} cores, {info['memory_gib']} GiB, "
        f"int dot-product: {dot}; torch {info['torch']} ({info['torch_threads']} threads), "
        f"onnxruntime {info['onnxruntime']}"
    )
