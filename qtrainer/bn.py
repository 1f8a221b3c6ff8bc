"""Forward-only BatchNorm statistics re-estimation (after the switch to hard quantization)."""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch import nn


@torch.no_grad()
def reestimate_batchnorm(model: nn.Module, batches: Iterable, forward: Callable[[object], object],
                         num_batches: int) -> int:
    """Reset every BatchNorm's running statistics and recompute them as the cumulative average
    over ``num_batches`` batches (``forward(batch)`` runs the model on one batch). The model's
    train/eval modes and the BN momenta are restored. Returns the number of batches used."""
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)
             and m.track_running_stats]
    if not norms or num_batches <= 0:
        return 0
    modes = {m: m.training for m in model.modules()}
    momenta = {m: m.momentum for m in norms}
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative moving average
    model.train()
    used = 0
    try:
        for batch in batches:
            if used >= num_batches:
                break
            forward(batch)
            used += 1
    finally:
        for m, mode in modes.items():
            m.training = mode
        for m, momentum in momenta.items():
            m.momentum = momentum
    return used
