"""Model zoo: small image classifiers sized for edge boards, created by name.

Configs, the wire protocol and checkpoints name a model by string, so both the coordinator and
the agents can build the same architecture from a registration message. Every model takes raw
pixels in [0, 1] (NCHW float32), starts with a `Normalize` layer, and holds its weights only in
`nn.Conv2d`, `nn.Linear` and norm layers, so a quantizer can swap modules without knowing the
architecture.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Protocol

from torch import nn

# The factories are deliberately not re-exported: most share their module's name, and a
# package attribute `resnet20` that is a function would shadow the submodule (breaking
# `import bitfleet.models.resnet20 as m` and mock.patch paths). Import them from their modules.
from bitfleet.models import lenet, mobilenet_v2, resnet18, resnet20, small_cnn
from bitfleet.models.lenet import LeNet5
from bitfleet.models.normalize import Normalize
from bitfleet.models.resnet20 import ResNet20
from bitfleet.models.small_cnn import SmallCNN

if TYPE_CHECKING:
    from bitfleet.data.specs import DatasetSpec


class ModelFactory(Protocol):
    """The one signature every factory shares, so `create_model` can dispatch blindly."""

    def __call__(
        self,
        num_classes: int = 10,
        in_channels: int = 1,
        image_size: int = 28,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
    ) -> nn.Module: ...


MODELS: dict[str, ModelFactory] = {
    "lenet5": lenet.lenet5,
    "small_cnn": small_cnn.small_cnn,
    "resnet20": resnet20.resnet20,
    "resnet18": resnet18.resnet18,
    "mobilenet_v2": mobilenet_v2.mobilenet_v2,
}


def create_model(
    name: str,
    num_classes: int = 10,
    in_channels: int = 1,
    image_size: int = 28,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
) -> nn.Module:
    """Build a model from the name a config or message carries; mean/std default to 0.5."""
    try:
        factory = MODELS[name]
    except KeyError:
        raise ValueError(
            f"unknown model {name!r}; known models: {', '.join(sorted(MODELS))}"
        ) from None
    return factory(
        num_classes=num_classes,
        in_channels=in_channels,
        image_size=image_size,
        mean=mean,
        std=std,
    )


def create_model_for(name: str, spec: DatasetSpec) -> nn.Module:
    """The architecture sized and normalised for a data set, as every role builds it."""
    return create_model(
        name,
        num_classes=spec.num_classes,
        in_channels=spec.in_channels,
        image_size=spec.image_size,
        mean=spec.mean,
        std=spec.std,
    )


__all__ = [
    "MODELS",
    "LeNet5",
    "ModelFactory",
    "Normalize",
    "ResNet20",
    "SmallCNN",
    "create_model",
    "create_model_for",
]
