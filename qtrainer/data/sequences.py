"""A synthetic sequence-classification task with a known answer, generated offline: which of
``num_classes`` marker tokens occurs most often in a sequence of filler tokens.

Token ids: 0 is padding; ``1 .. num_classes`` are the markers (class ``c`` is marker ``c + 1``);
``num_classes + 1 .. vocab_size - 1`` are fillers. Each sequence has a length drawn uniformly
from ``[max_len // 2, max_len]`` (right-padded to ``max_len``); the label's marker occurs ``m``
times (``m`` uniform in ``[2, length // num_classes]``), every other marker fewer than ``m`` times, at
random positions. The label is therefore the unique most frequent marker: a model that counts
tokens over the unpadded positions reaches 100%.
"""

from __future__ import annotations

import torch
from torch.utils.data import TensorDataset


def majority_token_dataset(size: int, max_len: int = 24, vocab_size: int = 16,
                           num_classes: int = 4, seed: int = 0) -> TensorDataset:
    """``size`` sequences ``(ids int64 (size, max_len), labels int64 (size,))``, the same for
    the same arguments."""
    if vocab_size <= num_classes + 1:
        raise ValueError(f"vocab_size={vocab_size} must exceed num_classes + 1 = "
                         f"{num_classes + 1} (padding, markers and at least one filler)")
    if max_len < 4 * num_classes:
        raise ValueError(f"max_len={max_len} must be at least 4 * num_classes = "
                         f"{4 * num_classes} (room for every marker in the shortest sequence)")
    g = torch.Generator().manual_seed(seed)

    def randint(lo: int, hi: int) -> int:  # inclusive
        return int(torch.randint(lo, hi + 1, (1,), generator=g))

    ids = torch.zeros(size, max_len, dtype=torch.int64)
    labels = torch.randint(0, num_classes, (size,), generator=g)
    for i in range(size):
        length = randint(max_len // 2, max_len)
        row = torch.randint(num_classes + 1, vocab_size, (length,), generator=g)
        top = randint(2, length // num_classes)
        counts = [top if c == int(labels[i]) else randint(0, top - 1) for c in range(num_classes)]
        places = torch.randperm(length, generator=g)
        start = 0
        for c, n in enumerate(counts):
            row[places[start:start + n]] = c + 1
            start += n
        ids[i, :length] = row
    return TensorDataset(ids, labels)


__all__ = ["majority_token_dataset"]
