"""ResNet-20 (He et al., 2016, CIFAR variant) with GroupNorm instead of BatchNorm.

BatchNorm keeps running statistics that, under non-IID client data, describe each client's
own label mix; averaging them across clients gives statistics that fit no one, and they break
with tiny local batches. GroupNorm normalises each sample on its own and has nothing to
average but its affine weights. This follows "Quantization Robust Federated Learning"
(Gupta et al., TMLR 2023), which uses GroupNorm for its federated ResNet-20, after Hsieh et
al. (ICML 2020, "The Non-IID Data Quagmire"), who showed GroupNorm recovers most of what
BatchNorm loses under label skew.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from bitfleet.models.normalize import check_model_args, input_normalize

#: Two groups per norm layer, the usual FL-benchmark setting (e.g. Reddi et al., "Adaptive
#: Federated Optimization", 2021): it divides every width (16/32/64), and with 8-32 channels per
#: group the statistics stay stable on the 7x7/8x8 maps of the last stage, where small groups
#: (InstanceNorm at the extreme) would be noisy.
GROUPS = 2


def _norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(GROUPS, channels)


class BasicBlock(nn.Module):
    """Two 3x3 convs with an identity or 1x1-conv (option B) shortcut.

    Each ReLU is its own module (torchvision shares one) so that activation observers
    attached per module see one call site each.
    """

    def __init__(self, in_planes: int, planes: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.norm1 = _norm(planes)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.norm2 = _norm(planes)
        self.relu2 = nn.ReLU(inplace=True)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False), _norm(planes)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu1(self.norm1(self.conv1(x)))
        out = self.norm2(self.conv2(out))
        return self.relu2(out + self.shortcut(x))


class ResNet20(nn.Module):
    """3 stages of 3 basic blocks at 16/32/64 channels, global average pooling, one FC."""

    def __init__(
        self,
        num_classes: int = 10,
        in_channels: int = 1,
        image_size: int = 28,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
    ) -> None:
        super().__init__()
        check_model_args("resnet20", num_classes, in_channels, image_size)
        self.normalize = input_normalize(in_channels, mean, std)
        self.conv1 = nn.Conv2d(in_channels, 16, 3, stride=1, padding=1, bias=False)
        self.norm1 = _norm(16)
        self.relu = nn.ReLU(inplace=True)
        self.layer1 = self._stage(16, 16, stride=1)
        self.layer2 = self._stage(16, 32, stride=2)
        self.layer3 = self._stage(32, 64, stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(64, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    @staticmethod
    def _stage(in_planes: int, planes: int, stride: int, blocks: int = 3) -> nn.Sequential:
        layers = [BasicBlock(in_planes, planes, stride)]
        layers += [BasicBlock(planes, planes, 1) for _ in range(blocks - 1)]
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.norm1(self.conv1(self.normalize(x))))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(self.flatten(self.avgpool(x)))


def resnet20(
    num_classes: int = 10,
    in_channels: int = 1,
    image_size: int = 28,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
) -> ResNet20:
    """ResNet-20 with GroupNorm; global pooling lets it take any input side >= 28."""
    return ResNet20(num_classes, in_channels, image_size, mean, std)
