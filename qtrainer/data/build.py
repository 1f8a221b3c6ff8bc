"""``build_data``: the ``data:`` section of a run file turned into a :class:`DataBundle`."""

from __future__ import annotations

import difflib
import os
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Subset

from .bundle import DataBundle, example_input, int_option
from .datamodule import datamodule_bundle
from .digits import DIGITS_MEAN, DIGITS_STD, load_digits_split
from .folders import image_folder_bundle
from .images import DeviceLoader, ImageArrayDataset
from .npz import default_cifar10_jpeg_root, load_npz_jpeg
from .sequences import majority_token_dataset
from .splits import channel_stats, stratified_indices, stratified_split

_COMMON_KEYS = {"name", "batch_size", "num_workers", "seed", "val_size", "drop_last"}
_ARRAY_KEYS = _COMMON_KEYS | {
    "root", "subset_per_class", "test_per_class", "device_resident", "device", "channels_last"
}
DATA_KEYS = {
    "digits": _COMMON_KEYS | {"test_fraction"},
    "npz-jpeg": _ARRAY_KEYS,
    "cifar10": _ARRAY_KEYS | {"download"},
    "cifar100": _ARRAY_KEYS | {"download"},
    "imagefolder": _COMMON_KEYS | {"root", "image_size", "channels", "mean", "std"},
    "imagenet": _COMMON_KEYS | {"root"},
    "majority-tokens": _COMMON_KEYS | {"train_size", "test_size", "max_len", "vocab_size",
                                       "num_classes"},
}
"""The keys of each ``data.name``; a ``data:`` section may instead name a LightningDataModule
by ``class_path`` and ``init_args`` (:mod:`qtrainer.data.datamodule`)."""


def did_you_mean(value, allowed) -> str:
    close = difflib.get_close_matches(str(value), list(allowed), n=1)
    return f"; did you mean {close[0]!r}?" if close else ""


def build_data(spec: dict, seed: int | None = None) -> DataBundle:
    """Build the datasets described by a run file's ``data:`` section.

    ``data.seed`` chooses the split (subsets, the held-out validation images, digits' test
    split); ``seed`` (the run's ``seed``; default ``data.seed``) the training batches' order
    and augmentation (a device-resident loader's; DataLoaders are shuffled by the caller).

    ``name`` (required) is one of:

    - ``digits``: scikit-learn's bundled 8×8 digits (offline default); ``test_fraction`` (0.2).
    - ``npz-jpeg``: a folder ``root`` with ``train.npz``/``test.npz`` (see :func:`load_npz_jpeg`;
      default :func:`default_cifar10_jpeg_root`). Normalized with the mean/std of the training
      split.
    - ``cifar10``/``cifar100``: torchvision's copies under ``root``; ``download`` (False).
    - ``imagefolder``: your images, ``root`` with ``train/`` and ``val/`` and/or ``test/`` class
      folders, at their own size (``image_size``: resize to N or [H, W]), grayscale kept as one
      channel (``channels``: auto | 1 | 3), mean/std from the training images unless given
      (``mean``, ``std``: one number per channel); see :mod:`qtrainer.data.folders`.
    - ``majority-tokens``: a synthetic sequence task with a known answer (which marker token
      occurs most often; :mod:`qtrainer.data.sequences`), generated offline: ``train_size``
      (4000), ``test_size`` (1000), ``max_len`` (24), ``vocab_size`` (16), ``num_classes`` (4).
    - ``imagenet``: the same folders with ImageNet's pipeline (random-resized 224 crop + flip
      for training, resize 256 + center crop 224 for evaluation, ImageNet mean/std).

    Or ``class_path`` (+ ``init_args``): a LightningDataModule (:mod:`qtrainer.data.datamodule`).

    Common keys: ``batch_size`` (128), ``num_workers`` (0 for in-memory data, else up to 8),
    ``seed`` (0; subsets and splits), ``drop_last`` (False; training batches),
    ``val_size``: images held out of the training data for validation, stratified (default
    10% of the training pool, i.e. 5,000 for CIFAR; 0 for ``imagenet``, giving ``val=None``;
    none when an image folder has both ``val/`` and ``test/``).
    Array datasets (``npz-jpeg``, ``cifar10``, ``cifar100``) also take ``subset_per_class``
    (a stratified training pool, before the hold-out), ``test_per_class`` (a stratified test
    subset), ``device_resident`` (False; serve batches from a :class:`DeviceLoader`), ``device``
    (for ``device_resident``; default CUDA when available) and ``channels_last`` (False).
    """
    spec = dict(spec)
    if "class_path" in spec:
        return datamodule_bundle(spec)
    name = spec.get("name")
    if name not in DATA_KEYS:
        raise ValueError(
            f"data.name={name!r} is not a known dataset; allowed: {', '.join(DATA_KEYS)}"
            f"{did_you_mean(name, DATA_KEYS)}"
        )
    for key in spec:
        if key not in DATA_KEYS[name]:
            raise ValueError(
                f"data.{key} is not a valid key for data.name={name!r}; allowed: "
                f"{', '.join(sorted(DATA_KEYS[name]))}{did_you_mean(key, DATA_KEYS[name])}"
            )
    split_seed = int_option(spec, "seed", 0)
    options = dict(
        batch_size=int_option(spec, "batch_size", 128, minimum=1),
        drop_last=bool(spec.get("drop_last", False)),
        seed=split_seed if seed is None else int(seed),  # the bundle's: shuffling
    )
    if name == "digits":
        train, test = load_digits_split(split_seed, spec.get("test_fraction", 0.2))
        labels = train.tensors[1].numpy()
        keep, held = stratified_split(labels, int_option(spec, "val_size", len(labels) // 10),
                                      split_seed)
        return DataBundle(
            train=Subset(train, keep.tolist()),
            val=Subset(train, held.tolist()) if len(held) else None,
            test=test,
            num_classes=10,
            classes=[str(d) for d in range(10)],
            input_shape=(1, 8, 8),
            mean=DIGITS_MEAN,
            std=DIGITS_STD,
            example_input=test.tensors[0][:8],
            num_workers=int_option(spec, "num_workers", 0),
            **options,
        )
    if name == "majority-tokens":
        return _sequence_bundle(spec, options, split_seed)
    if name in ("imagefolder", "imagenet"):
        return image_folder_bundle(spec, options)
    return _array_bundle(name, spec, options)


def _sequence_bundle(spec: dict, options: dict, split_seed: int) -> DataBundle:
    task = dict(max_len=int_option(spec, "max_len", 24, minimum=1),
                vocab_size=int_option(spec, "vocab_size", 16, minimum=2),
                num_classes=int_option(spec, "num_classes", 4, minimum=2))
    train = majority_token_dataset(int_option(spec, "train_size", 4000, minimum=1),
                                   seed=2 * split_seed, **task)
    test = majority_token_dataset(int_option(spec, "test_size", 1000, minimum=1),
                                  seed=2 * split_seed + 1, **task)
    labels = train.tensors[1].numpy()
    keep, held = stratified_split(labels, int_option(spec, "val_size", len(labels) // 10),
                                  split_seed)
    return DataBundle(
        train=Subset(train, keep.tolist()), val=Subset(train, held.tolist()) if len(held) else None,
        test=test, num_classes=task["num_classes"],
        classes=[f"marker {c + 1}" for c in range(task["num_classes"])],
        input_shape=(task["max_len"],), mean=(), std=(), example_input=test.tensors[0][:8],
        num_workers=int_option(spec, "num_workers", 0), **options)


def _load_arrays(name: str, spec: dict, subset_per_class, test_per_class, seed: int):
    """(train_images, train_labels, test_images, test_labels, classes) of an array dataset."""
    if name == "npz-jpeg":
        root = Path(spec["root"]) if spec.get("root") is not None else default_cifar10_jpeg_root()
        for split in ("train", "test"):
            if not (root / f"{split}.npz").is_file():
                raise FileNotFoundError(f"data.root={str(root)!r} has no {split}.npz")
        splits = []
        for split, per_class in (("train", subset_per_class), ("test", test_per_class)):
            select = None
            if per_class is not None:
                with np.load(root / f"{split}.npz") as npz:
                    select = stratified_indices(npz["labels"], per_class, seed)
            splits.append(load_npz_jpeg(root / f"{split}.npz", select))
        (train_x, train_y, classes), (test_x, test_y, _) = splits
        return train_x, train_y, test_x, test_y, classes

    import torchvision

    if spec.get("root") is None:
        raise ValueError(f"data.root is required for data.name={name!r}")
    cls = torchvision.datasets.CIFAR10 if name == "cifar10" else torchvision.datasets.CIFAR100
    try:
        train = cls(spec["root"], train=True, download=bool(spec.get("download", False)))
        test = cls(spec["root"], train=False, download=False)
    except RuntimeError as e:
        raise FileNotFoundError(
            f"{name} not found under data.root={str(spec['root'])!r} ({e}); set "
            "data.download: true to fetch it, or use data.name: npz-jpeg for the CIFAR-10 JPEG copy"
        ) from None
    arrays = []
    for ds, per_class in ((train, subset_per_class), (test, test_per_class)):
        labels = np.asarray(ds.targets, dtype=np.int64)
        if per_class is not None:
            select = stratified_indices(labels, per_class, seed)
            arrays += [ds.data[select], labels[select]]
        else:
            arrays += [ds.data, labels]
    return (*arrays, list(train.classes))


def _array_bundle(name: str, spec: dict, options: dict) -> DataBundle:
    seed = int_option(spec, "seed", 0)  # the split's
    train_x, train_y, test_x, test_y, classes = _load_arrays(
        name,
        spec,
        int_option(spec, "subset_per_class", None, minimum=1),
        int_option(spec, "test_per_class", None, minimum=1),
        seed,
    )
    keep, held = stratified_split(train_y, int_option(spec, "val_size", len(train_y) // 10), seed)
    mean, std = channel_stats(train_x[keep])
    splits = {
        "train": (train_x[keep], train_y[keep]),
        "val": (train_x[held], train_y[held]),
        "test": (test_x, test_y),
    }
    if spec.get("device_resident", False):
        device = spec.get("device") or ("cuda" if torch.cuda.is_available() else "cpu")
        made = {
            split: DeviceLoader(
                x,
                y,
                options["batch_size"],
                mean,
                std,
                train=split == "train",
                device=device,
                seed=options["seed"],
                drop_last=split == "train" and options["drop_last"],
                channels_last=bool(spec.get("channels_last", False)),
            )
            for split, (x, y) in splits.items()
        }
        num_workers = int_option(spec, "num_workers", 0)
    else:
        made = {
            split: ImageArrayDataset(x, y, split == "train", mean, std)
            for split, (x, y) in splits.items()
        }
        num_workers = int_option(spec, "num_workers", min(8, os.cpu_count() or 1))
    return DataBundle(
        train=made["train"],
        val=made["val"] if len(held) else None,
        test=made["test"],
        num_classes=len(classes),
        classes=classes,
        input_shape=(train_x.shape[3], train_x.shape[1], train_x.shape[2]),
        mean=mean,
        std=std,
        example_input=example_input(made["test"]),
        num_workers=num_workers,
        **options,
    )


__all__ = ["DATA_KEYS", "build_data"]
