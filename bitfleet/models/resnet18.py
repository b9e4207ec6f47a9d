"""torchvision's ResNet-18 adapted to 28x28/32x32 inputs the CIFAR way.

The ImageNet stem (7x7 stride-2 conv, then a stride-2 max-pool) would shrink a 32x32 image to
8x8 before the first block and a 28x28 one to 7x7, leaving 1x1 maps in the last stage. A 3x3
stride-1 conv and no max-pool keep the full resolution into the first stage instead, so the
last stage sees 4x4 maps.

It keeps torchvision's BatchNorm: this model is for centralised baselines and IID fleets; for
non-IID federated training prefer `resnet20`, which uses GroupNorm.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

from torch import nn
from torchvision.models import resnet18 as tv_resnet18

from bitfleet.models.normalize import check_model_args, input_normalize


def resnet18(
    num_classes: int = 10,
    in_channels: int = 1,
    image_size: int = 28,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
) -> nn.Sequential:
    """Build it from torchvision rather than copying it, so fixes there reach us.

    Returns `Sequential(normalize=..., backbone=<torchvision ResNet>)`; global pooling lets
    it take any input side >= 28.
    """
    check_model_args("resnet18", num_classes, in_channels, image_size)
    backbone = tv_resnet18(weights=None, num_classes=num_classes)
    backbone.conv1 = nn.Conv2d(in_channels, 64, kernel_size=3, stride=1, padding=1, bias=False)
    # Same initialisation torchvision gives the stem it replaced.
    nn.init.kaiming_normal_(backbone.conv1.weight, mode="fan_out", nonlinearity="relu")
    backbone.maxpool = nn.Identity()
    return nn.Sequential(
        OrderedDict(normalize=input_normalize(in_channels, mean, std), backbone=backbone)
    )
