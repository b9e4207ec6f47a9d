"""Every export variant in the oldest onnxruntime `pyproject.toml` admits and in the newest
(docs/export.md#runtimes): each loads where its opsets allow, and agrees with PyTorch.

The oldest runs in `.venv-ort-oldest`, which `scripts/install.sh` sets up beside `.venv`
(numpy and onnxruntime only; the files run through `export/ort_runner.py`).
"""

from __future__ import annotations

import copy
import os
import re
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from bitfleet.data import load_dataset
from bitfleet.models import create_model
from bitfleet.quant import PTQ, LocalMethod
from bitfleet.runtime_facts import OPSET_BASE, OPSET_INT2
from bitfleet.training import train
from export.api import export_model
from export.bench import VARIANTS
from export.runtimes import agreement, run_in

ROOT = Path(__file__).resolve().parents[2]
OLDEST = ROOT / ".venv-ort-oldest" / "bin" / "python"
AGREE = 0.995


def lowest_admitted() -> str:
    """The onnxruntime lower bound in pyproject.toml, e.g. "1.20"."""
    text = (ROOT / "pyproject.toml").read_text()
    found = re.search(r'"onnxruntime>=([0-9.]+)"', text)
    assert found, "pyproject.toml names no onnxruntime lower bound"
    return found.group(1)


@pytest.fixture(scope="module")
def oldest() -> Path:
    if not OLDEST.exists():
        why = f"{OLDEST} is missing: run scripts/install.sh"
        if os.environ.get("CI") == "true":
            pytest.fail(why)
        pytest.skip(why)
    return OLDEST


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, np.ndarray]]:
    """LeNet-5 trained briefly on real Fashion-MNIST, every variant exported for the newest
    opsets and for opset 21: name -> (file, PyTorch's logits on 1000 test images)."""
    data = load_dataset("fashion-mnist")
    torch.manual_seed(0)
    model = create_model("lenet5")
    train(model, data.train_x[:4000], data.train_y[:4000], LocalMethod(), epochs=1, seed=0)
    calib = data.train_x[:128].float().div(255).numpy()
    x = data.test_x[:1000].float().div(255).numpy()
    out = tmp_path_factory.mktemp("variants")
    files: dict[str, tuple[Path, np.ndarray]] = {}
    for opset in (OPSET_INT2, OPSET_BASE):
        for variant, (bits, storage, acts) in VARIANTS.items():
            q = copy.deepcopy(model)
            method = PTQ(scale_method="mse")
            method.prepare(q)
            method.deploy(q, bits)
            name = f"{variant}-opset{opset}"
            result = export_model(
                q, out / f"{name}.onnx", (1, 28, 28), storage=storage, activations=acts,
                calib=calib, max_opset=opset,
            )  # fmt: skip
            with torch.no_grad():
                files[name] = (result.path, q.eval()(torch.from_numpy(x)).numpy())
    files["pixels"] = (out, x)
    return files


def _agreements(python: str | Path, exported: dict) -> tuple[str, dict[str, float | str]]:
    variants = {k: v for k, v in exported.items() if k != "pixels"}
    run = run_in(python, [path for path, _ in variants.values()], exported["pixels"][1])
    found: dict[str, float | str] = {}
    for name, (path, reference) in variants.items():
        logits = run.logits.get(str(path))
        found[name] = run.errors[str(path)] if logits is None else agreement(logits, reference)
    return run.onnxruntime, found


def test_every_variant_runs_on_the_oldest_admitted_onnxruntime(oldest: Path, exported) -> None:
    version, found = _agreements(oldest, exported)
    print(f"\nonnxruntime {version}: {found}")
    assert version.startswith(lowest_admitted() + "."), (version, lowest_admitted())
    for name, agree in found.items():
        if name == f"int2_packed-opset{OPSET_INT2}":
            # INT2 needs opset 25, which this runtime refuses at load: why boards say theirs.
            assert isinstance(agree, str) and "opset" in agree.lower(), agree
        else:
            assert isinstance(agree, float) and agree >= AGREE, (name, agree)


def test_every_variant_runs_on_the_newest_onnxruntime(exported) -> None:
    version, found = _agreements(sys.executable, exported)
    print(f"\nonnxruntime {version}: {found}")
    for name, agree in found.items():
        assert isinstance(agree, float) and agree >= AGREE, (name, agree)
