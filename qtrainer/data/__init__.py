"""Datasets for qtrainer: loading, stratified splits, augmentation and the ``build_data`` factory.

Conventions used throughout:

- images are stored as ``uint8`` arrays in NHWC layout (N × H × W × C, pixel values 0..255;
  C is 3, or 1 for grayscale image folders);
- models receive float32 NCHW tensors normalized per channel as ``(pixel / 255 - mean) / std``,
  so ``mean`` and ``std`` are in units of the [0, 1]-scaled pixel;
- labels are int64 class indices.

``build_data(spec, seed)`` turns the ``data:`` section of a run file into a :class:`DataBundle`
(``data.seed`` picks the split, ``seed`` the batch order and augmentation); its
``train_loader()``, ``val_loader()`` and ``test_loader()`` return iterables of ``(x, y)``
batches (a ``torch.utils.data.DataLoader``, or a :class:`DeviceLoader` when the dataset is held
in accelerator memory).
"""

from .build import DATA_KEYS, build_data
from .bundle import DataBundle
from .datamodule import datamodule_bundle
from .digits import DIGITS_MEAN, DIGITS_STD, load_digits_split
from .folders import IMAGENET_MEAN, IMAGENET_STD, ImageFileDataset
from .images import DeviceLoader, ImageArrayDataset
from .npz import default_cifar10_jpeg_root, load_npz_jpeg
from .shape import data_shape
from .splits import channel_stats, stratified_indices, stratified_split

__all__ = [
    "DATA_KEYS", "DIGITS_MEAN", "DIGITS_STD", "DataBundle", "DeviceLoader", "IMAGENET_MEAN",
    "IMAGENET_STD", "ImageArrayDataset", "ImageFileDataset", "build_data", "channel_stats",
    "data_shape", "datamodule_bundle", "default_cifar10_jpeg_root",
    "load_digits_split", "load_npz_jpeg", "stratified_indices", "stratified_split",
]
