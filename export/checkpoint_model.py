"""A checkpoint turned into a deployed, quantization-aware model ready for `export_model`."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file
from torch import nn

from bitfleet.assignment import Assignment
from bitfleet.data import (
    DATASET_SPECS,
    DEFAULT_VALIDATION_FRACTION,
    carve_validation,
    load_dataset,
)
from bitfleet.data.validation import calibration_images
from bitfleet.models import create_model_for
from bitfleet.profiles import DeviceProfile, load_profile
from bitfleet.quant import check_bits
from bitfleet.quant.activation import check_act_bits

from .api import ExportResult, export_model

MODEL_PREFIX = "model."


def read_state(checkpoint: Path) -> dict[str, torch.Tensor]:
    """Model tensors from a coordinator checkpoint (file or state dir) or a plain state dict."""
    if checkpoint.is_dir():
        latest = checkpoint / "checkpoints" / "LATEST"
        if not latest.is_file():
            raise FileNotFoundError(f"{checkpoint} holds no checkpoints/LATEST")
        checkpoint = latest.parent / latest.read_text().strip()
    if not checkpoint.is_file():
        raise FileNotFoundError(f"checkpoint {checkpoint} does not exist")
    state = load_file(str(checkpoint))
    if any(k.startswith(MODEL_PREFIX) for k in state):
        return {k[len(MODEL_PREFIX) :]: v for k, v in state.items() if k.startswith(MODEL_PREFIX)}
    return state


def device_defaults(board: DeviceProfile) -> tuple[int, str]:
    """(bits, storage) a board wants: its deploy width (`DeviceProfile.deploy_width`, the one
    rule the coordinator uses too) in the storage its profile prefers."""
    return board.deploy_width(), board.preferred_storage


@dataclass
class ExportJob:
    model: nn.Module
    dataset: str
    bits: int
    storage: str
    activations: bool
    strategy: str
    data_dir: str | None = None

    def _data(self):  # noqa: ANN202 - ImageData, loaded only when needed
        """The data set, its validation split carved as the coordinator carves it."""
        data = load_dataset(self.dataset, data_dir=self.data_dir)
        return carve_validation(data, DEFAULT_VALIDATION_FRACTION)

    act_bits: int | None = None
    """The width the model's layer inputs are quantized at (its own grids, calibrated on the
    validation images); None: float, or 8-bit ranges from `export` where `activations`."""

    def test_set(self, n: int) -> tuple[np.ndarray, np.ndarray]:
        data = self._data()
        return data.test_x[:n].float().div(255).numpy(), data.test_y[:n].numpy()

    def export(self, path: Path, calib: int = 256) -> ExportResult:
        spec = DATASET_SPECS[self.dataset]
        samples = None
        if self.activations:
            samples = calibration_images(self._data(), calib).float().div(255).numpy()
        return export_model(
            self.model,
            path,
            (spec.in_channels, spec.image_size, spec.image_size),
            storage=self.storage,
            activations=self.activations,
            calib=samples,
            metadata={"strategy": self.strategy, "class_labels": list(spec.class_names)},
        )

    def describe(self) -> str:
        if self.act_bits is not None:
            acts = f"{self.act_bits}-bit activations (the model's own grids)"
        else:
            acts = "8-bit activations" if self.activations else "float activations"
        return f"{self.bits}-bit weights, {self.storage} storage, {acts}"


def load_for_export(
    checkpoint: Path,
    model_name: str,
    dataset: str,
    *,
    strategy: str = "ptq",
    bits: int | None = None,
    device: str | None = None,
    per_layer_bits: str | None = None,
    storage: str | None = None,
    activations: str | None = None,
    data_dir: str | None = None,
    act_bits: int | None = None,
) -> ExportJob:
    """Build the model, load the checkpoint into it, and deploy it at the requested bits, with
    `act_bits` activations where given (a model trained through quantized activations: QAT or
    MQAT with `[allocation] act_bits`), their ranges calibrated on the validation images the
    coordinator calibrates on too (`bitfleet.data.validation.calibration_images`)."""
    if dataset not in DATASET_SPECS:
        raise ValueError(f"unknown data set {dataset!r}; known: {sorted(DATASET_SPECS)}")
    dev_bits, dev_storage = device_defaults(load_profile(device)) if device else (8, "int8")
    bits = check_bits(bits if bits is not None else dev_bits)
    if bits == 32:
        raise ValueError("bits must be in 2..8 for a quantized export (32 is float)")
    storage = storage or dev_storage
    acts = (activations or ("8" if storage == "int8" else "float")) == "8"
    spec = DATASET_SPECS[dataset]
    model = create_model_for(model_name, spec)
    method = Assignment(strategy, bits).method()
    method.prepare(model)
    state = read_state(Path(checkpoint))
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        raise ValueError(
            f"checkpoint {checkpoint} does not fit {model_name} on {dataset}: "
            f"{str(exc).splitlines()[0]} (another architecture? pass --model)"
        ) from None
    widths: int | dict[str, int] = bits
    if per_layer_bits:
        widths = {k: int(v) for k, v in json.loads(Path(per_layer_bits).read_text()).items()}
    job = ExportJob(model, dataset, bits, storage, acts, strategy, data_dir, act_bits)
    calib = None
    if act_bits is not None:
        check_act_bits(act_bits)
        calib = calibration_images(job._data())
    method.deploy(model, widths, act_bits=act_bits, calib=calib)
    job.model = model.eval()
    return job
