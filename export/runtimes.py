"""Exported files in other onnxruntime versions than this environment's (docs/export.md#runtimes).

Boards run the onnxruntime their image ships (JetPack, a distribution package), often older
than the newest; `pyproject.toml` admits everything from its lower bound up. `run_in` runs
files in another interpreter holding another version (`export/ort_runner.py`, which needs only
numpy and onnxruntime there) and `agreement` compares their top-1 with PyTorch's.
"""

from __future__ import annotations

import json
import subprocess
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

RUNNER = Path(__file__).with_name("ort_runner.py")


@dataclass
class RuntimeRun:
    """What one onnxruntime made of some files: its version, and per file logits or an error."""

    onnxruntime: str
    logits: dict[str, np.ndarray] = field(default_factory=dict)
    errors: dict[str, str] = field(default_factory=dict)


def run_in(
    python: str | Path | Sequence[str],
    files: Sequence[Path],
    pixels: np.ndarray,
    env: Mapping[str, str] | None = None,
    timeout_s: float = 600,
) -> RuntimeRun:
    """Run `files` on `pixels` (N, C, H, W float32 in [0, 1]) under the interpreter `python`:
    a path, or a command that starts one (an emulator and the interpreter it runs)."""
    prefix = [str(python)] if isinstance(python, (str, Path)) else list(python)
    with tempfile.TemporaryDirectory(prefix="bitfleet-ort-") as tmp:
        inputs, out = Path(tmp) / "in.npz", Path(tmp) / "out.npz"
        np.savez(inputs, pixels=pixels.astype(np.float32))
        cmd = [*prefix, str(RUNNER), str(inputs), str(out), *map(str, files)]
        done = subprocess.run(
            cmd,
            capture_output=True,
            text=True,
            timeout=timeout_s,
            env=None if env is None else dict(env),
        )
        if done.returncode != 0 or not out.exists():
            raise RuntimeError(f"{python} could not run {RUNNER.name}: {done.stderr[-1000:]}")
        with np.load(out) as result:
            report = json.loads(str(result["report"]))
            run = RuntimeRun(report["onnxruntime"])
            for i, path in enumerate(files):
                status = report["models"][str(path)]
                if status == "ok":
                    run.logits[str(path)] = result[f"logits_{i}"]
                else:
                    run.errors[str(path)] = status
    return run


def agreement(logits: np.ndarray, reference: np.ndarray) -> float:
    """Share of samples whose top-1 class is PyTorch's."""
    return float((logits.argmax(1) == reference.argmax(1)).mean())
