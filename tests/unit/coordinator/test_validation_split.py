"""The validation split: carved from the training images, disjoint from every device's data,
and what the coordinator's decisions read, while the test split only reports
(docs/round.md#validation)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from bitfleet.data import ImageData, carve_validation
from bitfleet.data.specs import DATASET_SPECS
from bitfleet.data.validation import validation_indices
from coordinator.config import job_config_from_dict
from coordinator.evaluation import Evaluator, calibration_images
from coordinator.global_model import GlobalModel
from coordinator.results import RoundReport
from coordinator.state import StateStore

SPEC = DATASET_SPECS["fashion-mnist"]


def _data(n_train: int = 200, n_test: int = 50) -> ImageData:
    g = torch.Generator().manual_seed(1)
    x = torch.randint(0, 255, (n_train, 1, 28, 28), dtype=torch.uint8, generator=g)
    y = torch.randint(0, 10, (n_train,), generator=g)
    tx = torch.randint(0, 255, (n_test, 1, 28, 28), dtype=torch.uint8, generator=g)
    ty = torch.randint(0, 10, (n_test,), generator=g)
    return ImageData(x, y, tx, ty, SPEC)


def test_the_carve_is_disjoint_deterministic_and_sized() -> None:
    keep, held = validation_indices(200, 0.1)
    assert len(held) == 20 and len(keep) == 180
    assert set(keep.tolist()).isdisjoint(held.tolist())
    assert set(keep.tolist()) | set(held.tolist()) == set(range(200))
    again = validation_indices(200, 0.1)
    assert torch.equal(again[0], keep) and torch.equal(again[1], held)

    data = _data()
    carved = carve_validation(data, 0.1)
    assert torch.equal(carved.val_x, data.train_x[held])
    assert torch.equal(carved.train_y, data.train_y[keep])
    assert carve_validation(carved, 0.1) is carved  # already carved: as it is


@pytest.mark.parametrize("fraction", [0, -0.1, 0.51, 1.0, float("nan"), "0.1", True])
def test_bad_fractions_are_refused(fraction: object) -> None:
    with pytest.raises(ValueError, match="validation fraction must be in"):
        carve_validation(_data(), fraction)  # type: ignore[arg-type]


def test_a_second_carve_at_another_fraction_is_refused() -> None:
    with pytest.raises(ValueError, match="already hold 0.1 back"):
        carve_validation(carve_validation(_data(), 0.1), 0.2)
    with pytest.raises(ValueError, match="cannot hold"):
        carve_validation(_data(n_train=1), 0.5)


def test_the_job_file_takes_the_fraction_and_checks_it(tmp_path: Path) -> None:
    assert job_config_from_dict({}, source="t").data.validation_fraction == 0.1
    cfg = job_config_from_dict({"data": {"validation_fraction": 0.2}}, source="t")
    assert cfg.data.validation_fraction == 0.2
    with pytest.raises(ValueError, match="validation_fraction"):
        job_config_from_dict({"data": {"validation_fraction": 0.9}}, source="t")


def test_decisions_read_validation_and_reports_read_test(tmp_path: Path) -> None:
    """A model that is right on every validation image and wrong on every test image: the
    evaluator's default (what fine stage and deploy loss use) sees 1.0, the report 0.0."""
    cfg = job_config_from_dict({"model": {"name": "lenet5"}}, source="t")
    model = GlobalModel(cfg, SPEC)
    data = carve_validation(_data(), 0.1)
    with torch.no_grad():
        logits = model.module(data.val_x.float().div(255))
    data.val_y.copy_(logits.argmax(1))
    test_logits = model.module(data.test_x.float().div(255)).detach()
    data.test_y.copy_((test_logits.argmax(1) + 1) % 10)
    ev = Evaluator(cfg, model, StateStore(tmp_path / "s.db"), lambda: data)
    assert ev.accuracy(model.state, 32) == 1.0
    assert ev.accuracy(model.state, 32, split="test") == 0.0
    held = ev.held_out()
    assert len(held.validation[1]) == 20 and len(held.test[1]) == 50
    assert torch.equal(calibration_images(data), data.val_x[:256])
    with pytest.raises(ValueError, match="unknown split"):
        ev.split("train")


def test_a_rounds_scores_are_each_widths_own(tmp_path: Path) -> None:
    """Float, deployed and validation scores of one round, each as if evaluated alone (the
    evaluator re-widths one model in place: an order slip once reported 2-bit as float)."""
    cfg = job_config_from_dict({"deploy": {"bits": [2]}}, source="t")
    model = GlobalModel(cfg, SPEC)
    data = carve_validation(_data(n_train=400, n_test=200), 0.25)
    store = StateStore(tmp_path / "s.db")
    ev = Evaluator(cfg, model, store, lambda: data)
    with torch.no_grad():  # a model far from its 2-bit grid: float and 2-bit scores differ
        model.module.classifier[4].weight.mul_(3.0).add_(0.05)
    model.load(model.module.state_dict())
    report = RoundReport(0, [], [], [], 0.0, 0.0, 0.0, 0.0, 0.0)
    ev.start(report, model.state)
    ev.join()
    assert report.acc_fp32 == ev.accuracy(model.state, 32, split="test")
    assert report.acc_deploy["2"] == ev.accuracy(model.state, 2, split="test")
    assert report.val_deploy == {
        "32": ev.accuracy(model.state, 32),
        "2": ev.accuracy(model.state, 2),
    }
    logits = [model.deployed(model.state, b)(data.test_x.float() / 255) for b in (32, 2)]
    assert not torch.equal(logits[0], logits[1])
