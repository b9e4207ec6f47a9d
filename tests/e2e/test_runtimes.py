"""Every export variant in the oldest onnxruntime `pyproject.toml` admits and in the newest
(docs/export.md#runtimes): each loads where its opsets allow, and agrees with PyTorch.

The oldest runs in `.venv-ort-oldest`, which `scripts/install.sh` sets up beside `.venv`
(numpy and onnxruntime only; the files run through `export/ort_runner.py`). The files are
`export.bench_arm64.export_variants`'s, with 8-bit-activation variants once in float and once
on integer kernels (see tests/e2e/test_arm64.py for why not the machine-dependent "auto").
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest

from bitfleet.runtime_facts import OPSET_INT2
from export.bench_arm64 import KERNELS, Variants, export_variants
from export.runtimes import agreement, run_in
from tests.conftest import missing_part
from tests.e2e.test_arm64 import AGREE, AGREE_INTEGER_PYTORCH

ROOT = Path(__file__).resolve().parents[2]
OLDEST = ROOT / ".venv-ort-oldest" / "bin" / "python"


def lowest_admitted() -> str:
    """The onnxruntime lower bound in pyproject.toml, e.g. "1.20"."""
    text = (ROOT / "pyproject.toml").read_text()
    found = re.search(r'"onnxruntime>=([0-9.]+)"', text)
    assert found, "pyproject.toml names no onnxruntime lower bound"
    return found.group(1)


@pytest.fixture(scope="module")
def oldest() -> Path:
    if not OLDEST.exists():
        missing_part(f"{OLDEST} is missing: run scripts/install.sh")
    return OLDEST


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> Variants:
    return export_variants(tmp_path_factory.mktemp("variants"), 1000, ("float", "integer"))


def _agreements(python: str | Path, exported: Variants) -> tuple[str, dict[str, float | str]]:
    run = run_in(python, list(exported.files.values()), exported.pixels)
    found: dict[str, float | str] = {}
    for name, path in exported.files.items():
        logits = run.logits.get(str(path))
        found[name] = (
            run.errors[str(path)] if logits is None else agreement(logits, exported.reference[name])
        )
    return run.onnxruntime, found


def _check(found: dict[str, float | str], refused: set[str]) -> None:
    for name, agree in found.items():
        if name in refused:
            # INT2 needs opset 25, which this runtime refuses at load: why boards say theirs.
            assert isinstance(agree, str) and "opset" in agree.lower(), agree
            continue
        need = AGREE_INTEGER_PYTORCH if KERNELS["integer"] in name else AGREE
        assert isinstance(agree, float) and agree >= need, (name, agree)


def test_every_variant_runs_on_the_oldest_admitted_onnxruntime(
    oldest: Path, exported: Variants
) -> None:
    version, found = _agreements(oldest, exported)
    print(f"\nonnxruntime {version}: {found}")
    assert version.startswith(lowest_admitted() + "."), (version, lowest_admitted())
    _check(found, {f"int2_packed-opset{OPSET_INT2}"})


def test_every_variant_runs_on_the_newest_onnxruntime(exported: Variants) -> None:
    version, found = _agreements(sys.executable, exported)
    print(f"\nonnxruntime {version}: {found}")
    _check(found, set())
