"""Image folders: ``root/train/<class>/*`` with ``root/val/`` and/or ``root/test/`` alike.

- ``imagefolder``: your own images, as they are. Every image keeps its size (or is resized to
  ``image_size``), grayscale images stay one channel (``channels: auto``), and the per-channel
  mean/std come from the training images unless given. Training batches are randomly cropped
  after zero-padding by 1/8 of the side and flipped horizontally, as the CIFAR arrays are.
- ``imagenet``: ImageNet's pipeline: random-resized 224 crop and flip for training, resize 256
  and center crop 224 for evaluation, ImageNet's mean/std, 3 channels.

Splits: ``test/`` is the test split (``val/`` when there is no ``test/``); with both folders,
``val/`` is the validation split, otherwise ``val_size`` training images are held out for it.
Images are decoded one by one as batches are drawn; nothing is held in memory.
"""

from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset, Subset

from .bundle import DataBundle, example_input, int_option
from .images import augment_and_normalize
from .splits import channel_stats, stratified_indices, stratified_split

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
STATS_IMAGES = 5000
"""At most this many training images (a stratified random sample beyond it) give the mean/std."""
_GRAY_MODES = ("1", "L", "LA", "I", "I;16", "F")


class ImageFileDataset(Dataset):
    """Images decoded from files as they are drawn: items ``(x, y)``, x float32 C × H × W
    normalized with ``mean``/``std`` (units of the [0, 1] pixel), y the class index. ``channels``
    1 decodes as grayscale, 3 as RGB; ``size`` (H, W) resizes (bilinear) when given. With
    ``train=True``, items are randomly cropped after zero-padding by ``crop_padding`` and flipped
    (torch's global RNG, as :class:`~qtrainer.data.images.ImageArrayDataset`)."""

    def __init__(self, samples: Sequence[tuple[str, int]], channels: int,
                 size: tuple[int, int] | None, train: bool, mean: Sequence[float],
                 std: Sequence[float], crop_padding: int):
        self.samples, self.channels, self.size = list(samples), channels, size
        self.train, self.crop_padding = train, crop_padding
        self.mean = torch.tensor(mean, dtype=torch.float32)
        self.std = torch.tensor(std, dtype=torch.float32)

    def __len__(self) -> int:
        return len(self.samples)

    def pixels(self, i: int) -> np.ndarray:
        """Image ``i`` as uint8 H × W × C."""
        with Image.open(self.samples[i][0]) as im:
            im = im.convert("L" if self.channels == 1 else "RGB")
            if self.size is not None and im.size != (self.size[1], self.size[0]):
                im = im.resize((self.size[1], self.size[0]), Image.BILINEAR)
            array = np.array(im, dtype=np.uint8)
        return array[:, :, None] if array.ndim == 2 else array

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        image = torch.from_numpy(self.pixels(i)).unsqueeze(0)
        x = augment_and_normalize(image, self.train, self.crop_padding, True, self.mean, self.std)
        return x, self.samples[i][1]


def _size_option(value) -> tuple[int, int] | None:
    if value is None:
        return None
    if isinstance(value, int) and not isinstance(value, bool) and value >= 1:
        return value, value
    if isinstance(value, (list, tuple)) and len(value) == 2 and all(
            isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in value):
        return int(value[0]), int(value[1])
    raise ValueError(f"data.image_size={value!r} must be a positive integer, [height, width], "
                     "or null (the images' own size)")


def _stats_option(spec: dict, key: str, channels: int):
    value = spec.get(key)
    if value is None:
        return None
    if not isinstance(value, (list, tuple)) or len(value) != channels or not all(
            isinstance(v, (int, float)) and not isinstance(v, bool) and v > (0 if key == "std" else -1e9)
            for v in value):
        raise ValueError(f"data.{key}={value!r} must be a list of {channels} numbers (one per "
                         f"channel, in units of the [0, 1] pixel{'; positive' if key == 'std' else ''})")
    return tuple(float(v) for v in value)


def _scan(samples, image_size, channels_option) -> tuple[int, tuple[int, int]]:
    """(channels, (H, W)) of the training images, reading file headers only."""
    sizes, gray = {}, True
    for path, _ in samples:
        with Image.open(path) as im:
            sizes.setdefault(im.size, path)
            gray = gray and im.mode in _GRAY_MODES
    channels = (1 if gray else 3) if channels_option in (None, "auto") else channels_option
    if channels not in (1, 3):
        raise ValueError(f"data.channels={channels_option!r} must be 'auto', 1 or 3")
    if image_size is not None:
        return channels, image_size
    if len(sizes) > 1:
        (a, pa), (b, pb) = list(sizes.items())[:2]
        raise ValueError(f"the training images differ in size ({pa}: {a[0]}x{a[1]}, {pb}: "
                         f"{b[0]}x{b[1]}); set data.image_size to resize them")
    (w, h), = sizes
    return channels, (h, w)


def _folder(root: Path, split: str, classes: list[str] | None):
    from torchvision import datasets

    folder = datasets.ImageFolder(root / split)
    if classes is not None and list(folder.classes) != classes:
        raise ValueError(f"data.root={str(root)!r}: {split}/ and train/ have different class "
                         f"folders ({', '.join(folder.classes)} vs {', '.join(classes)})")
    return folder


def _splits(spec: dict) -> tuple[Path, str, str | None]:
    """(root, test folder name, separate validation folder name or None)."""
    if spec.get("root") is None:
        raise ValueError(f"data.root is required for data.name={spec['name']!r}")
    root = Path(spec["root"])
    if not (root / "train").is_dir():
        raise FileNotFoundError(f"data.root={str(root)!r} has no train/ folder of class subfolders")
    found = [s for s in ("val", "test") if (root / s).is_dir()]
    if not found:
        raise FileNotFoundError(f"data.root={str(root)!r} has no val/ or test/ folder next to "
                                "train/ (one of them is the test split)")
    return root, found[-1], "val" if len(found) == 2 else None


def image_folder_bundle(spec: dict, options: dict) -> DataBundle:
    """The bundle of ``imagefolder`` (your images as they are) and ``imagenet``."""
    if spec["name"] == "imagenet":
        return _imagenet_bundle(spec, options)
    root, test_name, val_name = _splits(spec)
    train_folder = _folder(root, "train", None)
    classes = list(train_folder.classes)
    test_folder = _folder(root, test_name, classes)
    seed = int_option(spec, "seed", 0)  # the split's
    channels, size = _scan(train_folder.samples, _size_option(spec.get("image_size")),
                           spec.get("channels", "auto"))
    labels = np.asarray(train_folder.targets)
    if val_name is not None:
        keep, held = np.arange(len(labels)), np.arange(0)
        val_samples = _folder(root, val_name, classes).samples
    else:
        keep, held = stratified_split(labels, int_option(spec, "val_size", len(labels) // 10), seed)
        val_samples = [train_folder.samples[i] for i in held]
    train_samples = [train_folder.samples[i] for i in keep]
    mean, std = _stats_option(spec, "mean", channels), _stats_option(spec, "std", channels)
    if mean is None or std is None:
        sample = np.arange(len(train_samples))
        if len(sample) > STATS_IMAGES:
            per_class = max(1, STATS_IMAGES // len(classes))
            sample = stratified_indices(labels[keep], min(per_class, int(np.bincount(labels[keep]).min())), seed)
        probe = ImageFileDataset(train_samples, channels, size, False, (0.0,) * channels,
                                 (1.0,) * channels, 0)
        m, s = channel_stats(np.stack([probe.pixels(int(i)) for i in sample]))
        mean, std = mean or m, std or tuple(max(v, 1e-6) for v in s)
    padding = max(1, round(min(size) / 8))

    def dataset(samples, train):
        return ImageFileDataset(samples, channels, size, train, mean, std, padding)

    test = dataset(test_folder.samples, False)
    return DataBundle(
        train=dataset(train_samples, True),
        val=dataset(val_samples, False) if val_samples else None,
        test=test, num_classes=len(classes), classes=classes,
        input_shape=(channels, *size), mean=mean, std=std, example_input=example_input(test),
        num_workers=int_option(spec, "num_workers", min(8, os.cpu_count() or 1)), **options)


def _imagenet_bundle(spec: dict, options: dict) -> DataBundle:
    from torchvision import datasets, transforms

    root, test_name, val_name = _splits(spec)
    normalize = transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)
    train_tf = transforms.Compose([transforms.RandomResizedCrop(224),
                                   transforms.RandomHorizontalFlip(), transforms.ToTensor(),
                                   normalize])
    eval_tf = transforms.Compose([transforms.Resize(256), transforms.CenterCrop(224),
                                  transforms.ToTensor(), normalize])
    train = datasets.ImageFolder(root / "train", transform=train_tf)
    classes = list(train.classes)
    test = _folder(root, test_name, classes)
    test.transform = eval_tf
    if val_name is not None:
        val = _folder(root, val_name, classes)
        val.transform = eval_tf
        keep = list(range(len(train)))
    else:
        keep, held = stratified_split(train.targets, int_option(spec, "val_size", 0),
                                      int_option(spec, "seed", 0))
        val = None
        if len(held):
            val_base = copy.copy(train)
            val_base.transform = eval_tf
            val = Subset(val_base, held.tolist())
    return DataBundle(
        train=Subset(train, list(keep)), val=val, test=test, num_classes=len(classes),
        classes=classes, input_shape=(3, 224, 224), mean=IMAGENET_MEAN, std=IMAGENET_STD,
        example_input=example_input(test),
        num_workers=int_option(spec, "num_workers", min(8, os.cpu_count() or 1)), **options)


__all__ = ["IMAGENET_MEAN", "IMAGENET_STD", "ImageFileDataset", "STATS_IMAGES",
           "image_folder_bundle"]
