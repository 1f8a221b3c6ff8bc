"""Finding the model input in a batch, peeking at a loader without disturbing it, and setting
the epoch a loader shuffles and augments for."""

from __future__ import annotations

from collections.abc import Mapping

import torch


def batch_input(batch):
    """The model input of a batch: the batch itself if a tensor, its first element if a tuple
    or list, ``batch["input"|"inputs"|"x"|"image"]`` if a mapping. (An ``input_fn`` of one's own
    may return a tuple, the forward's positional arguments, or a mapping, its keyword
    arguments.)"""
    if isinstance(batch, torch.Tensor):
        return batch
    if isinstance(batch, (tuple, list)) and batch:
        return batch[0]
    if isinstance(batch, Mapping):
        for key in ("input", "inputs", "x", "image"):
            if key in batch:
                return batch[key]
    raise ValueError(f"cannot find the model input in a batch of type {type(batch).__name__}; "
                     "pass QuantizationCallback(input_fn=...) to extract it")


def peek_batch(loader, n: int = 8):
    """A small batch from ``loader`` that leaves its iteration order and every random state as
    they were: the first ``n`` items of a map-style dataset collated, a loader's own
    ``example_batch(n)``, or else the first batch (global RNG restored)."""
    if hasattr(loader, "example_batch"):
        return loader.example_batch(n)
    rng = torch.get_rng_state()
    try:
        dataset = getattr(loader, "dataset", None)
        collate = getattr(loader, "collate_fn", None)
        if collate is not None and hasattr(dataset, "__getitem__") and hasattr(dataset, "__len__"):
            return collate([dataset[i] for i in range(min(n, len(dataset)))])
        return next(iter(loader))
    finally:
        torch.set_rng_state(rng)


def set_loader_epoch(loader, epoch: int) -> None:
    """Call ``set_epoch(epoch)`` on a loader and on its sampler and batch sampler, where they
    have one (a ``DistributedSampler``, qtrainer's ``EpochShuffleSampler`` and ``DeviceLoader``):
    their next iteration then gives that epoch's order and augmentation."""
    for obj in (loader, getattr(loader, "sampler", None),
                getattr(getattr(loader, "batch_sampler", None), "sampler", None)):
        if obj is not None and callable(getattr(obj, "set_epoch", None)):
            obj.set_epoch(epoch)


__all__ = ["batch_input", "peek_batch", "set_loader_epoch"]
