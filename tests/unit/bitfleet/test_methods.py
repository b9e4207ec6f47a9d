"""Local training methods and the shared training loop, on tiny generated data."""

from __future__ import annotations

import random

import pytest
import torch
from torch import nn

from bitfleet.models import create_model
from bitfleet.quant import (
    APQN,
    KURE,
    METHODS,
    MQAT,
    PTQ,
    QAT,
    LocalMethod,
    kurtosis,
    make_method,
    quant_layers,
    weight_scale,
)
from bitfleet.training import evaluate, train
from tests.blobs import blobs


@pytest.fixture(scope="module")
def data() -> tuple[torch.Tensor, torch.Tensor]:
    return blobs()


def test_registry_names_every_method() -> None:
    assert set(METHODS) == {"fp", "ptq", "qat", "mqat", "apqn", "kure", "mpq"}
    assert isinstance(make_method("qat", bits=2), QAT)
    with pytest.raises(ValueError, match="known"):
        make_method("sgd-magic")


@pytest.mark.parametrize(
    "method",
    [
        LocalMethod(),
        PTQ(),
        QAT(bits=4),
        QAT(bits=2, step="learned"),
        QAT(bits=3, step="dynamic", scale_method="max"),
        MQAT(resample="step"),
        APQN(bits=4),
        KURE(),
    ],
    ids=lambda m: f"{m.name}-{getattr(m, 'step', '')}",
)
def test_every_method_learns_a_separable_task(method: LocalMethod, data) -> None:
    torch.manual_seed(0)
    x, y = data
    model = create_model("lenet5", num_classes=3)
    train(model, x, y, method, epochs=3, batch_size=32, lr=3e-3, seed=0)
    bits = getattr(method, "bits", 4)
    assert evaluate(method.deploy(model, bits), x, y) > 0.9


def test_qat_frozen_step_is_fixed_during_a_round_and_kept_for_deploy(data) -> None:
    x, y = data
    model = create_model("lenet5", num_classes=3)
    method = QAT(bits=2)
    train(model, x, y, method, epochs=1, batch_size=64, seed=0)
    layer = quant_layers(model)["classifier.0"]
    frozen = layer.frozen_steps[2].clone()
    assert not torch.allclose(frozen, weight_scale(layer.weight, 2, "mse"))  # weights moved
    method.deploy(model, 2)
    assert torch.equal(layer.step(), frozen)
    method.begin_round(model, random.Random(0))  # a new round re-calibrates
    torch.testing.assert_close(layer.frozen_steps[2], weight_scale(layer.weight, 2, "mse"))


def test_learned_steps_move_and_get_gradients(data) -> None:
    x, y = data
    model = create_model("lenet5", num_classes=3)
    method = QAT(bits=2, step="learned")
    method.prepare(model)
    before = {n: m.log_steps["2"].detach().clone() for n, m in quant_layers(model).items()}
    train(model, x, y, method, epochs=1, batch_size=64, seed=0)
    moved = [not torch.equal(m.log_steps["2"], before[n]) for n, m in quant_layers(model).items()]
    assert all(moved)


def test_mqat_samples_from_its_bit_set() -> None:
    model = create_model("lenet5", num_classes=3)
    method = MQAT(bit_set=(2, 6), resample="step")
    method.prepare(model)
    seen = set()
    rng = random.Random(0)
    for _ in range(50):
        method.before_step(model, rng)
        seen |= {m.bits for m in quant_layers(model).values()}
    assert seen == {2, 6}
    with pytest.raises(ValueError, match="resample"):
        MQAT(resample="epoch").prepare(create_model("lenet5"))


def test_apqn_noise_is_bounded_by_half_a_step_and_off_in_eval() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(50, 20))
    APQN(bits=3, scale_method="max").prepare(model)
    layer = quant_layers(model)["0"]
    noisy = layer.quantized_weight()
    half = layer.step().reshape(-1, 1) / 2
    assert not torch.equal(noisy, layer.weight)
    assert torch.all((noisy - layer.weight).abs() <= half + 1e-7)
    layer.eval()
    assert torch.equal(layer.quantized_weight(), layer.weight)


def test_kure_pulls_kurtosis_towards_uniform() -> None:
    torch.manual_seed(0)
    assert abs(float(kurtosis(torch.rand(100_000))) - 1.8) < 0.02
    assert abs(float(kurtosis(torch.randn(100_000))) - 3.0) < 0.1
    model = nn.Sequential(nn.Linear(64, 64))
    method = KURE(strength=1.0)
    method.prepare(model)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    start = float(method.regularizer(model).detach())
    for _ in range(100):
        opt.zero_grad()
        method.regularizer(model).backward()
        opt.step()
    assert float(method.regularizer(model).detach()) < start / 10


def test_training_rejects_bad_arguments(data) -> None:
    x, y = data
    model = create_model("lenet5", num_classes=3)
    with pytest.raises(ValueError, match="matching"):
        train(model, x, y[:10], LocalMethod())
    with pytest.raises(ValueError, match="positive"):
        train(model, x, y, LocalMethod(), epochs=0)
    with pytest.raises(ValueError, match="optimizer"):
        train(model, x, y, LocalMethod(), optimizer="lbfgs")
    with pytest.raises(ValueError, match="step mode"):
        QAT(step="sometimes").prepare(model)
