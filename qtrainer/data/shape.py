"""What a model needs from a ``data:`` section, found without loading the data: the number of
classes and the input shape (C, H, W). ``qtrainer validate`` builds the model from them to
check layer patterns."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image

from .npz import default_cifar10_jpeg_root

_FIXED = {"digits": (10, (1, 8, 8)), "cifar10": (10, (3, 32, 32)), "cifar100": (100, (3, 32, 32))}


def _folder_shape(spec: dict) -> tuple[int, tuple[int, int, int]] | None:
    train = Path(spec["root"]) / "train"
    if not train.is_dir():
        return None
    classes = sorted(p for p in train.iterdir() if p.is_dir())
    if spec["name"] == "imagenet":
        return len(classes), (3, 224, 224)
    first = next((f for c in classes for f in sorted(c.iterdir()) if f.is_file()), None)
    if first is None:
        return None
    with Image.open(first) as im:
        gray, (w, h) = im.mode in ("1", "L", "LA", "I", "I;16", "F"), im.size
    channels = spec.get("channels", "auto")
    channels = (1 if gray else 3) if channels == "auto" else int(channels)
    size = spec.get("image_size")
    if size is not None:
        h, w = (size, size) if isinstance(size, int) else size
    return len(classes), (channels, int(h), int(w))


def data_shape(spec: dict) -> tuple[int, tuple[int, int, int]] | None:
    """``(num_classes, (C, H, W))`` of a validated ``data:`` section, reading at most one
    image, or None when that would take loading the data (a LightningDataModule, missing
    files)."""
    name = spec.get("name")
    if name in _FIXED:
        return _FIXED[name]
    if name == "majority-tokens":
        return int(spec.get("num_classes", 4)), (int(spec.get("max_len", 24)),)
    try:
        if name == "npz-jpeg":
            root = Path(spec["root"]) if spec.get("root") else default_cifar10_jpeg_root()
            with np.load(root / "test.npz") as npz:
                classes, jpeg, offsets = npz["classes"], npz["jpeg"], npz["offsets"]
                with Image.open(io.BytesIO(jpeg[offsets[0]:offsets[1]].tobytes())) as im:
                    w, h = im.size
            return len(classes), (3, h, w)
        if name in ("imagefolder", "imagenet") and spec.get("root"):
            return _folder_shape(spec)
    except (OSError, KeyError, ValueError):
        return None
    return None


__all__ = ["data_shape"]
