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
    act_quantizers,
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


ACT_METHODS = [
    lambda a: LocalMethod(act_bits=a),
    lambda a: PTQ(act_bits=a),
    lambda a: QAT(bits=2, act_bits=a),
    lambda a: MQAT(bit_set=(2, 4), act_bit_set=None if a is None else (2, 3)),
    lambda a: APQN(bits=2, act_bits=a),
    lambda a: KURE(act_bits=a),
    lambda a: make_method("mpq", bits=2, act_bits=a),
]


def test_state_dict_keys_do_not_depend_on_method_or_act_bits(data) -> None:
    """Devices on different methods average into one model: the same keys must travel."""
    x, y = data
    expected = set(create_model("lenet5", num_classes=3).state_dict())
    for make in ACT_METHODS:
        for act_bits in (None, 2):
            model = create_model("lenet5", num_classes=3)
            method = make(act_bits)
            train(model, x[:64], y[:64], method, epochs=1, batch_size=32, seed=0)
            assert set(model.state_dict()) == expected, (method.name, act_bits)
            method.deploy(model, 4, act_bits=act_bits, calib=x[:32])
            assert set(model.state_dict()) == expected, (method.name, act_bits)


@pytest.mark.parametrize("make", ACT_METHODS, ids=lambda m: m(2).name)
def test_every_method_trains_with_two_bit_activations(make, data) -> None:
    torch.manual_seed(0)
    x, y = data
    model = create_model("lenet5", num_classes=3)
    method = make(2)
    loss = train(model, x[:96], y[:96], method, epochs=2, batch_size=32, lr=3e-3, seed=0)
    assert loss == loss and loss < 5  # finite
    if method.training_act_bits() is not None:  # ranges calibrated at the round start
        assert all(q.calibrated for q in act_quantizers(model).values())
    deployed = method.deploy(model, 2, act_bits=2, calib=x[:64])
    assert evaluate(deployed, x[:256], y[:256]) > 0.5


def test_act_quantization_in_training_and_deploy_changes_outputs(data) -> None:
    x, y = data
    torch.manual_seed(0)
    model = create_model("lenet5", num_classes=3)
    method = QAT(bits=4, act_bits=2)
    train(model, x[:64], y[:64], method, epochs=1, batch_size=32, seed=0)
    with torch.no_grad():
        a2 = method.deploy(model, 4, act_bits=2)(x[:32])  # ranges of the round kept
        a_float = method.deploy(model, 4)(x[:32])  # the old call: float activations
        a8 = method.deploy(model, 4, act_bits=8, calib=(x[:64] * 255).to(torch.uint8))(x[:32])
    assert not torch.allclose(a2, a_float)
    assert (a8 - a_float).abs().max() < (a2 - a_float).abs().max()
    fresh = create_model("lenet5", num_classes=3)
    fresh.load_state_dict(model.state_dict())
    fresh_method = QAT(bits=4, act_bits=2)
    fresh_method.prepare(fresh)
    with pytest.raises(ValueError, match="calib"):
        fresh_method.deploy(fresh, 4, act_bits=2)


def test_mqat_draws_activation_widths_per_round_independently() -> None:
    model = create_model("lenet5", num_classes=3)
    fast = {"scale_method": "max", "act_calibrator": "minmax"}
    method = MQAT(bit_set=(2, 4, 8), act_bit_set=(2, 3, 4), **fast)
    method.prepare(model)
    rng = random.Random(0)
    pairs = set()
    for _ in range(40):
        method.begin_round(model, rng)
        method.calibrate(model, [torch.rand(8, 1, 28, 28)])
        widths = {(m.bits, m.input_quant.bits) for m in quant_layers(model).values()}
        assert len(widths) == 1  # one draw per round for the whole model
        pairs |= widths
    assert len(pairs) == 9  # independent draws cover the product of the two sets
    # The weight draws come first from the rng, so they are those of a run without act widths
    # as long as the activation draws are the only other use of it.
    step = MQAT(bit_set=(2, 4), act_bit_set=(2, 4), resample="step", **fast)
    m2 = step.prepare(create_model("lenet5", num_classes=3))
    step.begin_round(m2, rng)
    step.calibrate(m2, [torch.rand(8, 1, 28, 28)])
    seen = set()
    for _ in range(20):
        step.before_step(m2, rng)
        seen |= {m.input_quant.bits for m in quant_layers(m2).values()}
        m2(torch.rand(2, 1, 28, 28))  # every drawn width has its grid already
    assert seen == {2, 4}


def test_apqn_adds_activation_noise_in_training_only() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(50, 20))
    method = APQN(bits=8, act_bits=3)
    method.prepare(model)
    method.calibrate(model, [torch.rand(64, 50)])
    q = quant_layers(model)["0"].input_quant
    scale, zp, qmin, qmax = q.qparams()
    x = torch.rand(16, 50) * ((qmax - zp) * scale)
    model.train()
    noisy = q(x)
    assert not torch.equal(noisy, x) and float((noisy - x).abs().max()) <= scale / 2 + 1e-6
    model.eval()
    assert torch.equal(q(x), x)


def test_kure_regularises_activation_kurtosis_too() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))
    x = torch.randn(256, 16) ** 3  # heavy-tailed inputs
    plain, with_acts = KURE(strength=1.0), KURE(strength=1.0, act_bits=4)
    plain.prepare(model)
    model(x)
    weights_only = plain.regularizer(model)
    with_acts.prepare(model)
    model.train()
    model(x)
    both = with_acts.regularizer(model)
    assert float(both.detach()) > float(weights_only.detach())
    assert all(q.recorded is None for q in act_quantizers(model).values())  # consumed
    first = quant_layers(model)["0"]
    assert first.input_quant.bits is None  # KURE trains in float
