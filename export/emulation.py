"""Exported files in the boards' own instruction set, under user-mode emulation
(docs/export.md#runtimes).

A Raspberry Pi runs onnxruntime's aarch64 build, whose integer kernels pick dot-product
instructions (`asimddp`) at run time where the CPU has them: a Pi 5 (Cortex-A76) does, a Pi 4
(Cortex-A72) does not. An x86 machine checks both without a board: `qemu-aarch64-static -cpu
<cpu>` runs Debian's arm64 python3 from a sysroot with onnxruntime's aarch64 wheel, and the CPU
model decides the hardware capabilities (HWCAP) the runtime sees. qemu 7.2 leaves
/proc/cpuinfo the host's (x86), so onnxruntime takes its dot-product flag from HWCAP, as the
`-cpu` model sets it (`Emulated.dot_products_used` shows the kernels follow).
`scripts/arm64_runtime.sh` sets that up in `.arm64/`; `export/ort_runner.py` runs there
unchanged through `export.runtimes.run_in`.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .runtimes import RuntimeRun, run_in

ROOT = Path(__file__).resolve().parents[1] / ".arm64"
QEMU = "qemu-aarch64-static"
#: The CPUs of the boards, as qemu names them.
CPUS: dict[str, str] = {
    "cortex-a72": "Raspberry Pi 4 (BCM2711): no dot products",
    "cortex-a76": "Raspberry Pi 5 (BCM2712): dot products (asimddp)",
}
#: The variables of the host that never reach the emulated interpreter: the host's Python
#: settings and x86 libraries would be the guest's, and QEMU_* would override the command line.
_HOST_ONLY = ("PYTHON", "LD_", "QEMU_")
# HWCAP bits (Linux arch/arm64 uapi hwcap.h): AT_HWCAP=16 has ASIMDDP at bit 20, AT_HWCAP2=26
# has I8MM at bit 13.
_FEATURES_SNIPPET = """
import ctypes, json
libc = ctypes.CDLL(None)
libc.getauxval.restype = ctypes.c_ulong
hw, hw2 = libc.getauxval(16), libc.getauxval(26)
print(json.dumps({"asimddp": bool(hw >> 20 & 1), "i8mm": bool(hw2 >> 13 & 1)}))
"""


@dataclass(frozen=True)
class Emulated:
    """How to start the emulated interpreter: `command` (qemu, its CPU and sysroot, then the
    sysroot's python3) and the `env` it needs. `versions` is what the set-up script installed
    (qemu, Debian's python, onnxruntime, numpy)."""

    cpu: str
    command: list[str]
    env: dict[str, str]
    versions: dict[str, str] = field(default_factory=dict)

    def run(self, files: Sequence[Path], pixels: np.ndarray, timeout_s: float = 600) -> RuntimeRun:
        """`export.runtimes.run_in` under this emulation."""
        return run_in(self.command, files, pixels, env=self.env, timeout_s=timeout_s)

    def dot_products_used(
        self, file: Path, pixels: np.ndarray, timeout_s: float = 300
    ) -> tuple[RuntimeRun, int]:
        """Run `file` with qemu logging every block it translates, and count the dot-product
        instructions among them: > 0 means onnxruntime picked its dot-product kernels for
        this CPU (a Pi 5's path), 0 its plain NEON ones (a Pi 4's)."""
        with tempfile.TemporaryDirectory(prefix="bitfleet-qemu-") as tmp:
            log = Path(tmp) / "in_asm.log"
            traced = [self.command[0], "-d", "in_asm", "-D", str(log), *self.command[1:]]
            run = run_in(traced, [file], pixels, env=self.env, timeout_s=timeout_s)
            return run, dot_instructions(log.read_text(errors="replace"))

    def features(self, timeout_s: float = 120) -> dict[str, bool]:
        """The dot-product flags the emulated CPU shows (its HWCAP), which onnxruntime reads to
        choose its int8 kernels: proof that a cortex-a72 run is a Pi 4's, not a Pi 5's."""
        done = subprocess.run(
            [*self.command, "-c", _FEATURES_SNIPPET],
            capture_output=True,
            text=True,
            timeout=timeout_s,
            env=self.env,
            check=True,
        )
        return json.loads(done.stdout)


# AArch64 SDOT/UDOT encodings (vector, and by element), 32-bit element size: (mask, value).
_DOT_ENCODINGS = (
    (0x9FE0FC00, 0x0E809400),  # sdot / udot (Q, bit 30, and U, bit 29, masked out)
    (0x9FC0F400, 0x0F80E000),  # sdot / udot by element
)
_TRACED = re.compile(r"^0x[0-9a-f]+:\s+([0-9a-f]{8})\s", re.MULTILINE)


def dot_instructions(trace: str) -> int:
    """How many SDOT/UDOT instructions a qemu `-d in_asm` log shows translated (once per
    translated block that holds them): read from the instruction words, not from qemu's
    disassembly, which in qemu 7.2 does not know them."""
    words = (int(w, 16) for w in _TRACED.findall(trace))
    return sum(1 for w in words if any(w & mask == value for mask, value in _DOT_ENCODINGS))


def missing(root: Path = ROOT) -> str | None:
    """Why the emulated runtime cannot run (None when it can)."""
    if shutil.which(QEMU) is None:
        return f"{QEMU} is missing: run scripts/arm64_runtime.sh (Debian's qemu-user-static)"
    spec = root / "runtime.json"
    if not spec.is_file():
        return f"{root} holds no arm64 runtime: run scripts/arm64_runtime.sh"
    try:
        python = json.loads(spec.read_text())["python"]
    except (ValueError, KeyError) as exc:
        return f"{spec}: not what scripts/arm64_runtime.sh writes ({exc})"
    if not (root / "sysroot" / python.lstrip("/")).is_file():
        return f"{root / 'sysroot'} has no {python}: run scripts/arm64_runtime.sh"
    return None


def available(root: Path = ROOT) -> bool:
    """Whether `scripts/arm64_runtime.sh` has set up `root` and qemu is on PATH."""
    return missing(root) is None


def arm64_command(
    cpu: str, root: Path = ROOT, base_env: Mapping[str, str] | None = None
) -> Emulated:
    """The emulated interpreter as CPU `cpu` (a qemu name, e.g. one of `CPUS`).

    qemu's `-L` makes the sysroot the guest's `/` for files that exist there (the loader,
    libraries, stdlib), so the interpreter runs with `PYTHONHOME=/usr` as on a board, while the
    repository and temporary files, which the sysroot lacks, are the host's. The wheels come
    through PYTHONPATH; the user site is off and the sysroot holds empty dist-packages folders,
    so the host's x86 packages never load.
    """
    reason = missing(root)
    if reason:
        raise FileNotFoundError(reason)
    runtime = json.loads((root / "runtime.json").read_text())
    sysroot = root / "sysroot"
    qemu = shutil.which(QEMU)
    assert qemu is not None  # missing() checked
    env = {
        k: v
        for k, v in (os.environ if base_env is None else base_env).items()
        if not k.startswith(_HOST_ONLY)
    }
    env.update(
        PYTHONHOME="/usr",
        PYTHONPATH=str(root / runtime.get("site_packages", "site-packages")),
        PYTHONNOUSERSITE="1",
        # Bytecode in a folder of its own: a __pycache__ missing from the sysroot would be
        # the host's /usr/lib/python3.X/__pycache__ through -L, read and written.
        PYTHONPYCACHEPREFIX=str(root / "pycache"),
    )
    command = [qemu, "-cpu", cpu, "-L", str(sysroot), str(sysroot / runtime["python"].lstrip("/"))]
    versions = {k: str(v) for k, v in runtime.items() if k not in ("python", "site_packages")}
    return Emulated(cpu, command, env, versions)
