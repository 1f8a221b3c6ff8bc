"""In-memory image arrays as training data: augmentation (crop with padding, flip),
normalization, a map-style Dataset and a loader that keeps the whole array on a device.

Images are uint8 N × H × W × C arrays; models receive float32 N × C × H × W tensors normalized per
channel as ``(pixel / 255 - mean) / std`` (``mean``/``std`` in units of the [0, 1] pixel).
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset


def _crop_flip(
    images: torch.Tensor, oy: torch.Tensor, ox: torch.Tensor, flip: torch.Tensor, padding: int
) -> torch.Tensor:
    """Crop-with-zero-padding and horizontal flip of a uint8 N × H × W × C batch (one gather).

    ``oy``, ``ox``: int64 (N,) crop offsets in ``[0, 2 * padding]`` into the padded image;
    ``flip``: bool (N,). Returns a new N × H × W × C uint8 tensor.
    """
    n, h, w, _ = images.shape
    padded = F.pad(images, (0, 0, padding, padding, padding, padding))
    cols = torch.arange(w, device=images.device)
    rows = oy[:, None] + torch.arange(h, device=images.device)
    cols = ox[:, None] + torch.where(flip[:, None], cols.flip(0), cols)
    batch = torch.arange(n, device=images.device)[:, None, None]
    return padded[batch, rows[:, :, None], cols[:, None, :]]


def _normalize(images: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """uint8 N × H × W × C -> float32 N × C × H × W, ``(pixel / 255 - mean) / std``.

    The result is a permuted view's arithmetic, i.e. in ``channels_last`` memory format.
    """
    x = images.permute(0, 3, 1, 2).float()
    return (x - (mean * 255).view(1, -1, 1, 1)) / (std * 255).view(1, -1, 1, 1)


def _image_tensors(images, labels) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 N × H × W × C images and int64 N labels as CPU tensors, checked for shape."""
    images = torch.as_tensor(np.asarray(images, dtype=np.uint8))
    labels = torch.as_tensor(np.asarray(labels), dtype=torch.int64)
    if images.ndim != 4 or len(images) != len(labels):
        raise ValueError(
            f"expected N×H×W×C images and N labels, got {tuple(images.shape)} and {len(labels)}"
        )
    return images, labels


def augment_and_normalize(image: torch.Tensor, train: bool, crop_padding: int, flip: bool,
                          mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """One uint8 1 × H × W × C image -> float32 C × H × W: with ``train``, a random crop after
    zero-padding by ``crop_padding`` and (``flip``) a horizontal flip with probability 1/2,
    drawn from torch's global RNG; then ``(pixel / 255 - mean) / std``."""
    if train:
        oy, ox = torch.randint(0, 2 * crop_padding + 1, (2, 1))
        flips = torch.rand(1) < 0.5 if flip else torch.zeros(1, dtype=torch.bool)
        image = _crop_flip(image, oy, ox, flips, crop_padding)
    return _normalize(image, mean, std)[0].contiguous()


class ImageArrayDataset(Dataset):
    """A Dataset over an in-memory uint8 N × H × W × C image array.

    Items are ``(x, y)``: x float32 C × H × W normalized with per-channel ``mean``/``std`` (units
    of the [0, 1] pixel), y an int class index. With ``train=True`` each item is randomly
    cropped after zero-padding by ``crop_padding`` pixels and flipped horizontally with
    probability 1/2 (if ``flip``), drawing from torch's global RNG, which DataLoader seeds per
    worker, so runs are reproducible under ``torch.manual_seed``/a seeded DataLoader generator.
    """

    def __init__(
        self,
        images,
        labels,
        train: bool,
        mean: Sequence[float],
        std: Sequence[float],
        crop_padding: int = 4,
        flip: bool = True,
    ):
        self.images, self.labels = _image_tensors(images, labels)
        self.train, self.crop_padding, self.flip = train, crop_padding, flip
        self.mean = torch.tensor(mean, dtype=torch.float32)
        self.std = torch.tensor(std, dtype=torch.float32)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        x = augment_and_normalize(self.images[i : i + 1], self.train, self.crop_padding,
                                  self.flip, self.mean, self.std)
        return x, int(self.labels[i])


class DeviceLoader:
    """Batches of an image array held once in (accelerator) memory, augmented on that device.

    Yields ``(x, y)``: x float32 B × C × H × W normalized (``channels_last`` memory format if
    asked), y int64 B, both on ``device``. With ``train=True`` every epoch is shuffled and each
    image randomly cropped (zero padding ``crop_padding``) and flipped, all randomness drawn
    from a CPU ``torch.Generator`` seeded by ``(seed, epoch)``, so batches are identical on
    CPU and CUDA and across runs. Each iteration uses the current epoch and then advances it;
    ``set_epoch(e)`` chooses it explicitly. ``train=False`` yields the images in order, as is.
    """

    def __init__(
        self,
        images,
        labels,
        batch_size: int,
        mean: Sequence[float],
        std: Sequence[float],
        *,
        train: bool,
        device: str | torch.device = "cpu",
        seed: int = 0,
        drop_last: bool = False,
        crop_padding: int = 4,
        flip: bool = True,
        channels_last: bool = False,
    ):
        self.device = torch.device(device)
        images, labels = _image_tensors(images, labels)
        self.images, self.labels = images.to(self.device), labels.to(self.device)
        self.mean = torch.tensor(mean, dtype=torch.float32, device=self.device)
        self.std = torch.tensor(std, dtype=torch.float32, device=self.device)
        self.batch_size, self.train, self.seed, self.drop_last = batch_size, train, seed, drop_last
        self.crop_padding, self.flip, self.channels_last = crop_padding, flip, channels_last
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Make the next iteration use the shuffle and augmentation of ``epoch``."""
        self.epoch = epoch

    def example_batch(self, n: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
        """The first ``n`` images (normalized, not augmented) and labels; the epoch and every
        random state are left untouched."""
        x = _normalize(self.images[:n], self.mean, self.std)
        return (x if self.channels_last else x.contiguous()), self.labels[:n]

    def __len__(self) -> int:
        n = len(self.labels)
        return n // self.batch_size if self.drop_last else math.ceil(n / self.batch_size)

    def __iter__(self):
        n = len(self.labels)
        if self.train:
            seed = int(np.random.SeedSequence([self.seed, self.epoch]).generate_state(1)[0])
            g = torch.Generator().manual_seed(seed)
            order = torch.randperm(n, generator=g).to(self.device)
            offsets = torch.randint(0, 2 * self.crop_padding + 1, (2, n), generator=g)
            offsets = offsets.to(self.device)
            flips = (torch.rand(n, generator=g) < 0.5).to(self.device)
            if not self.flip:
                flips.zero_()
        self.epoch += 1
        for b in range(len(self)):
            s = slice(b * self.batch_size, (b + 1) * self.batch_size)
            index = order[s] if self.train else s
            images = self.images[index]
            if self.train:
                oy, ox = offsets[0, s], offsets[1, s]
                images = _crop_flip(images, oy, ox, flips[s], self.crop_padding)
            x = _normalize(images, self.mean, self.std)
            yield (x if self.channels_last else x.contiguous()), self.labels[index]


__all__ = ["DeviceLoader", "ImageArrayDataset", "augment_and_normalize"]
