"""Every export variant in onnxruntime's aarch64 build, under user-mode emulation, as a Pi 4
(cortex-a72: no dot products) and a Pi 5 (cortex-a76: asimddp) (docs/export.md#runtimes).

`scripts/arm64_runtime.sh` sets up `.arm64/` (Debian's arm64 python3 in a sysroot,
onnxruntime's and numpy's aarch64 wheels, the host's qemu-user-static); `scripts/install.sh`
runs it, so under CI=true a missing runtime fails instead of skipping. The files run through
`export/ort_runner.py` as in tests/e2e/test_runtimes.py.

The variants with 8-bit activations are exported twice, with every layer in float and with
every layer on integer kernels, rather than as the exporter's "auto" choice, which times both
on the exporting machine and so differs from one machine (or one load) to the next; the
integer-kernel files are the ones whose kernels differ with and without dot products.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

from bitfleet.runtime_facts import OPSET_INT2
from export.bench_arm64 import KERNELS, Variants, export_variants, newest_opset, opset_probes
from export.emulation import CPUS, ROOT, arm64_command, missing
from export.runtimes import RuntimeRun, agreement, run_in
from tests.conftest import missing_part

AGREE = 0.995
#: Integer-kernel files: 8-bit activations cost PyTorch agreement on every runtime alike
#: (0.995 and 0.997 measured on 1000 images, x86 and both emulated CPUs, the same images);
#: what the emulation checks is that the boards' build computes what x86's does.
AGREE_INTEGER_PYTORCH = 0.99
AGREE_WITH_HOST = 0.999
IMAGES = 1000
INT2_OPSET25 = f"int2_packed-opset{OPSET_INT2}"


def _version(text: str) -> tuple[int, ...]:
    return tuple(int(p) for p in text.split(".")[:2])


@pytest.fixture(scope="module")
def arm64() -> Path:
    why = missing(ROOT)
    if why:
        missing_part(why)
    return ROOT


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> Variants:
    """LeNet-5 trained briefly on real Fashion-MNIST, every variant for opset 25 and 21 (see
    the module docstring for the kernels), PyTorch's logits on 1000 test images."""
    return export_variants(tmp_path_factory.mktemp("variants"), IMAGES, ("float", "integer"))


@pytest.fixture(scope="module")
def host(exported: Variants) -> RuntimeRun:
    """The same files in this environment's onnxruntime (x86), for the integer-kernel files."""
    return run_in(sys.executable, list(exported.files.values()), exported.pixels)


@pytest.fixture(scope="module")
def probes(tmp_path_factory: pytest.TempPathFactory) -> dict[int, Path]:
    return opset_probes(tmp_path_factory.mktemp("probes"))


@pytest.mark.parametrize("cpu", list(CPUS))
def test_every_variant_runs_on_the_boards_instruction_set(
    cpu: str, arm64: Path, exported: Variants, host: RuntimeRun, probes: dict[int, Path]
) -> None:
    emulated = arm64_command(cpu, arm64)
    features = emulated.features()
    assert features["asimddp"] == (cpu == "cortex-a76"), features
    run = emulated.run(list(exported.files.values()), exported.pixels)
    newest = newest_opset(emulated, probes)
    print(f"\n{cpu}: onnxruntime {run.onnxruntime} (newest opset {newest}), {emulated.versions}")
    assert run.onnxruntime == emulated.versions["onnxruntime"]

    refused = {name for name, path in exported.files.items() if str(path) in run.errors}
    # What a runtime refuses is exactly what is stamped newer than it loads; for onnxruntime
    # below 1.23 (1.22 loads up to 22) that is the opset-25 INT2 file alone.
    assert refused == {n for n, opset in exported.opsets.items() if opset > newest}, run.errors
    if newest < OPSET_INT2:
        assert refused == {INT2_OPSET25}, run.errors
    for name in refused:
        error = run.errors[str(exported.files[name])]
        assert "opset" in error.lower(), error

    integer = KERNELS["integer"]
    for name, path in exported.files.items():
        if name in refused:
            continue
        logits = run.logits[str(path)]
        agree = agreement(logits, exported.reference[name])
        same_as_host = agreement(logits, host.logits[str(path)])
        print(f"  {name}: {agree:.4f} with PyTorch, {same_as_host:.4f} with x86")
        if integer in name:
            assert agree >= AGREE_INTEGER_PYTORCH, (name, agree)
            assert same_as_host >= AGREE_WITH_HOST, (name, same_as_host)
        else:
            assert agree >= AGREE, (name, agree)


@pytest.mark.parametrize("cpu", list(CPUS))
def test_dot_product_kernels_run_only_where_the_cpu_has_them(
    cpu: str, arm64: Path, exported: Variants
) -> None:
    """A Pi 5's runtime picks onnxruntime's dot-product int8 kernels, a Pi 4's its NEON ones:
    counted in qemu's log of the instructions it translates."""
    name = f"int8_qdq{KERNELS['integer']}-opset21"
    x = np.ascontiguousarray(exported.pixels[:64])
    run, dots = arm64_command(cpu, arm64).dot_products_used(exported.files[name], x)
    assert not run.errors, run.errors
    print(f"\n{cpu}: {dots} dot-product instructions translated for {name}")
    if cpu == "cortex-a76":
        assert dots > 0
    else:
        assert dots == 0
