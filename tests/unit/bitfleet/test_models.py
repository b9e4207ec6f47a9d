"""Model zoo: shapes, the input contract, and the structure the quantizer relies on."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch
from torch import nn

from bitfleet.models import MODELS, Normalize, create_model

# (in_channels, image_size): Fashion-MNIST-like and CIFAR-like inputs.
INPUTS = [(1, 28), (3, 32)]
WEIGHTED_TYPES = (nn.Conv2d, nn.Linear, nn.BatchNorm2d, nn.GroupNorm)


@pytest.fixture(scope="module", autouse=True)
def _single_thread() -> Iterator[None]:
    """Batch-2 forwards gain nothing from intra-op threads, and on a busy 2-core machine
    OpenMP workers spinning against another process made one MobileNetV2 forward 100x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module", params=sorted(MODELS))
def name(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.mark.parametrize(("in_channels", "image_size"), INPUTS)
@pytest.mark.parametrize("num_classes", [10, 100])
def test_output_shape(name: str, in_channels: int, image_size: int, num_classes: int) -> None:
    model = create_model(name, num_classes, in_channels, image_size).eval()
    with torch.no_grad():
        out = model(torch.rand(2, in_channels, image_size, image_size))
    assert out.shape == (2, num_classes)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize(("in_channels", "image_size"), INPUTS)
def test_normalize_is_first_and_normalizes(name: str, in_channels: int, image_size: int) -> None:
    mean = [0.1 * (c + 1) for c in range(in_channels)]
    std = [0.2 * (c + 1) for c in range(in_channels)]
    model = create_model(name, 10, in_channels, image_size, mean=mean, std=std)
    first = next(iter(model.children()))
    assert isinstance(first, Normalize)
    x = torch.tensor(mean).view(1, -1, 1, 1).expand(2, -1, image_size, image_size)
    assert torch.allclose(first(x), torch.zeros_like(x))
    assert torch.allclose(first(x + torch.tensor(std).view(1, -1, 1, 1)), torch.ones_like(x))


def test_default_statistics_map_unit_range_to_symmetric(name: str) -> None:
    first = next(iter(create_model(name, in_channels=3, image_size=32).children()))
    x = torch.stack([torch.zeros(3, 4, 4), torch.ones(3, 4, 4)])
    out = first(x)
    assert torch.equal(out[0], torch.full_like(out[0], -1.0))
    assert torch.equal(out[1], torch.full_like(out[1], 1.0))


def test_statistics_travel_in_state_dict(name: str) -> None:
    keys = create_model(name).state_dict().keys()
    assert {"normalize.mean", "normalize.std"} <= keys


def test_only_quantizable_modules_hold_weights(name: str) -> None:
    model = create_model(name, in_channels=3, image_size=32)
    for module_name, module in model.named_modules():
        if any(True for _ in module.parameters(recurse=False)):
            assert isinstance(module, WEIGHTED_TYPES), f"{module_name}: {type(module).__name__}"


def test_unknown_name_lists_known_models() -> None:
    with pytest.raises(ValueError, match="vgg16") as info:
        create_model("vgg16")
    for known in MODELS:
        assert known in str(info.value)


@pytest.mark.parametrize("image_size", [20, 27])
def test_too_small_image_rejected(name: str, image_size: int) -> None:
    with pytest.raises(ValueError, match="image_size"):
        create_model(name, image_size=image_size)


def test_lenet_accepts_only_28_and_32() -> None:
    with pytest.raises(ValueError, match=r"\[28, 32\]"):
        create_model("lenet5", image_size=30)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"num_classes": 0}, "num_classes"),
        ({"in_channels": 0}, "in_channels"),
        ({"in_channels": 3, "mean": [0.5]}, "mean has 1 values"),
        ({"std": [0.0]}, "positive"),
    ],
)
def test_bad_arguments_rejected(kwargs: dict[str, object], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        create_model("small_cnn", **kwargs)  # type: ignore[arg-type]


def test_lenet5_classic_parameter_count() -> None:
    # conv1 1*6*25+6=156, conv2 6*16*25+16=2416, fc1 400*120+120=48120,
    # fc2 120*84+84=10164, fc3 84*10+10=850.
    model = create_model("lenet5", num_classes=10, in_channels=1, image_size=28)
    assert sum(p.numel() for p in model.parameters()) == 61_706


def test_lenet5_same_weights_for_28_and_32() -> None:
    shapes_28 = {k: v.shape for k, v in create_model("lenet5", image_size=28).state_dict().items()}
    shapes_32 = {k: v.shape for k, v in create_model("lenet5", image_size=32).state_dict().items()}
    assert shapes_28 == shapes_32


def test_resnet20_uses_groupnorm_not_batchnorm() -> None:
    modules = list(create_model("resnet20").modules())
    assert any(isinstance(m, nn.GroupNorm) for m in modules)
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in modules)
    # 19 convs + 1 FC weight layers, plus the 2 option-B shortcut convs.
    assert sum(isinstance(m, nn.Conv2d) for m in modules) == 19 + 2
    assert sum(isinstance(m, nn.Linear) for m in modules) == 1


def test_resnet18_cifar_stem() -> None:
    model = create_model("resnet18", in_channels=3, image_size=32)
    conv1 = model.backbone.conv1
    assert isinstance(conv1, nn.Conv2d)
    assert conv1.in_channels == 3
    assert conv1.kernel_size == (3, 3)
    assert conv1.stride == (1, 1)
    assert conv1.padding == (1, 1)
    assert isinstance(model.backbone.maxpool, nn.Identity)
    assert not any(isinstance(m, nn.MaxPool2d) for m in model.modules())


@pytest.mark.parametrize(("in_channels", "image_size"), INPUTS)
def test_mobilenet_v2_final_map_at_least_2x2(in_channels: int, image_size: int) -> None:
    model = create_model("mobilenet_v2", in_channels=in_channels, image_size=image_size).eval()
    stem_conv = model.backbone.features[0][0]
    assert stem_conv.stride == (1, 1)
    assert stem_conv.in_channels == in_channels
    with torch.no_grad():
        features = model.backbone.features(torch.rand(1, in_channels, image_size, image_size))
    assert features.shape[-2:] == (2, 2)
