"""Image folders (``train/``, ``val/`` with one subfolder per class), ImageNet style."""

from __future__ import annotations

import copy
import os
from pathlib import Path

from torch.utils.data import Subset

from .bundle import DataBundle, example_input, int_option
from .splits import stratified_split

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def image_folder_bundle(spec: dict, options: dict) -> DataBundle:
    from torchvision import datasets, transforms

    if spec.get("root") is None:
        raise ValueError(f"data.root is required for data.name={spec['name']!r}")
    root = Path(spec["root"])
    for split in ("train", "val"):
        if not (root / split).is_dir():
            raise FileNotFoundError(
                f"data.root={str(root)!r} has no {split}/ folder of class subfolders"
            )
    normalize = transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)
    train_tf = transforms.Compose(
        [
            transforms.RandomResizedCrop(224),
            transforms.RandomHorizontalFlip(),
            transforms.ToTensor(),
            normalize,
        ]
    )
    eval_tf = transforms.Compose(
        [transforms.Resize(256), transforms.CenterCrop(224), transforms.ToTensor(), normalize]
    )
    train = datasets.ImageFolder(root / "train", transform=train_tf)
    test = datasets.ImageFolder(root / "val", transform=eval_tf)
    classes = list(train.classes)
    if list(test.classes) != classes:
        raise ValueError(f"data.root={str(root)!r}: train/ and val/ have different class folders")
    keep, held = stratified_split(train.targets, int_option(spec, "val_size", 0), options["seed"])
    val = None
    if len(held):
        val_base = copy.copy(train)
        val_base.transform = eval_tf
        val = Subset(val_base, held.tolist())
        train = Subset(train, keep.tolist())
    return DataBundle(
        train=train,
        val=val,
        test=test,
        num_classes=len(classes),
        classes=classes,
        input_shape=(3, 224, 224),
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
        example_input=example_input(test),
        num_workers=int_option(spec, "num_workers", min(8, os.cpu_count() or 1)),
        **options,
    )


__all__ = ["IMAGENET_MEAN", "IMAGENET_STD", "image_folder_bundle"]
