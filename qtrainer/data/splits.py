"""Stratified subsets and splits of a labelled array, and exact per-channel statistics."""

from __future__ import annotations

from typing import Sequence

import numpy as np


def stratified_indices(
    labels: np.ndarray,
    per_class: int,
    seed: int,
    exclude: Sequence[int] | np.ndarray | None = None,
) -> np.ndarray:
    """Sorted int64 indices taking exactly ``per_class`` random samples of every class.

    Samples listed in ``exclude`` are never taken. Raises ValueError when a class has too few.
    """
    labels = np.asarray(labels)
    allowed = np.ones(len(labels), dtype=bool)
    if exclude is not None:
        allowed[np.asarray(exclude, dtype=np.int64)] = False
    rng = np.random.default_rng(seed)
    picks = []
    for c in np.unique(labels):
        members = np.flatnonzero((labels == c) & allowed)
        if len(members) < per_class:
            raise ValueError(
                f"class {c} has {len(members)} samples, fewer than per_class={per_class}"
            )
        picks.append(rng.permutation(members)[:per_class])
    return np.sort(np.concatenate(picks)).astype(np.int64)


def stratified_split(
    labels: np.ndarray, holdout: int, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Split ``range(len(labels))`` into sorted ``(keep, held_out)`` index arrays.

    ``held_out`` has exactly ``holdout`` samples, spread over the classes in proportion to
    their frequency (largest-remainder rounding), drawn at random with ``seed``.
    """
    labels = np.asarray(labels)
    if not 0 <= holdout < len(labels):
        raise ValueError(f"cannot hold out {holdout} of {len(labels)} samples")
    classes, counts = np.unique(labels, return_counts=True)
    quota = counts * holdout / len(labels)
    take = np.floor(quota).astype(np.int64)
    take[np.argsort(take - quota, kind="stable")[: holdout - take.sum()]] += 1
    rng = np.random.default_rng(seed)
    held = [rng.permutation(np.flatnonzero(labels == c))[:k] for c, k in zip(classes, take)]
    held_out = np.sort(np.concatenate(held)).astype(np.int64)
    return np.setdiff1d(np.arange(len(labels)), held_out), held_out


def channel_stats(images: np.ndarray) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Exact per-channel ``(mean, std)`` of uint8 N × H × W × C images, in [0, 1] pixel units.

    Computed from per-channel histograms, 1,000 images at a time (fast, little memory).
    """
    c = images.shape[-1]
    hist = np.zeros(256 * c, dtype=np.int64)
    for chunk in np.array_split(images, max(1, len(images) // 1000)):
        hist += np.bincount((chunk.reshape(-1, c) + np.arange(c) * 256).ravel(), minlength=256 * c)
    hist = hist.reshape(c, 256)
    values = np.arange(256) / 255
    mean = hist @ values / hist.sum(1)
    std = np.sqrt(hist @ values**2 / hist.sum(1) - mean**2)
    return tuple(float(m) for m in mean), tuple(float(s) for s in std)


__all__ = ["channel_stats", "stratified_indices", "stratified_split"]
