"""scikit-learn's bundled 8×8 digits: the offline data of the quickstart."""

from __future__ import annotations

import torch
from torch.utils.data import TensorDataset

from .splits import stratified_split

DIGITS_MEAN = (0.3053,)
DIGITS_STD = (0.3760,)


def load_digits_split(
    seed: int = 0, test_fraction: float = 0.2
) -> tuple[TensorDataset, TensorDataset]:
    """scikit-learn's bundled digits (1797 8×8 grayscale images, 10 classes; no network).

    Returns ``(train, test)`` TensorDatasets of ``(x, y)``: x float32 N × 1 × 8 × 8, pixels
    divided by 16 then standardized with :data:`DIGITS_MEAN`/:data:`DIGITS_STD`; y int64 N.
    The split is stratified; ``test_fraction`` of the images (rounded) go to ``test``.
    """
    from sklearn.datasets import load_digits

    if not 0 < test_fraction < 1:
        raise ValueError(f"test_fraction={test_fraction!r} must lie strictly between 0 and 1")
    digits = load_digits()
    x = torch.tensor(digits.images / 16.0, dtype=torch.float32).unsqueeze(1)
    x = (x - DIGITS_MEAN[0]) / DIGITS_STD[0]
    y = torch.tensor(digits.target, dtype=torch.int64)
    train, test = stratified_split(digits.target, round(test_fraction * len(y)), seed)
    return TensorDataset(x[train], y[train]), TensorDataset(x[test], y[test])


__all__ = ["DIGITS_MEAN", "DIGITS_STD", "load_digits_split"]
