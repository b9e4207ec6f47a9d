"""What each supported data set looks like, known without loading it.

Models, the coordinator and the ONNX export need the class count, the input shape, the
normalisation and the class labels before (or without) any pixels are read: the server may hold
no data at all, and an exported model carries its labels and normalisation inside the graph.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["CIFAR10", "CIFAR100", "DATASET_SPECS", "FASHION_MNIST", "DatasetSpec", "get_spec"]


@dataclass(frozen=True)
class DatasetSpec:
    """Shape, normalisation and labels of one image classification data set.

    `mean` and `std` are per channel, on pixels scaled to [0, 1], measured on the training split.
    """

    name: str
    num_classes: int
    in_channels: int
    image_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    class_names: tuple[str, ...]

    def __post_init__(self) -> None:
        if len(self.mean) != self.in_channels or len(self.std) != self.in_channels:
            raise ValueError(f"{self.name}: mean and std need one value per channel")
        if len(self.class_names) != self.num_classes:
            raise ValueError(
                f"{self.name}: {len(self.class_names)} class names for {self.num_classes} classes"
            )


FASHION_MNIST = DatasetSpec(
    name="fashion-mnist",
    num_classes=10,
    in_channels=1,
    image_size=28,
    mean=(0.2860,),
    std=(0.3530,),
    class_names=(
        "T-shirt/top",
        "Trouser",
        "Pullover",
        "Dress",
        "Coat",
        "Sandal",
        "Shirt",
        "Sneaker",
        "Bag",
        "Ankle boot",
    ),
)

CIFAR10 = DatasetSpec(
    name="cifar10",
    num_classes=10,
    in_channels=3,
    image_size=32,
    mean=(0.4914, 0.4822, 0.4465),
    std=(0.2470, 0.2435, 0.2616),
    class_names=(
        "airplane",
        "automobile",
        "bird",
        "cat",
        "deer",
        "dog",
        "frog",
        "horse",
        "ship",
        "truck",
    ),
)

CIFAR100 = DatasetSpec(
    name="cifar100",
    num_classes=100,
    in_channels=3,
    image_size=32,
    mean=(0.5071, 0.4865, 0.4409),
    std=(0.2673, 0.2564, 0.2762),
    # The fine labels in the order of the data set's label ids (alphabetical).
    class_names=(
        "apple",
        "aquarium_fish",
        "baby",
        "bear",
        "beaver",
        "bed",
        "bee",
        "beetle",
        "bicycle",
        "bottle",
        "bowl",
        "boy",
        "bridge",
        "bus",
        "butterfly",
        "camel",
        "can",
        "castle",
        "caterpillar",
        "cattle",
        "chair",
        "chimpanzee",
        "clock",
        "cloud",
        "cockroach",
        "couch",
        "crab",
        "crocodile",
        "cup",
        "dinosaur",
        "dolphin",
        "elephant",
        "flatfish",
        "forest",
        "fox",
        "girl",
        "hamster",
        "house",
        "kangaroo",
        "keyboard",
        "lamp",
        "lawn_mower",
        "leopard",
        "lion",
        "lizard",
        "lobster",
        "man",
        "maple_tree",
        "motorcycle",
        "mountain",
        "mouse",
        "mushroom",
        "oak_tree",
        "orange",
        "orchid",
        "otter",
        "palm_tree",
        "pear",
        "pickup_truck",
        "pine_tree",
        "plain",
        "plate",
        "poppy",
        "porcupine",
        "possum",
        "rabbit",
        "raccoon",
        "ray",
        "road",
        "rocket",
        "rose",
        "sea",
        "seal",
        "shark",
        "shrew",
        "skunk",
        "skyscraper",
        "snail",
        "snake",
        "spider",
        "squirrel",
        "streetcar",
        "sunflower",
        "sweet_pepper",
        "table",
        "tank",
        "telephone",
        "television",
        "tiger",
        "tractor",
        "train",
        "trout",
        "tulip",
        "turtle",
        "wardrobe",
        "whale",
        "willow_tree",
        "wolf",
        "woman",
        "worm",
    ),
)

#: Every data set `load_dataset` knows, by the name it is asked for.
DATASET_SPECS: dict[str, DatasetSpec] = {s.name: s for s in (FASHION_MNIST, CIFAR10, CIFAR100)}


def get_spec(name: str) -> DatasetSpec:
    """Look a data set up by name, failing with the list of known names so a typo is obvious."""
    try:
        return DATASET_SPECS[name]
    except KeyError:
        known = ", ".join(DATASET_SPECS)
        raise ValueError(f"unknown data set {name!r}; known: {known}") from None
