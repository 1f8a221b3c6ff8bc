"""The least-MSE scale search shared by the quantizers' ``init: mse`` options (LSQ's step size,
NIPQ's truncation boundary ``alpha``): a coarse grid of fractions of a per-row upper scale,
then a finer grid around the best, each candidate scored by the quantizer's own error."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

SAMPLE = 1 << 16
"""Elements searched per row (an even stride through longer rows): the error curve of a large
activation batch is estimated closely enough at a fraction of the cost."""
COARSE = 64
"""Fractions ``i / COARSE`` of the upper scale in the first pass; the second pass tries 17
fractions at ``1 / (8 COARSE)`` spacing around the best (never below ``1 / (4 COARSE)``)."""


@torch.no_grad()
def least_mse_scale(rows: Tensor, top: Tensor, error: Callable[[Tensor, Tensor], Tensor],
                    extra: Sequence[Tensor] = ()) -> Tensor:
    """Per row of ``rows`` (shape ``[R, M]``), the scale (shape ``[R]``) of least
    ``error(rows, s)`` (``s`` shape ``[R, 1]``, clamped to >= 1e-8; returns ``[R]``) among
    ``top`` itself, the ``extra`` candidates (each ``[R]``), ``top * i / COARSE`` for
    ``i = 1..COARSE-1`` and the finer grid around the best; a candidate replaces the best only
    when strictly better. At most :data:`SAMPLE` elements per row are scored."""
    if rows.shape[1] > SAMPLE:
        rows = rows[:, :: math.ceil(rows.shape[1] / SAMPLE)]

    def score(s: Tensor) -> Tensor:
        return error(rows, s.clamp(min=1e-8)[:, None])

    best_s, best = top.clone(), score(top)
    grid = [*extra, *(top * (i / COARSE) for i in range(1, COARSE))]
    for refine in (False, True):
        if refine:
            center = best_s / top.clamp(min=1e-8)
            grid = [top * (center + j / (8 * COARSE)).clamp(min=1 / (4 * COARSE))
                    for j in range(-8, 9)]
        for s in grid:
            err = score(s)
            better = err < best
            best_s = torch.where(better, s, best_s)
            best = torch.where(better, err, best)
    return best_s


__all__ = ["COARSE", "SAMPLE", "least_mse_scale"]
