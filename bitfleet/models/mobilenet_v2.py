"""torchvision's MobileNetV2 adapted to 28x28/32x32 inputs.

The ImageNet network downsamples by 32, which turns a 28x28 image into a 1x1 map (a 32x32
one too). Making only the stem conv stride 1 brings the total stride to 16: the
final feature map is 2x2 for both 28x28 and 32x32 inputs (28 -> 14 -> 7 -> 4 -> 2 through
the four remaining stride-2 stages). We stop there rather than also un-striding the 24-channel
stage (the common CIFAR recipe, 4x4 at the end): that multiplies the compute by about 3.6
(24 M -> 88 M multiply-adds at 3x32x32), and this model exists to be cheap on the boards.

It keeps torchvision's BatchNorm and dropout (0.2 before the classifier): for non-IID
federated training prefer `resnet20`, which uses GroupNorm.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

from torch import nn
from torchvision.models import mobilenet_v2 as tv_mobilenet_v2

from bitfleet.models.normalize import check_model_args, input_normalize


def mobilenet_v2(
    num_classes: int = 10,
    in_channels: int = 1,
    image_size: int = 28,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
) -> nn.Sequential:
    """Build it from torchvision rather than copying it, so fixes there reach us.

    Returns `Sequential(normalize=..., backbone=<torchvision MobileNetV2>)`; global pooling
    lets it take any input side >= 28 (the final map is then at least 2x2).
    """
    check_model_args("mobilenet_v2", num_classes, in_channels, image_size)
    backbone = tv_mobilenet_v2(weights=None, num_classes=num_classes)
    stem = backbone.features[0]  # Conv2dNormActivation: conv, BatchNorm, ReLU6
    if not isinstance(stem, nn.Sequential) or not isinstance(stem[0], nn.Conv2d):
        # Fail loudly if a torchvision release reshapes the stem, not with a wrong network.
        raise RuntimeError(f"unexpected torchvision MobileNetV2 stem: {stem}")
    conv = nn.Conv2d(
        in_channels, stem[0].out_channels, kernel_size=3, stride=1, padding=1, bias=False
    )
    # Same initialisation torchvision gives the stem it replaced.
    nn.init.kaiming_normal_(conv.weight, mode="fan_out")
    stem[0] = conv
    return nn.Sequential(
        OrderedDict(normalize=input_normalize(in_channels, mean, std), backbone=backbone)
    )
