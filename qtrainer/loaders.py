"""Training and evaluation loaders for the Lightning trainers: epoch-seeded shuffling (a resumed
run sees the uninterrupted run's batches), Datasets turned into DataLoaders, and the small helpers
that take an example input from a loader without disturbing it.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
from lightning.pytorch.callbacks import Callback
from torch.utils.data import DataLoader, Dataset, Sampler

from .callback import batch_input, peek_batch, set_loader_epoch


class EpochShuffleSampler(Sampler[int]):
    """Shuffles ``range(n)`` anew each epoch from ``(seed, epoch)`` alone, so a run resumed at
    epoch ``e`` sees exactly the batches the uninterrupted run saw (Lightning calls
    :meth:`set_epoch` at each epoch start). Iterating advances the epoch by one."""

    def __init__(self, n: int, seed: int = 0):
        self.n, self.seed, self.epoch = int(n), int(seed), 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return self.n

    def __iter__(self):
        seed = int(np.random.SeedSequence([self.seed, self.epoch]).generate_state(1)[0])
        self.epoch += 1
        return iter(torch.randperm(self.n, generator=torch.Generator().manual_seed(seed)).tolist())


class EpochSync(Callback):
    """Sets the epoch of the training loader's sampler (or of a DeviceLoader) at each epoch
    start, after the other callbacks (NIPQ's BN re-estimation iterates the loader)."""

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        set_loader_epoch(trainer.train_dataloader, trainer.current_epoch)


class Interrupt(Callback):
    """Raise ``KeyboardInterrupt`` at the start of epoch ``epoch`` (0-based): a Ctrl-C, for
    tests of resuming."""

    def __init__(self, epoch: int):
        self.epoch = epoch

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        if trainer.current_epoch >= self.epoch:
            raise KeyboardInterrupt


def _is_loader(data) -> bool:
    return isinstance(data, DataLoader) or (
        not isinstance(data, Dataset) and isinstance(data, Iterable) and hasattr(data, "__len__"))


class BatchList:
    """A list of batches as one loader (Lightning would take a list for several loaders)."""

    def __init__(self, batches):
        self.batches = list(batches)

    def __iter__(self):
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)


def make_loader(data, batch_size: int, train: bool, seed: int = 0, num_workers: int = 0):
    """A loader for ``data``: DataLoaders and other iterables of batches are used as they are
    (a list or tuple of batches as one loader); a Dataset gets a DataLoader (training:
    :class:`EpochShuffleSampler`)."""
    if isinstance(data, (list, tuple)):
        return BatchList(data)
    if data is None or _is_loader(data):
        return data
    if not isinstance(data, Dataset):
        raise TypeError(f"expected a DataLoader, a Dataset, an iterable of batches or a "
                        f"LightningDataModule, got {type(data).__name__}")
    sampler = EpochShuffleSampler(len(data), seed) if train else None
    return DataLoader(data, batch_size=batch_size, sampler=sampler, num_workers=num_workers,
                      persistent_workers=num_workers > 0)


def first_input(loader) -> Any:
    """The model input of a small first batch, leaving the loader's order and RNG untouched."""
    if isinstance(loader, pl.LightningDataModule):
        loader = loader.train_dataloader()
    return batch_input(peek_batch(loader))


def to_cpu(x):
    if isinstance(x, torch.Tensor):
        return x.detach().cpu()
    if isinstance(x, (tuple, list)):
        return type(x)(to_cpu(v) for v in x)
    return x


__all__ = ["BatchList", "EpochShuffleSampler", "EpochSync", "Interrupt", "first_input",
           "make_loader", "to_cpu"]
