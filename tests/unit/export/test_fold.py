"""BatchNorm folding: which pairs fold, that the folded copy computes the same, and that
folding is safe beside other threads running models (agents train in threads in the tests)."""

from __future__ import annotations

import threading

import torch
from torch import nn

from bitfleet.models import create_model
from bitfleet.quant import PTQ
from export.fold import prepare_for_export
from tests.unit.export.test_export import SHAPE, Tiny, tiny


class SharedOutput(Tiny):
    """The convolution's output also feeds a functional residual: folding would change it."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c = self.conv(self.normalize(x))
        x = self.pool(self.relu(self.bn(c) + c))
        return self.fc(torch.flatten(x, 1))


def _trained_bn(model: Tiny) -> Tiny:
    with torch.no_grad():
        model.bn.weight.uniform_(0.5, 2.0)
        model.bn.running_mean.uniform_(-0.2, 0.2)
        model.bn.running_var.uniform_(0.5, 2.0)
    return model.eval()


def test_conv_batchnorm_folds_and_computes_the_same() -> None:
    model = tiny(8)
    x = torch.rand(4, *SHAPE)
    plain, layers = prepare_for_export(model, SHAPE)
    assert isinstance(plain.bn, nn.Identity)
    with torch.no_grad():
        assert torch.allclose(plain(x), model(x), atol=1e-4)
    assert not torch.equal(layers["conv"].scale, model.conv.step().flatten())


def test_a_convolution_with_a_second_reader_keeps_its_batchnorm() -> None:
    torch.manual_seed(0)
    model = _trained_bn(SharedOutput())
    PTQ().prepare(model)
    plain, _ = prepare_for_export(model, SHAPE)
    assert isinstance(plain.bn, nn.BatchNorm2d)
    x = torch.rand(4, *SHAPE)
    with torch.no_grad():
        assert torch.allclose(plain(x), model(x), atol=1e-4)


def test_folding_leaves_the_callers_random_stream_alone() -> None:
    model = tiny(4)
    torch.manual_seed(3)
    expected = torch.rand(3)
    torch.manual_seed(3)
    prepare_for_export(model, SHAPE)
    assert torch.equal(torch.rand(3), expected)


def test_folding_beside_a_training_thread_does_not_break_it() -> None:
    """torch.fx's tracer patches nn.Module.__call__ for the whole process; a model running in
    another thread meanwhile raised NameError (CI, tests/e2e/test_faults.py)."""
    model = create_model("lenet5")
    PTQ().prepare(model)
    errors: list[BaseException] = []
    stop = threading.Event()

    def train() -> None:
        other = create_model("lenet5")
        x = torch.rand(8, 1, 28, 28)
        try:
            while not stop.is_set():
                other(x).sum().backward()
        except BaseException as exc:  # noqa: BLE001 - reported by the assertion below
            errors.append(exc)

    worker = threading.Thread(target=train)
    worker.start()
    try:
        for _ in range(30):
            prepare_for_export(model, (1, 28, 28))
    finally:
        stop.set()
        worker.join()
    assert errors == []
