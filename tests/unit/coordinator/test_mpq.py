"""FedMPQ (paper 002): bit planes and their group Lasso, the MPQ method, pruning-growing."""

from __future__ import annotations

import itertools
import math
import random
from collections.abc import Iterator

import pytest
import torch

from bitfleet.models import create_model
from bitfleet.profiles import load_profiles
from bitfleet.quant import (
    MPQ,
    bit_planes,
    budget_bits,
    group_lasso,
    layer_sizes,
    make_method,
    plane_sparsity,
    quant_layers,
    quantize_model,
    quantize_to_int,
)
from bitfleet.training import evaluate, train
from coordinator.mpq import prune_grow
from tests.blobs import blobs


@pytest.fixture
def one_thread() -> Iterator[None]:
    """Small models train fastest on one thread, above all on a machine shared with others."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def lenet(bits: int = 4) -> torch.nn.Module:
    torch.manual_seed(0)
    return quantize_model(create_model("lenet5", num_classes=3), bits)


def total_bits(bits: dict[str, int], sizes: dict[str, int]) -> int:
    """Exact integer form of the weighted average's numerator, free of float rounding."""
    return sum(sizes[n] * b for n, b in bits.items())


# -- bit planes and the group Lasso ---------------------------------------------------------


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_bit_planes_are_the_quantizer_integers_msb_first(bits: int) -> None:
    layer = quant_layers(lenet(bits))["classifier.2"]
    layer.freeze_steps([bits])
    layer.weight.data[0, 0] = -10.0  # clipped to -2^(b-1): counts as the largest magnitude
    planes = bit_planes(layer, bits)
    assert planes.shape == (bits - 1, *layer.weight.shape)
    q = quantize_to_int(layer.weight, layer.step(bits), bits).int()
    assert q[0, 0] == -(2 ** (bits - 1))
    weights = 2 ** torch.arange(bits - 2, -1, -1).reshape(-1, 1, 1)
    magnitude = (planes.detach() * weights).sum(0).int()
    assert torch.equal(magnitude, q.abs().clamp(max=2 ** (bits - 1) - 1))


def test_group_lasso_gradient_shrinks_weights_holding_the_msb() -> None:
    model = lenet(4)
    layers = quant_layers(model)
    loss = group_lasso(model, 4)
    grads = torch.autograd.grad(loss, [m.weight for m in layers.values()])
    assert 0 < float(loss.detach()) <= 3 * len(layers)  # each plane's term is sqrt(occupancy) <= 1
    for (name, layer), grad in zip(layers.items(), grads, strict=True):
        # The value and gradient of autograd through the relaxed planes' norms.
        planes = bit_planes(layer, 4)
        reference = planes.flatten(1).norm(dim=1).sum() / math.sqrt(layer.weight.numel())
        assert torch.allclose(grad, torch.autograd.grad(reference, layer.weight)[0]), name
        # Descent lowers |w| wherever a bit is set, hardest where the MSB is set.
        msb = planes[0].detach().bool()
        assert (grad * layer.weight.sign() >= 0).all()
        assert grad[msb].abs().mean() > 2 * grad[~msb].abs().mean(), name


@pytest.mark.usefixtures("one_thread")
def test_group_lasso_training_empties_msb_planes() -> None:
    """A few dozen steps with the Lasso leave far more zeros in every layer's MSB plane."""
    x, y = blobs(256)
    msb = {}
    for lasso in (0.0, 0.1):
        model = lenet()
        method = MPQ(bits=4, lasso=lasso)
        train(model, x, y, method, epochs=6, batch_size=32, lr=1e-3)
        msb[lasso] = {n: s[0] for n, s in plane_sparsity(model, 4).items()}
        assert evaluate(method.deploy(model, 4), x, y) > 0.9
    assert all(msb[0.1][n] > msb[0.0][n] + 0.05 for n in msb[0.0]), msb
    assert sum(msb[0.1].values()) / 5 > sum(msb[0.0].values()) / 5 + 0.2, msb


def test_plane_sparsity_lists_quantized_layers_msb_first() -> None:
    model = lenet()
    bits = {"features.0": 2, "features.3": 8, "classifier.0": 4, "classifier.2": 32}
    sparsity = plane_sparsity(model, bits)
    assert {n: len(s) for n, s in sparsity.items()} == {
        "features.0": 1,
        "features.3": 7,
        "classifier.0": 3,
    }
    assert all(0 <= z <= 1 for s in sparsity.values() for z in s)
    assert float(group_lasso(model, 32)) == 0.0


def test_layer_sizes_and_weighted_budget() -> None:
    sizes = layer_sizes(create_model("lenet5"))
    assert sizes == {
        "features.0": 150,
        "features.3": 2400,
        "classifier.0": 48000,
        "classifier.2": 10080,
        "classifier.4": 840,
    }
    assert layer_sizes(quantize_model(create_model("lenet5"), 4)) == sizes
    bits = dict.fromkeys(sizes, 2) | {"classifier.0": 8}
    assert budget_bits(bits, sizes) == pytest.approx((2 * 13470 + 8 * 48000) / 61470)
    with pytest.raises(ValueError, match="missing"):
        budget_bits({"features.0": 4}, sizes)


# -- the MPQ local method -------------------------------------------------------------------


@pytest.mark.usefixtures("one_thread")
def test_mpq_trains_per_layer_bits_and_deploys_a_layer_map() -> None:
    x, y = blobs(128)
    layer_bits = {
        "features.0": 8,
        "features.3": 4,
        "classifier.0": 2,
        "classifier.2": 3,
        "classifier.4": 6,
    }
    method = make_method("mpq", layer_bits=layer_bits, lasso=0.01)
    assert isinstance(method, MPQ)
    model = create_model("lenet5", num_classes=3)
    train(model, x, y, method, epochs=1, batch_size=32)
    layers = quant_layers(model)
    assert {n: m.bits for n, m in layers.items()} == layer_bits
    assert all(list(m.frozen_steps) == [m.bits] for m in layers.values())
    deployed = {"features.0": 8, "features.3": 4, "classifier.0": 2, "classifier.2": 4}
    method.deploy(model, deployed)
    assert {n: m.bits for n, m in layers.items()} == deployed | {"classifier.4": 32}
    method.deploy(model, 3)
    assert {m.bits for m in layers.values()} == {3}


def test_mpq_lasso_leaves_out_layers_at_the_narrowest_width() -> None:
    """A 2-bit layer cannot be pruned further, so the Lasso must not shrink it."""
    layer_bits = dict.fromkeys(layer_sizes(create_model("lenet5")), 2) | {"features.3": 4}
    model = MPQ(layer_bits=layer_bits, lasso=0.1).prepare(create_model("lenet5"))
    term = MPQ(layer_bits=layer_bits, lasso=0.1).regularizer(model)
    assert term is not None
    expected = 0.1 * group_lasso(model, {"features.3": 4}).item()
    assert term.item() == pytest.approx(expected)
    term.backward()
    grads = {n: m.weight.grad for n, m in quant_layers(model).items()}
    assert grads["features.3"].abs().sum() > 0
    assert all(g is None or not g.any() for n, g in grads.items() if n != "features.3")
    uniform = MPQ(bits=2, lasso=0.1)
    assert uniform.regularizer(uniform.prepare(create_model("lenet5"))) is None


def test_mpq_rejects_bad_options() -> None:
    assert MPQ(lasso=0.0).regularizer(lenet()) is None
    with pytest.raises(ValueError, match="lasso"):
        MPQ(lasso=-1.0).prepare(create_model("lenet5"))
    with pytest.raises(KeyError, match="conv9"):
        MPQ(layer_bits={"conv9": 4}).prepare(create_model("lenet5"))


# -- pruning-growing ------------------------------------------------------------------------

LENET = layer_sizes(create_model("lenet5"))
SYNTH = {"a": 1000, "b": 500, "c": 300, "d": 200}


@pytest.mark.parametrize("sizes", [LENET, SYNTH], ids=["lenet5", "synthetic"])
@pytest.mark.parametrize("budget", [2, 3, 4, 6, 8])
def test_prune_grow_meets_integer_budgets_exactly(sizes: dict[str, int], budget: int) -> None:
    rng = random.Random(budget)
    starts = [None, dict.fromkeys(sizes, 8), dict.fromkeys(sizes, 2)]
    starts.append({n: rng.randint(2, 8) for n in sizes})
    sparsity = {n: [rng.random() for _ in range(3)] for n in sizes}
    for start in starts:
        bits = prune_grow(sparsity, sizes, budget, start=start)
        assert set(bits) == set(sizes) and set(bits.values()) <= set(range(2, 9))
        assert total_bits(bits, sizes) == budget * sum(sizes.values()), (start, bits)
    assert prune_grow({}, sizes, budget) == dict.fromkeys(sizes, budget)


def test_prune_grow_reaches_the_largest_average_not_above_the_budget() -> None:
    """Against brute force over every assignment: never above, and nothing closer below."""
    rng = random.Random(0)
    for _ in range(25):
        sizes = {f"l{i}": rng.randint(1, 60) for i in range(rng.randint(1, 4))}
        allowed = sorted(rng.sample(range(2, 9), rng.randint(1, 4)))
        budget = rng.uniform(allowed[0], allowed[-1])
        start = {n: rng.choice(allowed) for n in sizes}
        bits = prune_grow({}, sizes, budget, allowed=allowed, start=start)
        reachable = {
            total_bits(dict(zip(sizes, combo, strict=True)), sizes)
            for combo in itertools.product(allowed, repeat=len(sizes))
        }
        best = max(t for t in reachable if t <= budget * sum(sizes.values()))
        assert total_bits(bits, sizes) == best, (sizes, allowed, budget, bits)
        assert budget_bits(bits, sizes) <= budget
    # 5- and 7-weight layers can reach 2.0 and 29/12 but nothing in between.
    assert prune_grow({}, {"x": 5, "y": 7}, 2.3) == {"x": 2, "y": 2}


def test_prune_grow_prunes_the_largest_layer_and_grows_the_smallest() -> None:
    start = dict.fromkeys(SYNTH, 6)
    # 1000 bits fewer: the largest layer drops a bit, although b, or c and d, could too.
    assert prune_grow({}, SYNTH, 5.5, start=start) == start | {"a": 5}
    # 200 bits more: the smallest layer gains one.
    assert prune_grow({}, SYNTH, 6.1, start=start) == start | {"d": 7}
    # 200 bits fewer: the largest layer pays, the small ones get the surplus back.
    bits = prune_grow({}, SYNTH, 5.9, start=start)
    assert bits["a"] == 5 and bits["c"] > 6 and bits["d"] > 6
    assert total_bits(bits, SYNTH) == 11800


def test_prune_grow_prunes_an_emptied_msb_plane_first() -> None:
    sizes = {"big": 1000, "near": 800, "small": 200}
    start = dict.fromkeys(sizes, 4)
    dense = {n: [0.3, 0.5, 0.5] for n in sizes}
    # 800 bits fewer: "near" could pay alone, but the larger layer goes first.
    assert prune_grow(dense, sizes, 3.6, start=start) == {"big": 3, "near": 4, "small": 5}
    sparse = dense | {"near": [1.0, 0.5, 0.5]}  # its MSB plane is empty: free to drop
    assert prune_grow(sparse, sizes, 3.6, start=start) == start | {"near": 3}


def test_prune_grow_is_deterministic_and_rejects_unreachable_budgets() -> None:
    sparsity = {"classifier.0": [0.9, 0.6], "features.0": [0.2, 0.5]}
    first = prune_grow(sparsity, LENET, 3.3, start=dict.fromkeys(LENET, 8))
    shuffled = dict(reversed(list(LENET.items())))
    assert prune_grow(sparsity, shuffled, 3.3, start=dict.fromkeys(LENET, 8)) == first
    for budget in (1.5, 8.5, math.nan):
        with pytest.raises(ValueError, match=r"outside \[2, 8\]"):
            prune_grow({}, LENET, budget)
    with pytest.raises(ValueError, match=r"outside \[4, 8\]"):
        prune_grow({}, LENET, 3, allowed=(4, 8))
    with pytest.raises(ValueError, match="not among the allowed"):
        prune_grow({}, LENET, 4, allowed=(4, 8), start=dict.fromkeys(LENET, 6))


# Each shipped board's deploy width among the job's widths: the widest, whatever the board
# stores or runs, since none of them needs fewer bits (docs/allocation.md#deploy-width).
DEPLOY_WIDTHS = [
    ((2, 3, 4, 5, 6, 7, 8), {"rpi4": 8, "jetson-nano": 8, "rpi5": 8, "jetson-orin-nano": 8}),
    ((8, 4, 2), {"rpi4": 8, "jetson-nano": 8, "rpi5": 8, "x86-server": 8}),
    ((4, 8), {"rpi4": 8, "jetson-nano": 8, "rpi5": 8}),
    ((3, 5), {"rpi4": 5, "jetson-nano": 5, "rpi5": 5, "x86-server": 5}),
    ((2,), {"rpi4": 2, "rpi5": 2}),
]


@pytest.mark.parametrize(("allowed", "expected"), DEPLOY_WIDTHS)
def test_one_rule_gives_each_board_its_deploy_width(allowed, expected) -> None:
    from dataclasses import replace

    from coordinator.assigner import deploy_bits, training_bits
    from coordinator.config import job_config_from_dict
    from export.checkpoint_model import device_defaults
    from tests.fleet_values import registration

    profiles = load_profiles()
    for name, bits in expected.items():
        assert profiles[name].deploy_width(allowed) == bits, (name, allowed)
    for board in profiles.values():
        width = board.deploy_width(allowed)
        assert width == max(allowed), (board.name, allowed)
        # A stated budget wins.
        assert replace(board, budget_bits=min(allowed)).deploy_width(allowed) == min(allowed)
        # At most the budget: the widest allowed width within it, else the narrowest.
        assert replace(board, budget_bits=7).deploy_width((4, 8)) == 4
        assert replace(board, budget_bits=2.5).deploy_width((2, 3, 4)) == 2
        assert replace(board, budget_bits=2.5).deploy_width((4, 8)) == 4
        # The exporter's default and the coordinator's choice are that same rule.
        assert device_defaults(board) == (board.deploy_width(), board.preferred_storage)
        reg = replace(registration(board.name, board=board.name), board=board)
        job = job_config_from_dict({"deploy": {"bits": list(allowed)}})
        assert deploy_bits(job, reg) == width
        budgets = job_config_from_dict({"allocation": {"bits_from": "profile"}})
        assert deploy_bits(budgets, reg) == training_bits(budgets, reg) == board.deploy_width()
    with pytest.raises(ValueError, match="2..8"):
        profiles["rpi4"].deploy_width((1, 32))
