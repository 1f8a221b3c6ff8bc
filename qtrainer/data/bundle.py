"""What a model needs to know about its data: :class:`DataBundle`, and the option parsing
shared by the data sources."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.utils.data import DataLoader, Dataset

from .images import DeviceLoader


@dataclass
class DataBundle:
    """The datasets of one recipe and what a model needs to know about them.

    ``train``/``val``/``test``: Datasets of ``(x, y)`` (x float32 C × H × W) or DeviceLoaders;
    ``val`` is None when no validation split is held out (validate on ``test`` then).
    ``input_shape`` is (C, H, W); ``mean``/``std`` the per-channel normalization (units of the
    [0, 1] pixel); ``example_input`` a float32 CPU batch of up to 8 test inputs (B × C × H × W).
    The ``*_loader()`` methods return the iterables to train/evaluate on.
    """

    train: Dataset | DeviceLoader
    val: Dataset | DeviceLoader | None
    test: Dataset | DeviceLoader
    num_classes: int
    classes: list[str]
    input_shape: tuple[int, int, int]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    example_input: torch.Tensor
    batch_size: int = 128
    num_workers: int = 0
    drop_last: bool = False
    seed: int = 0

    def _loader(self, data, train: bool):
        if isinstance(data, DeviceLoader):
            return data
        return DataLoader(
            data,
            batch_size=self.batch_size,
            shuffle=train,
            drop_last=train and self.drop_last,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            pin_memory=torch.cuda.is_available(),
            generator=torch.Generator().manual_seed(self.seed) if train else None,
        )

    def train_loader(self):
        """Shuffled training batches (seeded with ``seed``)."""
        return self._loader(self.train, train=True)

    def val_loader(self):
        """Validation batches in order, or None when there is no validation split."""
        return None if self.val is None else self._loader(self.val, train=False)

    def test_loader(self):
        """Test batches in order."""
        return self._loader(self.test, train=False)


def example_input(data: Dataset | DeviceLoader, n: int = 8) -> torch.Tensor:
    if isinstance(data, DeviceLoader):
        return data.example_batch(n)[0].cpu().contiguous()
    return torch.stack([data[i][0] for i in range(min(n, len(data)))])


def int_option(spec: dict, key: str, default, minimum: int = 0):
    value = spec.get(key, default)
    if value is None and default is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"data.{key}={value!r} must be an integer >= {minimum}")
    return value


__all__ = ["DataBundle", "example_input", "int_option"]
